"""Results of a workload: the metrics (each the median of several runs), written
as JSON under ``bench/results/`` and printed as a table.

A :class:`Report` holds everything needed to read a result later without the
terminal output: the machine, the configuration, every run's raw numbers, and
notes (for example, why a run was marked invalid).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .stats import median

__all__ = ["RESULTS_DIR", "Metric", "Report", "TargetCheck"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Metric:
    """One measured quantity: its value in each run, and what it means."""

    name: str
    unit: str
    runs: list[float]
    meaning: str = ""

    @property
    def median(self) -> float:
        return median(self.runs)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "median": _finite(self.median),
            "runs": [_finite(v) for v in self.runs],
            "meaning": self.meaning,
        }


@dataclass(frozen=True)
class TargetCheck:
    """A goal of the suite and whether this run met it: ``measured >= goal`` (or ``<=``)."""

    name: str
    measured: float
    goal: float
    at_least: bool = True  # False: the measured value must be at most the goal
    meaning: str = ""

    @property
    def met(self) -> bool:
        if math.isnan(self.measured):
            return False
        return self.measured >= self.goal if self.at_least else self.measured <= self.goal

    def describe(self) -> str:
        sign = ">=" if self.at_least else "<="
        verdict = "met" if self.met else "MISSED"
        return f"{self.name}: {_fmt(self.measured)} (goal {sign} {_fmt(self.goal)}): {verdict}"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "measured": _finite(self.measured),
            "goal": self.goal,
            "at_least": self.at_least,
            "met": self.met,
            "meaning": self.meaning,
        }


@dataclass
class Report:
    """The outcome of one workload run."""

    workload: str
    started_at: dt.datetime
    config: dict[str, Any]
    machine: dict[str, Any]
    metrics: list[Metric] = field(default_factory=list)
    targets: list[TargetCheck] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    valid: bool = True
    finished_at: dt.datetime | None = None

    def add(self, name: str, unit: str, runs: list[float], meaning: str = "") -> Metric:
        metric = Metric(name, unit, runs, meaning)
        self.metrics.append(metric)
        return metric

    def target(
        self, name: str, measured: float, goal: float, at_least: bool = True, meaning: str = ""
    ) -> TargetCheck:
        """Record a goal and the measured value it is judged on (a miss is not invalid)."""
        check = TargetCheck(name, measured, goal, at_least, meaning)
        self.targets.append(check)
        return check

    def invalid(self, why: str) -> None:
        """Mark the result invalid, saying why (printed and stored)."""
        self.valid = False
        self.notes.append("INVALID: " + why)

    def as_json(self) -> dict[str, Any]:
        finished = self.finished_at or dt.datetime.now(dt.UTC)
        return {
            "workload": self.workload,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "finished_at": finished.isoformat(timespec="seconds"),
            "duration_s": round((finished - self.started_at).total_seconds(), 1),
            "valid": self.valid,
            "machine": self.machine,
            "config": self.config,
            "metrics": [m.as_json() for m in self.metrics],
            "targets": [t.as_json() for t in self.targets],
            "details": self.details,
            "notes": self.notes,
        }

    def write(self, directory: Path = RESULTS_DIR) -> Path:
        """Write the JSON file ``<workload>-<UTC time>.json``; its path."""
        directory.mkdir(parents=True, exist_ok=True)
        stamp = self.started_at.strftime("%Y%m%dT%H%M%SZ")
        path = directory / f"{self.workload}-{stamp}.json"
        path.write_bytes(orjson.dumps(self.as_json(), option=orjson.OPT_INDENT_2))
        return path

    def table(self) -> str:
        """The metrics as a plain-text table: median, unit, then each run."""
        rows = [("metric", "median", "unit", "runs")]
        for m in self.metrics:
            rows.append((m.name, _fmt(m.median), m.unit, "  ".join(_fmt(v) for v in m.runs)))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = []
        for i, row in enumerate(rows):
            lines.append(
                "  ".join(cell.ljust(widths[j]) if j < 3 else cell for j, cell in enumerate(row))
            )
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  ----")
        status = "valid" if self.valid else "INVALID"
        code = self.machine.get("commit") or "unknown commit"
        if self.machine.get("hub_code_modified"):
            code += " + uncommitted changes to hub/"
        head = f"== {self.workload} ({status}), code at {code} =="
        tail = [f"  target {t.describe()}" for t in self.targets]
        tail += [f"  note: {n}" for n in self.notes]
        return "\n".join([head, *lines, *tail])


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"
