"""Workload ``suite``: the workloads W1 to W6 one after another, and one summary.

Each workload runs as its own process (``python -m bench <name>``), so that
one that crashes or hangs costs only its own result. Each gets at most
``--timeout`` seconds (default 90: six of them stay within the suite's ten
minutes), and never more than what is left of those ten minutes; one that
takes longer is asked to stop (SIGINT to its process group, which holds the
servers it started, so they shut down and its database is dropped), and
killed ``STOP_GRACE_S`` later. A workload that is
not registered (yet) is skipped with a note; one that fails or times out is
recorded as such, and the suite goes on.

From each workload's JSON result (the path it prints last, ``result:
<path>``) the suite takes every metric (the median of its runs, with the
runs) and every target, and writes:

- ``bench/results/suite-<UTC>.json``: the same shape as any workload's
  result, metrics and targets prefixed with their workload's name, and per
  workload its status, command, time and result file under ``details``;
- ``bench/results/suite-<UTC>.md``: the machine, the commands and, per
  workload, its medians and its targets (measured, goal, met or MISSED), to
  paste into ``docs/BENCHMARKS.md``.

The suite's result is invalid when a workload that ran failed, timed out or
marked its own result invalid.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from . import machine
from .report import RESULTS_DIR, Report

__all__ = ["WORKLOADS", "WorkloadRun", "add_arguments", "markdown", "run"]

WORKLOADS = ("w1", "w2", "w3", "w4", "w5", "w6")
TIMEOUT_S = 90.0
SUITE_BUDGET_S = 600.0
MIN_START_S = 20.0  # a workload is not started with less of the suite's budget left
STOP_GRACE_S = 15.0  # from SIGINT to SIGKILL
STOP_KILL_S = 5.0  # from SIGKILL to giving up on the process
OUTPUT_TAIL_LINES = 40
REPO = Path(__file__).resolve().parent.parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        metavar="LIST",
        help="comma-separated workloads to run instead of " + ",".join(WORKLOADS),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="pass --quick to the workloads that have it (a smoke test; rough numbers)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=TIMEOUT_S,
        metavar="SECONDS",
        help=f"longest a workload may run before it is stopped (default {TIMEOUT_S:g})",
    )


@dataclass
class WorkloadRun:
    """What became of one workload of the suite."""

    name: str
    status: str = "not run"  # valid, invalid, failed, timeout, not registered, skipped
    command: str = ""
    exit_code: int | None = None
    seconds: float = 0.0
    result_path: str | None = None
    result: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    output_tail: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "command": self.command,
            "exit_code": self.exit_code,
            "seconds": round(self.seconds, 1),
            "result": self.result_path,
            "notes": self.notes,
            "output_tail": self.output_tail if self.status not in ("valid", "invalid") else [],
        }


def _selected(only: str | None) -> list[str]:
    if not only:
        return list(WORKLOADS)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    if not wanted:
        raise SystemExit("bench: --only needs at least one workload")
    if "suite" in wanted:
        raise SystemExit("bench: the suite does not run itself")
    ordered = [w for w in WORKLOADS if w in wanted]
    return ordered + [w for w in dict.fromkeys(wanted) if w not in WORKLOADS]


def _stop(proc: subprocess.Popen[str]) -> None:
    """Stop a workload and every process it started (its process group):
    SIGINT first, so that servers shut down and scratch databases are
    dropped; SIGKILL when that takes longer than ``STOP_GRACE_S``."""
    for sig, wait_s in ((signal.SIGINT, STOP_GRACE_S), (signal.SIGKILL, STOP_KILL_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            # The leader is gone; its group may still hold stragglers.
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
        return


def _execute(argv: list[str], timeout: float, label: str) -> tuple[int | None, list[str]]:
    """Run ``python -m bench <argv>``, echoing its output; (exit code or None on
    timeout, the last lines of output)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", *argv],
        cwd=str(REPO),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, with the servers it starts
    )
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            print(f"[{label}] {line}", end="", flush=True)

    reader = threading.Thread(target=pump, name=f"suite-{label}", daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
        _stop(proc)
    except BaseException:  # interrupted: take the workload down with the suite
        _stop(proc)
        raise
    reader.join(5)
    return code, list(tail)


def _run_one(name: str, quick: bool, timeout: float) -> WorkloadRun:
    outcome = WorkloadRun(name)
    argv = [name, "--quick"] if quick else [name]
    start = time.monotonic()
    code, tail = _execute(argv, timeout, name)
    text = "\n".join(tail)
    if code == 2 and quick and "unrecognized arguments: --quick" in text:
        outcome.notes.append("has no --quick mode: ran in full")
        argv = [name]
        code, tail = _execute(argv, max(1.0, timeout - (time.monotonic() - start)), name)
        text = "\n".join(tail)
    outcome.command = "scripts/bench " + " ".join(argv)
    outcome.seconds = time.monotonic() - start
    outcome.exit_code = code
    outcome.output_tail = tail
    if code == 2 and "invalid choice" in text:
        outcome.status = "not registered"
        outcome.notes.append("not a workload of scripts/bench (yet): skipped")
        return outcome
    result_lines = [line for line in tail if line.startswith("result: ")]
    if result_lines:
        outcome.result_path = result_lines[-1].removeprefix("result: ").strip()
        try:
            outcome.result = orjson.loads(Path(outcome.result_path).read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            outcome.notes.append(f"its result could not be read: {exc}")
    if code is None:
        outcome.status = "timeout"
        outcome.notes.append(f"stopped after {timeout:.0f} s")
    elif outcome.result is None:
        outcome.status = "failed"
        outcome.notes.append(f"exited with {code} without a result")
    else:
        outcome.status = "valid" if outcome.result.get("valid") else "invalid"
        if code not in (0, 1):
            outcome.notes.append(f"exited with {code}")
    return outcome


def _collect(report: Report, outcome: WorkloadRun) -> None:
    """Take a workload's metrics and targets into the suite's report."""
    if outcome.result is None:
        return
    for m in outcome.result.get("metrics", []):
        runs = [math.nan if v is None else v for v in m.get("runs", [])]
        report.add(f"{outcome.name}: {m['name']}", m.get("unit", ""), runs, m.get("meaning", ""))
    for t in outcome.result.get("targets", []):
        measured = math.nan if t.get("measured") is None else t["measured"]
        report.target(
            f"{outcome.name}: {t['name']}",
            measured,
            t["goal"],
            at_least=t.get("at_least", True),
            meaning=t.get("meaning", ""),
        )


def run(args: argparse.Namespace) -> Report:
    names = _selected(args.only)
    if args.timeout <= 0:
        raise SystemExit("bench: --timeout must be positive")
    started = dt.datetime.now(dt.UTC)
    report = Report(
        "suite",
        started,
        {"workloads": names, "quick": args.quick, "timeout_s": args.timeout},
        machine.describe(),
    )
    command = "scripts/bench " + " ".join(sys.argv[1:])
    deadline = time.monotonic() + SUITE_BUDGET_S
    outcomes = []
    for name in names:
        # What is left of the budget once a workload that overruns has been stopped.
        left = deadline - time.monotonic() - STOP_GRACE_S - STOP_KILL_S
        if left < MIN_START_S:
            outcome = WorkloadRun(name, "skipped", notes=["the suite's time budget was used up"])
        else:
            print(f"suite: {name} (at most {min(args.timeout, left):.0f} s)", flush=True)
            outcome = _run_one(name, args.quick, min(args.timeout, left))
            print(f"suite: {name}: {outcome.status} in {outcome.seconds:.0f} s", flush=True)
        outcomes.append(outcome)
        _collect(report, outcome)
        for note in outcome.notes:
            report.notes.append(f"{name}: {note}")
        if outcome.status in ("invalid", "failed", "timeout"):
            report.invalid(f"{name}: {outcome.status}")
        if outcome.result is not None:
            # The database server is only known to the workloads that used one.
            for key in ("postgresql", "database"):
                value = outcome.result.get("machine", {}).get(key)
                if value is not None:
                    report.machine.setdefault(key, value)
    report.finished_at = dt.datetime.now(dt.UTC)
    report.details = {"command": command, "workloads": [o.as_json() for o in outcomes]}
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    summary = RESULTS_DIR / f"suite-{stamp}.md"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    summary.write_text(markdown(report, outcomes, command))
    report.notes.append(f"summary: {summary}")
    return report


# -- the Markdown summary -------------------------------------------------------


def _number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _machine_rows(m: dict[str, Any]) -> list[str]:
    rows = [
        ("CPU", f'{m.get("cores")} cores, "{m.get("cpu_model")}"'),
        ("memory", f"{m.get('memory_gib')} GiB"),
        ("OS", str(m.get("os"))),
        ("Python", str(m.get("python"))),
    ]
    if m.get("postgresql"):
        rows.append(("PostgreSQL", f"{m['postgresql']} ({m.get('database', '')})"))
    code = f"commit `{m.get('commit') or 'unknown'}`"
    if m.get("hub_code_modified"):
        code += " with uncommitted changes to `hub/`"
    rows.append(("code", code))
    return ["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)]


def markdown(report: Report, outcomes: list[WorkloadRun], command: str) -> str:
    """The suite's result as Markdown: machine, commands, medians, targets."""
    when = report.started_at.strftime("%Y-%m-%d %H:%M UTC")
    took = ((report.finished_at or report.started_at) - report.started_at).total_seconds()
    lines = [
        f"## Suite of {when}",
        "",
        f"`{command}`, {took:.0f} s in all; each workload in its own process, stopped "
        f"after {report.config['timeout_s']:g} s. Values are medians of each workload's "
        "runs (the JSON files hold every run).",
        "",
        *_machine_rows(report.machine),
        "",
        "| workload | command | status | time | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        result = f"`{Path(o.result_path).name}`" if o.result_path else ""
        status = o.status if o.status == "valid" else f"**{o.status}**"
        took_s = f"{o.seconds:.0f} s" if o.command else ""
        lines.append(f"| {o.name} | `{o.command}` | {status} | {took_s} | {result} |")
    targets = [(o, t) for o in outcomes if o.result for t in o.result.get("targets", [])]
    if targets:
        lines += ["", "| workload | target | measured | goal | |", "|" + " --- |" * 5]
        for o, t in targets:
            sign = ">=" if t.get("at_least", True) else "<="
            verdict = "met" if t.get("met") else "**MISSED**"
            lines.append(
                f"| {o.name} | {t['name']} | {_number(t.get('measured'))} "
                f"| {sign} {_number(t['goal'])} | {verdict} |"
            )
    for o in outcomes:
        lines += ["", f"### {o.name}", ""]
        if o.result is None:
            lines.append(f"{o.status}: " + "; ".join(o.notes or ["no result"]))
            if o.status in ("failed", "timeout") and o.output_tail:
                lines += ["", "Its last lines of output:", "", "```", *o.output_tail[-8:], "```"]
            continue
        runs = max((len(m.get("runs", [])) for m in o.result.get("metrics", [])), default=0)
        lines += [
            f"`{o.command}`, {o.result.get('duration_s')} s, {o.status}; medians of up to "
            f"{runs} runs.",
            "",
            "| metric | median | unit | runs |",
            "| --- | --- | --- | --- |",
        ]
        for m in o.result.get("metrics", []):
            each = ", ".join(_number(v) for v in m.get("runs", []))
            lines.append(f"| {m['name']} | **{_number(m.get('median'))}** | {m['unit']} | {each} |")
        notes = [n for n in o.result.get("notes", []) if not n.startswith("hub log:")]
        notes += o.notes
        if notes:
            lines.append("")
            lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
