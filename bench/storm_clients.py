"""The clients of the reconnect storm (``w5``): ``python -m bench.storm_clients``.

One process plays one of two roles (the first line of its stdin says which):

- ``devices``: WebSocket devices, each holding a replica (:class:`hub.merge.Replica`)
  and a cursor. A device catches up the way PROTOCOL.md tells a client to: on
  ``welcome`` it pulls from its cursor (the WS ``pull`` message), page after
  page until ``has_more`` is false, while it applies every ``change`` event
  that arrives meanwhile. It tracks ``have``, the version up to which it holds
  every change (the last page's ``version``, then each event whose ``prev``
  it already has), and when ``have`` rose, so the time a device caught up
  with its user's final version is known afterwards. A gap it cannot close
  (an event whose ``prev`` it never got) makes it pull again.
- ``pusher``: another device of the same users, pushing over HTTP
  (``POST /v1/sync/push``, :mod:`bench.http_client`): the seed, the changes made
  while the devices are away, and the live changes during the storm. It
  reports each user's last version.

Checks: a ``change`` event whose version a device already got is a duplicate;
a delta repeated within one paged pull is a repeat; ``verify`` pulls each
user's whole state from ``0`` and compares every device's replica with it
(a difference is a lost change). Commands and answers: :mod:`bench.worker`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
import uvloop

from hub.auth import make_token
from hub.hlc import Clock
from hub.merge import Replica
from hub.types import Delta

from .http_client import HttpConnection
from .loadgen import Connection, _connect_picows
from .worker import cpu_s, say, stdin_lines

__all__ = ["main"]

COLLECTION = "notes"
OFFLINE_RECORDS = 8  # records per user the offline changes cycle over
DELETE_EVERY = 13  # every 13th offline change is a delete (tombstones travel too)


def delta_of(raw: dict[str, Any]) -> Delta:
    """A record delta in its wire form, as :class:`hub.types.Delta`."""
    return Delta(
        collection=raw["collection"],
        record_id=raw["id"],
        version=int(raw["version"]),
        device=raw.get("device"),
        fields={name: (f["value"], f["hlc"]) for name, f in (raw.get("fields") or {}).items()},
        deleted=bool(raw.get("deleted")),
        deleted_hlc=raw.get("deleted_hlc"),
        origin=raw.get("origin"),
        actor=raw.get("actor"),
    )


# -- devices ------------------------------------------------------------------------


@dataclass(eq=False)
class Device:
    user: str
    name: str
    conn: Connection | None = None
    replica: Replica = field(default_factory=Replica)
    cursor: str | int = 0
    have: int = 0
    history: list[tuple[int, int]] = field(default_factory=list)  # (monotonic ns, have)
    pending: dict[int, int] = field(default_factory=dict)  # event version -> its prev
    seen: set[int] = field(default_factory=set)  # event versions received
    duplicates: int = 0
    repeats: int = 0  # deltas repeated within one paged pull
    repulls: int = 0
    pulls: int = 0
    pulling: bool = False
    welcomed: bool = False
    pull_wanted: bool = False
    early_events: int = 0
    page_keys: set[tuple[str, str, int]] = field(default_factory=set)
    synced: asyncio.Future[None] | None = None  # the first catch-up pull of a connection
    closed: asyncio.Future[int | None] | None = None
    verify: asyncio.Future[dict[str, Any]] | None = None
    verify_pages: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Devices:
    def __init__(self, config: dict[str, Any]) -> None:
        self.ws_url: str = config["ws_url"]
        self.secret: str = config["jwt_secret"]
        self.page_limit: int = config.get("page_limit", 500)
        self.devices = [
            Device(user, f"dev{d}") for user in config["users"] for d in range(config["devices"])
        ]
        self.by_user: dict[str, list[Device]] = {}
        for device in self.devices:
            self.by_user.setdefault(device.user, []).append(device)
        self.headers = {
            user: {"Authorization": f"Bearer {make_token(self.secret, user, ttl_s=3600)}"}
            for user in self.by_user
        }
        self.error_count = 0

    # -- receiving ---------------------------------------------------------------

    def on_message(self, device: Device, payload: bytes) -> None:
        msg = orjson.loads(payload)
        kind = msg.get("type")
        if kind == "change":
            if not device.welcomed:
                device.early_events += 1  # sent before the connection's welcome
            version, prev = int(msg["version"]), int(msg["prev"])
            if version in device.seen:
                device.duplicates += 1
                return
            device.seen.add(version)
            for raw in msg["changes"]:
                device.replica.apply_delta(delta_of(raw))
            if version > device.have:
                device.pending[version] = prev
                self._advance(device)
        elif kind == "changes":
            if msg.get("id", "").startswith("v-"):
                self._verify_page(device, msg)
            else:
                self._page(device, msg)
        elif kind == "welcome":
            device.welcomed = True
            if not device.pulling:
                self._pull(device)
        elif kind == "sync_available":
            if not device.pulling:
                self._pull(device)
        else:
            self.error_count += 1
            if len(device.errors) < 3:
                device.errors.append(payload.decode(errors="replace")[:200])

    def _advance(self, device: Device) -> None:
        """Raise ``have`` over every event that continues it; pull when a gap stays."""
        before = device.have
        moved = True
        while moved and device.pending:
            moved = False
            for version, prev in list(device.pending.items()):
                if version <= device.have:
                    del device.pending[version]
                elif prev <= device.have:
                    device.have = version
                    del device.pending[version]
                    moved = True
        if device.have > before:
            device.history.append((time.monotonic_ns(), device.have))
        if device.pending and not device.pulling:
            device.repulls += 1  # an event whose prev never came: pull the gap
            self._pull(device)

    def _pull(self, device: Device, cursor: str | int | None = None) -> None:
        if device.conn is None:
            # The welcome (or an event) can arrive before the connector returns the
            # connection: pull as soon as it has.
            device.pull_wanted = True
            return
        if cursor is None:
            device.page_keys = set()
            cursor = device.cursor
        device.pulling = True
        device.pulls += 1
        self._send(
            device,
            {"type": "pull", "id": f"p-{device.pulls}", "since": cursor, "limit": self.page_limit},
        )

    def _page(self, device: Device, msg: dict[str, Any]) -> None:
        for raw in msg["changes"]:
            key = (raw["collection"], raw["id"], int(raw["version"]))
            if key in device.page_keys:
                device.repeats += 1
            device.page_keys.add(key)
            device.replica.apply_delta(delta_of(raw))
        if msg["has_more"]:
            self._pull(device, msg["cursor"])
            return
        device.cursor = msg["cursor"]
        device.pulling = False
        if int(msg["version"]) > device.have:
            device.have = int(msg["version"])
            device.history.append((time.monotonic_ns(), device.have))
        self._advance(device)
        if device.synced is not None and not device.synced.done():
            device.synced.set_result(None)

    def _send(self, device: Device, message: dict[str, Any]) -> None:
        assert device.conn is not None
        device.conn.send(orjson.dumps(message))

    def _on_closed(self, device: Device, code: int | None) -> None:
        if device.closed is not None and not device.closed.done():
            device.closed.set_result(code)

    # -- commands ----------------------------------------------------------------

    async def connect(self, concurrency: int, timeout: float) -> dict[str, Any]:
        """Connect every device and let each catch up; bounded by ``timeout``."""
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(concurrency)
        errors: list[str] = []
        connect_ns: list[int] = []

        async def one(device: Device) -> None:
            async with gate:
                device.synced = loop.create_future()
                device.closed = loop.create_future()
                t0 = time.perf_counter_ns()
                try:
                    device.conn = await _connect_picows(
                        f"{self.ws_url}?device={device.name}",
                        self.headers[device.user],
                        lambda payload: self.on_message(device, payload),
                        lambda code: self._on_closed(device, code),
                    )
                except Exception as exc:  # counted; the orchestrator judges the run on it
                    if len(errors) < 5:
                        errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    return
                connect_ns.append(time.perf_counter_ns() - t0)
                if device.pull_wanted and not device.pulling:
                    device.pull_wanted = False
                    self._pull(device)
            await device.synced  # outside the gate: the catch-up runs concurrently

        cpu0 = cpu_s()
        tasks = [asyncio.ensure_future(one(d)) for d in self.devices]
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        return {
            "devices": len(self.devices),
            "connected": len(connect_ns),
            "synced": sum(
                1
                for d in self.devices
                if d.synced is not None and d.synced.done() and not d.synced.cancelled()
            ),
            "first_errors": errors,
            "connect_ms": sorted(n / 1e6 for n in connect_ns),
            "cpu_s": cpu_s() - cpu0,
        }

    async def drop(self, timeout: float) -> dict[str, Any]:
        """Close every connection (1000) and wait until each is gone."""
        for device in self.devices:
            if device.conn is not None:
                device.conn.close()
        waits = [d.closed for d in self.devices if d.closed is not None]
        if waits:
            await asyncio.wait(waits, timeout=timeout)
        for device in self.devices:
            device.conn = None
            device.synced = None
            device.pulling = device.welcomed = device.pull_wanted = False
        return {"closed": sum(1 for w in waits if w.done())}

    async def storm(self, at: float, timeout: float) -> dict[str, Any]:
        """At monotonic time ``at``, every device reconnects at once and catches up."""
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        result = await self.connect(concurrency=len(self.devices), timeout=timeout)
        return result

    async def settle(
        self, backlog: dict[str, int], final: dict[str, int], at: float, timeout: float
    ) -> dict[str, Any]:
        """Wait (bounded) until every device has its user's final version; report when
        each got its user's ``backlog`` version (the one at the reconnect instant) and
        its final one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(d.have >= final.get(d.user, 0) for d in self.devices):
                break
            await asyncio.sleep(0.02)
        at_ns = int(at * 1e9)
        out: dict[str, Any] = {"users": len(self.by_user)}
        for name, goals in (("backlog", backlog), ("final", final)):
            times_ms: list[float] = []
            for device in self.devices:
                goal = goals.get(device.user, 0)
                when = next((t for t, have in device.history if have >= goal), None)
                if when is not None and device.have >= goal:
                    times_ms.append(max(0, when - at_ns) / 1e6)
            out[f"{name}_ms"] = sorted(times_ms)
            out[f"{name}_behind"] = len(self.devices) - len(times_ms)
        out["pulls"] = sum(d.pulls for d in self.devices)
        out["repulls"] = sum(d.repulls for d in self.devices)
        out["early_events"] = sum(d.early_events for d in self.devices)
        return out

    async def verify(self, timeout: float) -> dict[str, Any]:
        """Pull each user's whole state from 0; compare every device's replica with it."""
        loop = asyncio.get_running_loop()
        waits = []
        for devices in self.by_user.values():
            reader = devices[0]
            reader.verify = loop.create_future()
            reader.verify_pages = []
            self._send(reader, {"type": "pull", "id": "v-0", "since": 0, "limit": 5000})
            waits.append(reader.verify)
        _, pending = await asyncio.wait(waits, timeout=timeout)
        diverged = differing = 0
        for devices in self.by_user.values():
            reader = devices[0]
            if reader.verify is None or not reader.verify.done():
                diverged += len(devices)
                continue
            server = Replica()
            for page in reader.verify_pages:
                for raw in page["changes"]:
                    server.apply_delta(delta_of(raw))
            truth = server.state()
            for device in devices:
                state = device.replica.state()
                if state != truth:
                    diverged += 1
                    keys = set(state) | set(truth)
                    differing += sum(1 for k in keys if state.get(k) != truth.get(k))
        return {
            "users": len(self.by_user),
            "users_unverified": len(pending),
            "devices": len(self.devices),
            "diverged_devices": diverged,
            "differing_records": differing,
            "duplicate_events": sum(d.duplicates for d in self.devices),
            "repeated_deltas": sum(d.repeats for d in self.devices),
            "errors": self.error_count,
            "first_errors": [e for d in self.devices for e in d.errors][:5],
            "closed_early": sum(
                1 for d in self.devices if d.closed is not None and d.closed.done()
            ),
            "records_per_user": len(truth) if self.by_user else 0,
        }

    def _verify_page(self, device: Device, msg: dict[str, Any]) -> None:
        device.verify_pages.append(msg)
        if msg["has_more"]:
            self._send(
                device,
                {
                    "type": "pull",
                    "id": f"v-{len(device.verify_pages)}",
                    "since": msg["cursor"],
                    "limit": 5000,
                },
            )
        elif device.verify is not None and not device.verify.done():
            device.verify.set_result(msg)

    def close(self) -> None:
        for device in self.devices:
            if device.conn is not None:
                device.conn.close()


