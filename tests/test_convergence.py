"""Convergence under faults: K devices (the Python client) making random
upserts and deletes through two real hub processes, with change events
dropped, duplicated and reordered on the way in, and devices going offline
and coming back. After quiescence every device's replica equals the hub's.

A hypothesis state machine drives it; each example is a fresh user."""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)
from support import HubProcess, new_user, server_state, spawn_hub, token_for

from hub.client import HubClient

DEVICES = 3
RECORDS = ("a", "b", "c")
FIELDS = ("title", "done")
SYNC_TIMEOUT_S = 30.0

HUBS: list[HubProcess] = []


class FaultyClient(HubClient):
    """A client whose incoming change events are sometimes dropped, duplicated
    or held back and delivered after the next one (reordered)."""

    def __init__(self, *args: Any, rng: random.Random, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rng = rng
        self.faults = True
        self.held: tuple[Any, Any, Any] | None = None
        self.injected = {"dropped": 0, "duplicated": 0, "reordered": 0}

    async def _on_message(self, ws: Any, raw: Any, helpers: Any) -> None:
        if not self.faults or _kind(raw) != "change":
            await super()._on_message(ws, raw, helpers)
            return
        roll = self.rng.random()
        if roll < 0.2:
            self.injected["dropped"] += 1
            return
        if roll < 0.3:
            self.injected["duplicated"] += 1
            await super()._on_message(ws, raw, helpers)
        elif roll < 0.4 and self.held is None:
            self.injected["reordered"] += 1
            self.held = (ws, raw, helpers)
            return
        await super()._on_message(ws, raw, helpers)
        if self.held is not None:
            held, self.held = self.held, None
            await super()._on_message(*held)

    async def release_held(self) -> None:
        """Deliver an event still held back for reordering."""
        if self.held is not None:
            held, self.held = self.held, None
            await super()._on_message(*held)


def _kind(raw: str | bytes) -> object:
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return message.get("type") if isinstance(message, dict) else None


class Convergence(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.user = new_user()
        self.dir = Path(tempfile.mkdtemp(prefix="hubconv-"))
        self.clients: list[FaultyClient | None] = [None] * DEVICES
        self.counter = 0
        self.totals = {"dropped": 0, "duplicated": 0, "reordered": 0, "writes": 0}

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, SYNC_TIMEOUT_S))

    def client(self, i: int, seed: int) -> FaultyClient:
        # Devices start on different hubs; each falls over to the other.
        urls = [HUBS[i % 2].url, HUBS[(i + 1) % 2].url]
        return FaultyClient(
            urls,
            token_for(self.user, ttl_s=3600),
            f"dev{i}",
            data_path=self.dir / f"dev{i}.db",
            rng=random.Random(seed),
        )

    @initialize(seeds=st.lists(st.integers(0, 2**32), min_size=DEVICES, max_size=DEVICES))
    def start(self, seeds: list[int]) -> None:
        self.seeds = seeds
        for i in range(DEVICES):
            self.clients[i] = self.client(i, seeds[i])
            self.run(self.clients[i].start())

    def online(self) -> list[int]:
        return [i for i, c in enumerate(self.clients) if c is not None]

    @rule(
        device=st.integers(0, DEVICES - 1),
        record=st.sampled_from(RECORDS),
        field=st.sampled_from(FIELDS),
        value=st.integers(0, 5),
    )
    def upsert(self, device: int, record: str, field: str, value: int) -> None:
        # Offline devices write too: the change waits in their outbox.
        c = self.clients[device] or self._offline_writer(device)
        self.run(c.upsert("todos", record, **{field: value}))
        self.totals["writes"] += 1
        if self.clients[device] is None:
            self.run(c.close())

    @rule(device=st.integers(0, DEVICES - 1), record=st.sampled_from(RECORDS))
    def delete(self, device: int, record: str) -> None:
        c = self.clients[device] or self._offline_writer(device)
        self.run(c.delete("todos", record))
        self.totals["writes"] += 1
        if self.clients[device] is None:
            self.run(c.close())

    def _offline_writer(self, device: int) -> FaultyClient:
        """The device's client on its own data file, never connecting (no hub)."""
        c = FaultyClient(
            ["http://127.0.0.1:9"],  # a closed port: offline
            token_for(self.user),
            f"dev{device}",
            data_path=self.dir / f"dev{device}.db",
            rng=random.Random(0),
        )
        self.run(c.start())
        return c

    @precondition(lambda self: len(self.online()) > 1)
    @rule(device=st.integers(0, DEVICES - 1))
    def go_offline(self, device: int) -> None:
        c = self.clients[device]
        if c is not None:
            self._count(c)
            self.run(c.close())
            self.clients[device] = None

    @rule(device=st.integers(0, DEVICES - 1))
    def come_back(self, device: int) -> None:
        if self.clients[device] is None:
            self.counter += 1
            c = self.client(device, self.seeds[device] + self.counter)
            self.run(c.start())
            self.clients[device] = c

    def _count(self, c: FaultyClient) -> None:
        for k, v in c.injected.items():
            self.totals[k] += v

    def teardown(self) -> None:
        try:
            # Quiescence. Offline devices come back; the others stay connected,
            # so what they missed must be noticed from the events themselves:
            # one more write (with faults off) reaches every device, and its
            # `prev` shows a device any gap it has; it pulls.
            for i in range(DEVICES):
                if self.clients[i] is None:
                    self.come_back(i)
            for c in self.clients:
                assert c is not None
                c.faults = False
                self.run(c.release_held())
            self.run(self.clients[0].upsert("probe", "p", n=self.totals["writes"]))  # type: ignore[union-attr]
            truth = self.run(self._settled())
            for i, c in enumerate(self.clients):
                assert c is not None
                assert live(c.state()) == live(truth), f"device {i} differs from the hub"
            for c in self.clients:
                assert c is not None
                self._count(c)
            STATS.append(dict(self.totals))
        finally:
            for c in self.clients:
                if c is not None:
                    self.run(c.close())
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    async def _settled(self) -> dict[Any, Any]:
        """Wait until every device holds the hub's state (bounded by the caller)."""
        while True:
            for c in self.clients:
                assert c is not None
                await c.synced(SYNC_TIMEOUT_S)
            truth = await server_state(HUBS[0], self.user)
            if all(live(c.state()) == live(truth) for c in self.clients if c is not None):
                return truth
            await asyncio.sleep(0.05)


def live(state: dict[Any, Any]) -> dict[Any, Any]:
    """Records that hold something: visible fields or a delete stamp."""
    return {k: v for k, v in state.items() if v[0] or v[1] is not None}


STATS: list[dict[str, int]] = []


@pytest.fixture(scope="module")
def hubs(tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str):
    env = {"HUB_DATABASE_URL": database_url, "HUB_REDIS_URL": redis_url}
    started = [spawn_hub(env, tmp_path_factory.mktemp(f"hub{i}")) for i in range(2)]
    HUBS[:] = started
    yield started
    for hub in started:
        hub.stop()
    HUBS.clear()


def test_devices_converge_through_dropped_duplicated_reordered_events(hubs) -> None:
    STATS.clear()
    run_state_machine_as_test(
        Convergence,
        settings=settings(
            max_examples=15,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    faults = {k: sum(s[k] for s in STATS) for k in ("dropped", "duplicated", "reordered")}
    writes = sum(s["writes"] for s in STATS)
    print(f"CONVERGENCE examples={len(STATS)} writes={writes} faults={faults}")
    assert writes > 0
