"""CPU-seconds used by groups of processes over a phase, read with psutil.

A group is a list of processes, each counted alone or with all its
descendants (a PostgreSQL server is its postmaster and every backend). Trees
are walked again at each reading, so backends that open during a phase are
counted from zero; a process that ends within the phase loses what it used
since the start reading (the servers here keep their processes for the run).

Each sample also holds the whole machine's busy CPU time, so that the load of
processes outside the groups (anything else running on the machine) shows up
as ``other`` and a noisy measurement can be told from a quiet one.

A PostgreSQL server is named by its postmaster's pid (see
:class:`bench.database.Database`), Redis by the TCP port it listens on, so the
machine's servers and throwaway ones are measured alike.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import psutil

__all__ = ["CpuMeter", "CpuSample", "Group", "listener_pid", "postgres_group"]


def listener_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` (any local address), if any."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            return c.pid
    return None


# A PostgreSQL client backend's process title: "postgres: [cluster: ]user db host(port) state"
# or "... user db [local] state".
BACKEND_TITLE = re.compile(r"^postgres: (?:\S+: )?\S+ (\S+) (?:\S+\(\d+\)|\[local\])")


@dataclass(frozen=True)
class Group:
    """Processes measured together; with ``descendants``, each one's whole tree.

    ``database``: of the descendants that are PostgreSQL client backends, only
    those connected to this database count (the server's own processes, like
    the WAL writer and checkpointer, always do). Other databases' sessions on
    a shared server are someone else's load.
    """

    pids: tuple[int, ...]
    descendants: bool = False
    database: str | None = None

    @classmethod
    def of(
        cls, pids: Iterable[int | None], descendants: bool = False, database: str | None = None
    ) -> Group:
        return cls(tuple(p for p in pids if p), descendants, database)


def postgres_group(postmaster: int | None, database: str) -> Group:
    """A PostgreSQL server (its postmaster's pid), counting only ``database``'s sessions."""
    return Group.of([postmaster], descendants=True, database=database)


def _belongs(proc: psutil.Process, database: str | None) -> bool:
    if database is None:
        return True
    try:
        title = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    match = BACKEND_TITLE.match(title)
    return match is None or match.group(1) == database


def _processes(group: Group) -> list[psutil.Process]:
    found = []
    for pid in group.pids:
        try:
            root = psutil.Process(pid)
            found.append(root)
            if group.descendants:
                found.extend(
                    p for p in root.children(recursive=True) if _belongs(p, group.database)
                )
        except psutil.NoSuchProcess:
            continue
    return found


def _cpu_by_process(group: Group) -> dict[tuple[int, float], float]:
    """(pid, create time) -> user + system CPU-seconds of each process of the group."""
    out: dict[tuple[int, float], float] = {}
    for proc in _processes(group):
        try:
            with proc.oneshot():
                t = proc.cpu_times()
                out[(proc.pid, proc.create_time())] = t.user + t.system
        except psutil.Error:
            continue
    return out


def _machine_busy_s() -> float:
    # Time the machine spent running processes. Interrupt time is left out: on
    # Linux much of the loopback traffic of the measured processes is handled
    # there and charged to no process. Guest time is already part of user time.
    t = psutil.cpu_times()
    return sum(getattr(t, name, 0.0) for name in ("user", "nice", "system"))


@dataclass
class CpuSample:
    """CPU-seconds per group over one phase, the machine's busy time, and wall time."""

    wall_s: float
    cpu_s: dict[str, float] = field(default_factory=dict)
    machine_busy_s: float = 0.0

    def total(self, *groups: str) -> float:
        return sum(self.cpu_s.get(g, 0.0) for g in groups)

    def share(self, group: str) -> float:
        """Cores used on average by ``group`` over the phase (1.0 = one full core)."""
        return self.cpu_s.get(group, 0.0) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def other_cores(self) -> float:
        """Cores used by processes outside every group (other work on the machine)."""
        if self.wall_s <= 0:
            return 0.0
        return max(0.0, self.machine_busy_s - sum(self.cpu_s.values())) / self.wall_s

    def as_json(self) -> dict[str, float]:
        return {
            "wall_s": round(self.wall_s, 3),
            **{f"{k}_cpu_s": round(v, 3) for k, v in self.cpu_s.items()},
            "other_cores": round(self.other_cores, 3),
        }


class CpuMeter:
    """Reads the CPU time of named process groups; ``start()``, then ``stop()``."""

    def __init__(self, groups: Mapping[str, Group]) -> None:
        self.groups = dict(groups)
        self._start: dict[str, dict[tuple[int, float], float]] = {}
        self._busy0 = 0.0
        self._t0 = 0.0

    def start(self) -> None:
        self._start = {name: _cpu_by_process(g) for name, g in self.groups.items()}
        self._busy0 = _machine_busy_s()
        self._t0 = time.perf_counter()

    def stop(self) -> CpuSample:
        wall = time.perf_counter() - self._t0
        busy = _machine_busy_s() - self._busy0
        sample = CpuSample(wall, machine_busy_s=busy)
        for name, group in self.groups.items():
            before = self._start.get(name, {})
            now = _cpu_by_process(group)
            sample.cpu_s[name] = sum(v - before.get(k, 0.0) for k, v in now.items())
        return sample