# -- the pusher ---------------------------------------------------------------------


class Pusher:
    """Another device of every user, pushing over HTTP on ``connections`` keep-alive connections."""

    def __init__(self, config: dict[str, Any]) -> None:
        url = urlsplit(config["http_url"])
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.users: list[str] = config["users"]
        self.connections: int = config.get("connections", 32)
        secret = config["jwt_secret"]
        self.headers = {
            user: {
                "Authorization": f"Bearer {make_token(secret, user, ttl_s=3600)}",
                "Content-Type": "application/json",
            }
            for user in self.users
        }
        self.clock = Clock("pusher")
        self.final: dict[str, int] = {}
        self.counts: dict[str, int] = {}  # offline changes made per user so far
        self.failures: list[str] = []
        self.failed = 0

    def _change(self, user: str, kind: str) -> dict[str, Any]:
        i = self.counts.get(user, 0)
        self.counts[user] = i + 1
        stamp = self.clock.now()
        if kind == "seed":
            return {
                "collection": COLLECTION,
                "id": f"s{i}",
                "op": "upsert",
                "fields": {
                    "title": {"value": f"seed {i}", "hlc": stamp},
                    "n": {"value": i, "hlc": stamp},
                },
            }
        record = f"{kind}{i % OFFLINE_RECORDS}"
        if kind == "r" and i % DELETE_EVERY == DELETE_EVERY - 1:
            return {"collection": COLLECTION, "id": record, "op": "delete", "hlc": stamp}
        return {
            "collection": COLLECTION,
            "id": record,
            "op": "upsert",
            "fields": {"n": {"value": i, "hlc": stamp}, "by": {"value": kind, "hlc": stamp}},
        }

    async def _push(self, conn: HttpConnection, user: str, changes: list[dict[str, Any]]) -> None:
        body = orjson.dumps({"device": "pusher", "changes": changes})
        headers = {**self.headers[user], "Idempotency-Key": secrets.token_hex(12)}
        try:
            status, answer = await asyncio.wait_for(
                conn.request("POST", "/v1/sync/push", headers, body), 30
            )
        except (ConnectionError, TimeoutError) as exc:
            status, answer = 0, str(exc).encode()
        if status != 200:
            self.failed += 1
            if len(self.failures) < 5:
                self.failures.append(f"{status}: {answer[:200]!r}")
            return
        version = int(orjson.loads(answer)["version"])
        if version > self.final.get(user, 0):
            self.final[user] = version

    async def run(
        self, per_user: int, kind: str, per_push: int, at: float | None = None, seconds: float = 0.0
    ) -> dict[str, Any]:
        """``per_user`` changes for every user, ``per_push`` to a push; when ``seconds``,
        spread evenly over that time from monotonic time ``at``."""
        lanes = [self.users[j :: self.connections] for j in range(self.connections)]
        lanes = [lane for lane in lanes if lane]
        if at is not None:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
        start = time.monotonic()
        pushes = -(-per_user // per_push)

        async def lane(users: list[str]) -> int:
            conn = await HttpConnection.open(self.host, self.port)
            sent = 0
            total = pushes * len(users)
            try:
                for k in range(pushes):
                    for user in users:
                        if seconds:
                            due = start + seconds * sent / total
                            await asyncio.sleep(max(0.0, due - time.monotonic()))
                        n = min(per_push, per_user - k * per_push)
                        await self._push(conn, user, [self._change(user, kind) for _ in range(n)])
                        sent += 1
            finally:
                conn.close()
            return sent

        cpu0 = cpu_s()
        sent = sum(await asyncio.gather(*(lane(users) for users in lanes)))
        elapsed = time.monotonic() - start
        return {
            "pushes": sent,
            "changes": per_user * len(self.users),
            "seconds": elapsed,
            "failed": self.failed,
            "first_failures": self.failures,
            "final": self.final,
            "cpu_s": cpu_s() - cpu0,
        }


# -- the process --------------------------------------------------------------------


async def _serve() -> None:
    stdin = await stdin_lines()
    config = orjson.loads(await stdin.readline())
    devices = Devices(config) if config["role"] == "devices" else None
    pusher = Pusher(config) if config["role"] == "pusher" else None
    say({"event": "loaded"})
    try:
        for _ in range(1000):  # commands; the orchestrator sends a handful
            line = await stdin.readline()
            if not line:
                return
            c = orjson.loads(line)
            cmd = c["cmd"]
            if cmd == "quit":
                return
            if devices is not None and cmd == "connect":
                result = await devices.connect(c.get("concurrency", 200), c["timeout"])
            elif devices is not None and cmd == "drop":
                result = await devices.drop(c["timeout"])
            elif devices is not None and cmd == "storm":
                result = await devices.storm(c["at"], c["timeout"])
            elif devices is not None and cmd == "settle":
                result = await devices.settle(c["backlog"], c["final"], c["at"], c["timeout"])
            elif devices is not None and cmd == "verify":
                result = await devices.verify(c["timeout"])
            elif pusher is not None and cmd == "push":
                result = await pusher.run(
                    c["per_user"],
                    c["kind"],
                    c.get("per_push", 1),
                    c.get("at"),
                    c.get("seconds", 0.0),
                )
            else:
                raise ValueError(f"unknown command {cmd!r} for this role")
            say({"event": "result", **result})
    finally:
        if devices is not None:
            devices.close()
            await asyncio.sleep(0.1)  # let the close frames go out


def main() -> None:
    uvloop.run(_serve())


if __name__ == "__main__":
    main()
