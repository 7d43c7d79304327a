"""``python -m bench <workload> [options]`` (what ``scripts/bench`` runs).

Runs one workload, writes its result as JSON under ``bench/results/`` and
prints it as a table. ``--help`` lists the workloads; ``<workload> --help``
their options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import fanout, idle, push, slow, storage, storm, suite
from .report import Report

Runner = Callable[[argparse.Namespace], Report]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmarks of the hub. Each workload starts the servers it needs, "
        "measures several runs, prints the medians and writes the result as JSON to "
        "bench/results/.",
    )
    sub = top.add_subparsers(dest="workload", required=True, metavar="WORKLOAD")
    workloads: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Runner]] = [
        (
            "w4",
            "durable push over HTTP: changes/s and ack latency of 1-, 10- and 1000-change "
            "pushes, 64 concurrent clients, next to the bare PostgreSQL unnest-upsert and "
            "COPY ceilings; every acked change pulled back and checked",
            push.add_arguments,
            push.run,
        ),
        ("push", "the w4 workload under its former name", push.add_arguments, push.run),
        (
            "storage",
            "PostgreSQL CPU per push of the store's batches (w2's shape), with and without "
            "idempotency receipts, in alternating runs",
            storage.add_arguments,
            storage.run,
        ),
        (
            "suite",
            "w1 to w6 one after another, each in its own process (at most 90 s each, "
            "--only to pick), and one summary as JSON and Markdown",
            suite.add_arguments,
            suite.run,
        ),
        (
            "relay",
            "WebSocket fan-out through the bare Starlette relay: saturation deliveries/s, "
            "latency at half load, deliveries per server CPU-second",
            fanout.add_relay_arguments,
            fanout.run_relay,
        ),
        (
            "fanout",
            "the relay workload's phases against a real hub and the bare relay in one run, "
            "with correctness checks and the hub/relay ratio",
            fanout.add_fanout_arguments,
            fanout.run_fanout,
        ),
        (
            "w2",
            "same-user fan-out on one process (250 users x 4 devices): the hub beside the bare "
            "starlette and websockets relays, python-socketio and Node socket.io with Redis",
            fanout.add_w2_arguments,
            fanout.run_w2,
        ),
        (
            "w3",
            "the w2 fan-out on two processes through Redis, each user's devices split "
            "between them: the hub (and its ratio to one process) and both peers",
            fanout.add_w3_arguments,
            fanout.run_w3,
        ),
        (
            "w1",
            "idle capacity: RSS per authenticated idle connection, connect rate and p99, "
            "up to 19,800 connections on one hub process, next to both bare relays",
            idle.add_arguments,
            idle.run,
        ),
        (
            "w5",
            "reconnect storm: 2,000 devices drop, 10,000 changes happen, all reconnect at once; "
            "time until every replica holds the server's state, database load, every replica "
            "checked",
            storm.add_arguments,
            storm.run,
        ),
        (
            "w6",
            "slow consumer: one device stops reading under fan-out load; the hub's memory stays "
            "bounded, the device is closed with 1013 and the other devices' p99 does not move",
            slow.add_arguments,
            slow.run,
        ),
    ]
    for name, help_text, add_arguments, runner in workloads:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=runner)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    report: Report = args.run(args)
    path = report.write()
    print(report.table())
    print(f"result: {path}")
    return 0 if report.valid else 1


if __name__ == "__main__":
    sys.exit(main())
