"""The Python client of the hub: a local replica that works offline and syncs
over the WebSocket of PROTOCOL.md.

What lives here:

- :class:`HubClient`, the asyncio client. Applications write with ``upsert``
  and ``delete``, read with ``get``, ``records`` and ``state``, and hear of
  every change through ``changes()`` or ``on_change``.
- :func:`reconnect_plan`, the pure rule for what to do when a connection
  ends: the close code's meaning, full-jitter backoff, the 1012 hint.
- :class:`LocalFile`, the device's SQLite file: replica, cursor, outbox, the
  clock's last stamp.

What it guarantees:

- A change is in the local file once ``upsert``/``delete`` returns: it
  survives a crash or a restart and is pushed when a hub is reachable,
  retried with the same message id (the hub's idempotency key) until acked.
  Only an ack removes it from the outbox, or a refusal that retrying cannot
  fix (reported to ``on_error``, and undone locally by a full resync).
- The replica is merged with :mod:`hub.merge`, so it converges with the hub
  and every replica that applied the same changes. Stamps come from a
  :class:`hub.hlc.Clock` restored from its last stamp, so they never go
  backwards across restarts.
- The cursor is stored in the transaction that stores the deltas it covers,
  and a restarted client resumes from it. A missed event (``prev`` is not the
  last version seen) or ``sync_available`` makes the client pull;
  ``reset_required`` makes it resync from 0 with its unacked changes on top.
- SQLite work runs on one thread of the client's own, in the order it was
  submitted, so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from . import protocol
from .errors import HubError, PayloadTooLarge
from .hlc import Clock
from .merge import RecordState, Replica, apply_delete, apply_upsert
from .protocol import (
    WS_1012_RESTARTING,
    WS_1013_TOO_SLOW,
    WS_4001_UNAUTHENTICATED,
    WS_4003_FORBIDDEN,
    WS_4008_RATE_LIMITED,
    WS_4009_TOO_MANY_CONNECTIONS,
    WS_4010_TOKEN_EXPIRED,
)
from .types import Delta

__all__ = [
    "ChangesOverflow",
    "ClientClosed",
    "ClientError",
    "Credential",
    "DataFileError",
    "HubClient",
    "LocalFile",
    "PushRejected",
    "Reconnect",
    "RecordUpdate",
    "Stopped",
    "reconnect_plan",
]

log = logging.getLogger("hub.client")

Credential = str | Callable[[], str | Awaitable[str]]
"""A JWT or API key, or a function (sync or async) that returns a fresh one."""

Key = tuple[str, str]  # (collection, record id)
T = TypeVar("T")

PUSH_BATCH_CHANGES = 200
PUSH_BATCH_BYTES = 256 * 1024
MAX_CHANGE_BYTES = 1024 * 1024 - 4096  # one change must fit a 1 MiB push message
PUSHES_IN_FLIGHT = 16  # the hub allows 64 per connection
PULL_LIMIT = 500
REQUEST_TIMEOUT_S = 30.0
GAP_GRACE_S = 1.0
REFRESH_MIN_INTERVAL_S = 15.0
# Kept in the file with a refusal, until a resync from 0 has undone it here.
RESYNC_WANTED = {"resync": "1"}
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
MAX_ATTEMPT = 16  # beyond it the backoff is at its cap anyway
RESTART_HINT_RE = re.compile(r"reconnect in ([0-9]+(?:\.[0-9]+)?) ?s")
# Push errors that a later retry of the same push can get past.
RETRYABLE_PUSH_ERRORS = frozenset({"rate_limited", "unavailable", "internal", "clock_skew"})


# -- errors ---------------------------------------------------------------------------


class ClientError(Exception):
    """Root of the client's own errors (invalid changes raise :class:`hub.errors.HubError`).

    The tree::

        ClientError
        ├── ClientClosed      close() was called
        ├── Stopped           the hub refused the client for good (code, reason)
        ├── DataFileError     the data file is in use or belongs to another device
        ├── PushRejected      a push the hub will never take (push_id, code, changes)
        └── ChangesOverflow   a changes() iterator fell behind (limit)
    """


class ClientClosed(ClientError):
    """The client was closed."""


class Stopped(ClientError):
    """The client stopped reconnecting: retrying cannot help (4001/4010 without a
    credential function, 4003, or a data file of another user)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"stopped: {reason} (close code {code})")
        self.code = code
        self.reason = reason


class DataFileError(ClientError):
    """The data file cannot be used: another client has it open, or it belongs
    to another device."""


class PushRejected(ClientError):
    """The hub refused a push for good (``code`` from PROTOCOL.md); its changes
    were dropped from the outbox and the replica resynced without them."""

    def __init__(self, push_id: str, code: str, message: str, changes: list[dict[str, Any]]):
        super().__init__(f"push {push_id} refused: {code}: {message}")
        self.push_id = push_id
        self.code = code
        self.message = message
        self.changes = changes


class ChangesOverflow(ClientError):
    """A ``changes()`` iterator fell more than ``limit`` updates behind: re-read
    the state and iterate again."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the application fell more than {limit} updates behind")
        self.limit = limit


# -- values ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordUpdate:
    """A record's visible state after the client applied something that changed it.

    ``source`` says what: a change of this client (``"local"``), a delta from
    the hub (``"remote"``, with the ``device`` that wrote it and its
    ``version``), or a full resync (``"resync"``).
    """

    collection: str
    record_id: str
    fields: dict[str, Any]  # field name -> decoded JSON value
    deleted: bool
    source: Literal["local", "remote", "resync"]
    device: str | None = None
    version: int | None = None


@dataclass(frozen=True, slots=True)
class Reconnect:
    """What to do after a connection ended: wait ``delay_s``, then connect
    again (to the next URL when ``next_url``), unless ``stop``."""

    delay_s: float
    next_url: bool
    stop: bool = False


def backoff_s(attempt: int, uniform: Callable[[float, float], float] = random.uniform) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt, MAX_ATTEMPT))
    return uniform(0.0, ceiling)


def reconnect_plan(
    code: int | None,
    reason: str,
    attempt: int,
    *,
    refreshable: bool,
    uniform: Callable[[float, float], float] = random.uniform,
) -> Reconnect:
    """The client's answer to each close code of PROTOCOL.md.

    ``code`` is None when there was no close frame (connection refused or
    lost, hub killed); ``attempt`` counts the failures since the last welcome;
    ``refreshable`` says whether a credential function can get a new token.
    """
    if code == WS_1012_RESTARTING:
        hint = RESTART_HINT_RE.search(reason)
        delay = float(hint.group(1)) if hint else uniform(0.5, 5.0)
        return Reconnect(min(delay, BACKOFF_CAP_S), next_url=True)
    if code == WS_1013_TOO_SLOW:
        return Reconnect(backoff_s(attempt, uniform), next_url=False)  # and pull, as always
    if code in (WS_4001_UNAUTHENTICATED, WS_4010_TOKEN_EXPIRED):
        if refreshable:
            return Reconnect(backoff_s(attempt, uniform), next_url=False)
        return Reconnect(0.0, next_url=False, stop=True)
    if code == WS_4003_FORBIDDEN:
        return Reconnect(0.0, next_url=False, stop=True)
    if code in (WS_4008_RATE_LIMITED, WS_4009_TOO_MANY_CONNECTIONS):
        return Reconnect(1.0 + backoff_s(attempt + 2, uniform), next_url=False)
    # No close frame, 1000, 1001, 1009, 1011, 4000, anything else: back off,
    # and try the next hub of the list (this one may be gone).
    return Reconnect(backoff_s(attempt, uniform), next_url=True)


async def _cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    """Cancel tasks and wait for them to end. On Python 3.11, ``wait_for`` can
    swallow a cancellation that lands as its inner wait completes, so a task
    still running shortly after is cancelled again."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)


def ws_url(url: str) -> str:
    """The WebSocket endpoint of a hub given as ``http(s)://host`` or ``ws(s)://host[/v1/ws]``."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"not a hub URL (want http(s):// or ws(s)://host): {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1/ws"):
        path += "/v1/ws"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def _finite(value: Any) -> bool:
    """Whether every number in ``value`` is finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _dumps(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # an integer beyond 64 bits, kept exactly
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _delta(raw: dict[str, Any]) -> Delta:
    """A record delta as the hub sends it, values decoded."""
    return Delta(
        collection=raw["collection"],
        record_id=raw["id"],
        version=int(raw.get("version") or 0),
        device=raw.get("device"),
        fields={name: (f["value"], f["hlc"]) for name, f in (raw.get("fields") or {}).items()},
        deleted=bool(raw.get("deleted")),
        deleted_hlc=raw.get("deleted_hlc"),
        origin=raw.get("origin"),
        actor=raw.get("actor"),
    )


def _apply_change(replica: Replica, change: dict[str, Any]) -> RecordState:
    """Apply a change in its wire form (values decoded) to a replica."""
    record = replica.record(change["collection"], change["id"])
    if change["op"] == "delete":
        apply_delete(record, change["hlc"])
    else:
        apply_upsert(record, ((n, f["value"], f["hlc"]) for n, f in change["fields"].items()))
    return record


def _stored(record: RecordState) -> tuple[tuple[tuple[str, str], ...], str | None]:
    """What identifies a record's stored state: field stamps and delete stamp."""
    return tuple(sorted((n, f.hlc) for n, f in record.fields.items())), record.deleted_hlc


def _visible(record: RecordState | None) -> tuple[dict[str, Any], bool]:
    """A record's visible fields, with copies of its arrays and objects: what
    the app reads is its own to change, and the replica (and the changes
    queued for the hub, which share its values) change only by a write."""
    if record is None:
        return {}, True
    return {n: _own(f.value) for n, f in record.visible().items()}, record.deleted


def _own(value: Any) -> Any:
    return copy.deepcopy(value) if isinstance(value, (dict, list)) else value


@dataclass(frozen=True, slots=True)
class Step:
    """One change to apply to a replica: a local change, or a delta from the hub."""

    key: Key
    change: dict[str, Any] | None = None  # wire form, values decoded
    delta: Delta | None = None

    @classmethod
    def local(cls, change: dict[str, Any]) -> Step:
        return cls((change["collection"], change["id"]), change=change)

    @classmethod
    def remote(cls, delta: Delta) -> Step:
        return cls((delta.collection, delta.record_id), delta=delta)

    def apply(self, replica: Replica) -> None:
        if self.delta is not None:
            replica.apply_delta(self.delta)
        elif self.change is not None:
            _apply_change(replica, self.change)


# -- the local file -------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    collection TEXT NOT NULL, record_id TEXT NOT NULL, deleted_hlc TEXT,
    PRIMARY KEY (collection, record_id));
CREATE TABLE IF NOT EXISTS fields (
    collection TEXT NOT NULL, record_id TEXT NOT NULL, name TEXT NOT NULL,
    value TEXT NOT NULL, hlc TEXT NOT NULL,
    PRIMARY KEY (collection, record_id, name));
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, change TEXT NOT NULL, push_id TEXT);
"""

# (collection, record id, delete stamp, [(field, value as JSON, stamp)])
RecordRow = tuple[str, str, str | None, list[tuple[str, str, str]]]


def _row(key: Key, record: RecordState) -> RecordRow:
    fields = [(n, _dumps(f.value), f.hlc) for n, f in record.fields.items()]
    return key[0], key[1], record.deleted_hlc, fields


@dataclass(slots=True)
class Commit:
    """One transaction of the local file."""

    records: list[RecordRow] = field(default_factory=list)
    replace_all: bool = False  # ``records`` are the whole replica
    queued: list[tuple[int, str]] = field(default_factory=list)  # new outbox rows
    assigned: tuple[str, list[int]] | None = None  # a push id for outbox rows
    acked: str | None = None  # the push id whose rows go
    meta: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Loaded:
    replica: Replica
    meta: dict[str, str]
    clock_last: str | None
    outbox: list[tuple[int, dict[str, Any], str | None]]  # (seq, change, push id)


class LocalFile:
    """The device's SQLite file. Blocking: :class:`HubClient` calls it from
    its disk thread only. The file is held exclusively while open, so two
    clients cannot share one by mistake."""

    def __init__(self, path: str, device: str) -> None:
        try:
            self.con = sqlite3.connect(path, timeout=0.5, isolation_level=None)
        except sqlite3.Error as exc:
            raise DataFileError(f"cannot open {path}: {exc}") from exc
        try:
            self.con.execute("PRAGMA locking_mode = EXCLUSIVE")
            self.con.execute("PRAGMA journal_mode = WAL")
            self.con.execute("PRAGMA synchronous = FULL")
            self.con.executescript(SCHEMA)
            row = self.con.execute("SELECT value FROM meta WHERE key = 'device'").fetchone()
            if row is None:
                self.con.execute("INSERT INTO meta VALUES ('device', ?)", (device,))
            elif row[0] != device:
                raise DataFileError(f"{path} belongs to device {row[0]!r}, not {device!r}")
        except sqlite3.OperationalError as exc:
            self.con.close()
            raise DataFileError(f"{path} is in use by another client ({exc})") from exc
        except BaseException:
            self.con.close()
            raise

    def load(self) -> Loaded:
        con = self.con
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        replica = Replica()
        for collection, record_id, deleted_hlc in con.execute("SELECT * FROM records"):
            record = replica.record(collection, record_id)
            if deleted_hlc is not None:
                apply_delete(record, deleted_hlc)
        for collection, record_id, name, value, stamp in con.execute("SELECT * FROM fields"):
            apply_upsert(replica.record(collection, record_id), [(name, json.loads(value), stamp)])
        stamps = [
            meta.get("clock"),
            con.execute("SELECT max(hlc) FROM fields").fetchone()[0],
            con.execute("SELECT max(deleted_hlc) FROM records").fetchone()[0],
        ]
        known = [s for s in stamps if s is not None]
        outbox = [
            (seq, json.loads(change), push_id)
            for seq, change, push_id in con.execute("SELECT * FROM outbox ORDER BY seq")
        ]
        return Loaded(replica, meta, max(known) if known else None, outbox)

    def commit(self, commit: Commit) -> None:
        con = self.con
        con.execute("BEGIN IMMEDIATE")
        try:
            if commit.replace_all:
                con.execute("DELETE FROM records")
                con.execute("DELETE FROM fields")
            for collection, record_id, deleted_hlc, fields in commit.records:
                con.execute(
                    "INSERT INTO records VALUES (?, ?, ?) ON CONFLICT (collection, record_id) "
                    "DO UPDATE SET deleted_hlc = excluded.deleted_hlc",
                    (collection, record_id, deleted_hlc),
                )
                con.execute(
                    "DELETE FROM fields WHERE collection = ? AND record_id = ?",
                    (collection, record_id),
                )
                con.executemany(
                    "INSERT INTO fields VALUES (?, ?, ?, ?, ?)",
                    [(collection, record_id, n, v, h) for n, v, h in fields],
                )
            con.executemany("INSERT INTO outbox (seq, change) VALUES (?, ?)", commit.queued)
            if commit.assigned is not None:
                push_id, seqs = commit.assigned
                con.executemany(
                    "UPDATE outbox SET push_id = ? WHERE seq = ?", [(push_id, s) for s in seqs]
                )
            if commit.acked is not None:
                con.execute("DELETE FROM outbox WHERE push_id = ?", (commit.acked,))
            con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", commit.meta.items())
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.con.close()


# -- the outbox in memory -------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    seq: int
    change: dict[str, Any]


@dataclass(slots=True)
class _Batch:
    """One push: its id is fixed once given, and so are its changes."""

    push_id: str
    entries: list[_Entry]
    in_flight: bool = False
    failures: int = 0
    retry_at: float = 0.0


class _Subscription:
    """One ``changes()`` iterator: its own queue, bounded by ``limit``; None ends it."""

    def __init__(self, owner: set[_Subscription], limit: int) -> None:
        self.owner = owner
        self.limit = limit
        self.queue: asyncio.Queue[RecordUpdate | None] = asyncio.Queue()
        self.overflowed = False
        owner.add(self)

    def put(self, update: RecordUpdate | None) -> None:
        if self.overflowed:
            return
        if update is not None and self.queue.qsize() >= self.limit:
            # A slow reader loses its iterator, not everyone their memory.
            self.overflowed = True
            while not self.queue.empty():
                self.queue.get_nowait()
            update = None
        self.queue.put_nowait(update)

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> RecordUpdate:
        update = await self.queue.get()
        if update is None:
            self.owner.discard(self)
            if self.overflowed:
                raise ChangesOverflow(self.limit)
            raise StopAsyncIteration
        return update

    async def aclose(self) -> None:
        self.owner.discard(self)


# -- the client -----------------------------------------------------------------------


class HubClient:
    """A device's replica of its user's data, synced with the hub.

    ``url`` is a hub (``http://host:port`` or ``ws://host:port/v1/ws``) or a
    list of them, tried in turn when one cannot be reached. ``credential`` is
    a JWT or an API key, or a function returning a fresh one (called before
    each connect and when the hub says the token is expiring). ``data_path``
    is the device's SQLite file. ``mode="notify"`` asks the hub for
    ``sync_available`` instead of deltas (the client pulls).

    Use ``async with HubClient(...) as client`` (or ``start()``/``close()``).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        credential: Credential,
        device: str,
        *,
        data_path: str | os.PathLike[str],
        mode: Literal["events", "notify"] = "events",
        on_change: Callable[[RecordUpdate], None] | None = None,
        on_error: Callable[[ClientError], None] | None = None,
        open_timeout_s: float = 10.0,
        max_message_bytes: int = 16 * 1024 * 1024,
        limits: protocol.Limits = protocol.Limits(),  # noqa: B008 - frozen
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("at least one hub URL is needed")
        if not protocol.valid_device(device):
            raise ValueError(f"bad device id (1..64 characters of [A-Za-z0-9_.:-]): {device!r}")
        if mode not in protocol.MODES:
            raise ValueError(f"mode must be 'events' or 'notify', not {mode!r}")
        self.device = device
        self._urls = [ws_url(u) for u in urls]
        self._credential = credential
        self._path = os.fspath(data_path)
        self._mode = mode
        self._on_change = on_change
        self._on_error = on_error
        self._open_timeout_s = open_timeout_s
        self._max_message_bytes = max_message_bytes
        self._limits = limits

        self._replica = Replica()
        self._fresh: Replica | None = None  # being built by a full resync
        self._resync_wanted = False
        self._clock = Clock(device)
        self._cursor = "0"
        self._user: str | None = None
        self._seen = 0  # every version up to this one is in the replica
        self._known: set[int] = set()  # versions above _seen that are in it too
        self._next_seq = 1
        self._loose: list[_Entry] = []  # queued, not yet part of a push
        self._batches: dict[str, _Batch] = {}  # pushes not yet acked, oldest first
        self._in_flight = 0

        self._ws: ClientConnection | None = None
        self._connection: str | None = None
        self._caught_up = False  # a pull ended since the connection opened
        self._pulling = False
        self._pull_wanted = asyncio.Event()
        self._push_wake = asyncio.Event()
        self._refreshed_at = -math.inf  # when a fresh token was last asked for
        self._refreshing = False  # a refresh is waiting or under way
        self._requests: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._fatal: BaseException | None = None

        self._disk: ThreadPoolExecutor | None = None
        self._file: LocalFile | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped: ClientError | None = None
        self._subscriptions: set[_Subscription] = set()
        self._waiters: list[asyncio.Future[None]] = []

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Open the data file and start connecting (in the background, for as
        long as the client is open; changes work offline meanwhile)."""
        if self._disk is not None:
            raise RuntimeError("the client was already started")
        self._disk = ThreadPoolExecutor(1, thread_name_prefix="hub-client-disk")
        try:
            self._file = await self._on_disk(LocalFile, self._path, self.device)
            loaded = await self._on_disk(self._file.load)
        except BaseException:
            if self._file is not None:
                await self._on_disk(self._file.close)
            self._disk.shutdown(wait=False)
            self._stopped = ClientClosed("the client could not start")
            raise
        self._replica = loaded.replica
        self._cursor = loaded.meta.get("cursor", "0")
        self._resync_wanted = loaded.meta.get("resync") == "1"
        self._seen = int(loaded.meta.get("version", "0"))
        self._user = loaded.meta.get("user")
        self._clock = Clock(self.device, last=loaded.clock_last)
        for seq, change, push_id in loaded.outbox:
            entry = _Entry(seq, change)
            if push_id is None:
                self._loose.append(entry)
            else:
                self._batches.setdefault(push_id, _Batch(push_id, [])).entries.append(entry)
            self._next_seq = seq + 1
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hub-client")

    async def close(self) -> None:
        """Disconnect and close the data file; queued changes stay in it."""
        if not isinstance(self._stopped, ClientClosed):
            self._stopped = ClientClosed("the client was closed")
        if self._task is not None:
            await _cancel_all({self._task})
            self._task = None
        for subscription in self._subscriptions:
            subscription.put(None)
        self._changed()
        if self._disk is not None:
            if self._file is not None:
                await self._on_disk(self._file.close)
                self._file = None
            self._disk.shutdown(wait=False)

    async def __aenter__(self) -> HubClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- writing ------------------------------------------------------------------------

    async def upsert(self, collection: str, record_id: str, /, **fields: Any) -> str:
        """Write fields of a record (creating or reviving it); returns the stamp.

        Applied to the replica at once and queued for the hub; returns once
        the change is in the data file. Invalid changes raise
        :class:`hub.errors.InvalidChange` (names, sizes) or ``TypeError``
        (a value that is not JSON).
        """
        stamp = self._clock.now()
        raw = {
            "collection": collection,
            "id": record_id,
            "op": "upsert",
            "fields": {name: {"value": value, "hlc": stamp} for name, value in fields.items()},
        }
        return await self._write(raw, stamp)

    async def delete(self, collection: str, record_id: str, /) -> str:
        """Delete a record (its fields written so far); returns the stamp."""
        stamp = self._clock.now()
        raw = {"collection": collection, "id": record_id, "op": "delete", "hlc": stamp}
        return await self._write(raw, stamp)

    async def _write(self, raw: dict[str, Any], stamp: str) -> str:
        if self._file is None:
            raise ClientClosed("the client is not open")
        change = self._validated(raw, stamp)
        seq = self._next_seq
        self._next_seq += 1
        rows, updates = self._apply([Step.local(change)], "local")
        self._loose.append(_Entry(seq, change))
        # Submitted before any await: the disk thread keeps this order.
        done = self._commit(
            Commit(records=rows, queued=[(seq, _dumps(change))], meta={"clock": stamp})
        )
        self._push_wake.set()
        self._emit(updates)
        self._changed()
        await done
        return stamp

    def _validated(self, raw: dict[str, Any], stamp: str) -> dict[str, Any]:
        """The change as the hub will store it (values through a JSON round trip),
        checked with the hub's own rules."""
        for name, spec in (raw.get("fields") or {}).items():
            if not _finite(spec["value"]):  # (JSON encoders write them as null)
                raise TypeError(f"fields.{name}: NaN and infinities are not JSON values")
        (parsed,) = protocol.parse_changes([raw], self._limits, int(stamp[:13]))
        change = dict(raw)
        if parsed.op == "upsert":
            change["fields"] = {
                f.name: {"value": protocol.loads(f.value), "hlc": f.hlc} for f in parsed.fields
            }
        size = len(_dumps(change).encode())
        if size > MAX_CHANGE_BYTES:
            raise PayloadTooLarge("encoded change size", size, MAX_CHANGE_BYTES)
        return change

    # -- reading ------------------------------------------------------------------------

    def get(self, collection: str, record_id: str) -> dict[str, Any] | None:
        """A live record's fields (decoded values), or None when absent or deleted."""
        fields, deleted = _visible(self._replica.records.get((collection, record_id)))
        return None if deleted else fields

    def records(self, collection: str) -> dict[str, dict[str, Any]]:
        """Every live record of a collection: record id -> fields."""
        found = {}
        for (name, record_id), record in self._replica.records.items():
            if name == collection and not record.deleted:
                found[record_id] = _visible(record)[0]
        return found

    def state(self) -> dict[Key, tuple[dict[str, tuple[Any, str]], str | None]]:
        """The replica's comparable state (:meth:`hub.merge.Replica.state`)."""
        return self._replica.state()

    @property
    def pending(self) -> int:
        """Changes not yet acked by the hub."""
        return len(self._loose) + sum(len(b.entries) for b in self._batches.values())

    @property
    def connected(self) -> bool:
        return self._ws is not None

    @property
    def connection(self) -> str | None:
        """The hub's id of the open connection (from its ``welcome``), or None."""
        return self._connection if self._ws is not None else None

    @property
    def stopped(self) -> ClientError | None:
        """Why the client no longer connects (:class:`Stopped`, :class:`ClientClosed`),
        or None while it does."""
        return self._stopped

    @property
    def version(self) -> int:
        """The user's version up to which this replica has every change."""
        return self._seen

    async def synced(self, timeout: float | None = None) -> None:
        """Wait until connected, caught up by a pull, and every change acked.

        Raises ``TimeoutError`` after ``timeout`` seconds, and the client's
        error when it stopped or was closed.
        """
        async with asyncio.timeout(timeout):
            while True:
                if self._stopped is not None:
                    raise self._stopped
                if (
                    self._ws is not None
                    and self._caught_up
                    and not self._pulling
                    and not self._pull_wanted.is_set()
                    and self._fresh is None
                    and not self._resync_wanted
                    and not self._loose
                    and not self._batches
                ):
                    return
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                await waiter

    def changes(self, limit: int = 10_000) -> AsyncIterator[RecordUpdate]:
        """Every update applied from this call on, in order; ends when the
        client closes. Falling more than ``limit`` behind raises
        :class:`ChangesOverflow` (re-read the state, then iterate anew)."""
        subscription = _Subscription(self._subscriptions, limit)
        if isinstance(self._stopped, ClientClosed):
            subscription.put(None)  # closed already: it ends at once
        return subscription

    # -- applying -----------------------------------------------------------------------

    def _apply(
        self, steps: Sequence[Step], source: Literal["local", "remote"]
    ) -> tuple[list[RecordRow], list[RecordUpdate]]:
        """Apply steps to the replica (and to the one a resync is building);
        the rows to store and the updates to tell the application."""
        before: dict[Key, tuple[Any, tuple[dict[str, Any], bool]]] = {}
        last: dict[Key, Delta] = {}
        for step in steps:
            if step.key not in before:
                found = self._replica.records.get(step.key)
                before[step.key] = (None if found is None else _stored(found), _visible(found))
            step.apply(self._replica)
            if self._fresh is not None:
                step.apply(self._fresh)
            if step.delta is not None:
                last[step.key] = step.delta
                self._observe(step.delta)
        rows: list[RecordRow] = []
        updates: list[RecordUpdate] = []
        for key, (stored, visible) in before.items():
            record = self._replica.records[key]
            if _stored(record) != stored:
                rows.append(_row(key, record))
            fields, deleted = _visible(record)
            if (fields, deleted) != visible:
                delta = last.get(key)
                device = self.device if delta is None else delta.device
                version = None if delta is None else delta.version
                updates.append(
                    RecordUpdate(key[0], key[1], fields, deleted, source, device, version)
                )
        return rows, updates

    def _observe(self, delta: Delta) -> None:
        """Move the clock past a remote delta's stamps, so later local writes win over it."""
        for _, stamp in delta.fields.values():
            self._clock.observe(stamp)
        if delta.deleted_hlc is not None:
            self._clock.observe(delta.deleted_hlc)

    def _emit(self, updates: list[RecordUpdate]) -> None:
        """Tell the application; called in the same step that changed the replica,
        so updates come in the order the replica changed."""
        for update in updates:
            if self._on_change is not None:
                try:
                    self._on_change(update)
                except Exception:
                    log.exception("on_change failed")
            for subscription in self._subscriptions:
                subscription.put(update)

    def _report(self, error: ClientError) -> None:
        log.warning("%s", error)
        if self._on_error is not None:
            try:
                self._on_error(error)
            except Exception:
                log.exception("on_error failed")

    def _changed(self) -> None:
        """Wake whoever waits in :meth:`synced`."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def _saw_version(self, version: int, prev: int | None) -> None:
        """Note a version now in the replica. An event whose ``prev`` is not
        seen is a gap: pull. An ack above a hole waits a moment for the
        missing event first (events and acks may cross)."""
        self._known.add(version)
        self._advance(self._seen)
        if prev is not None and prev > self._seen:
            self._want_pull()
        elif prev is None and version - 1 > self._seen:
            asyncio.get_running_loop().call_later(GAP_GRACE_S, self._check_gap, version - 1)

    def _advance(self, seen: int) -> None:
        self._seen = max(self._seen, seen)
        while self._seen + 1 in self._known:
            self._seen += 1
        self._known = {v for v in self._known if v > self._seen}

    def _check_gap(self, version: int) -> None:
        if self._seen < version and self._ws is not None:
            self._want_pull()

    def _want_pull(self) -> None:
        self._pull_wanted.set()

    # -- the disk -----------------------------------------------------------------------

    def _on_disk(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn`` on the disk thread; submitted now, so jobs run in call order.

        Shielded: a caller cancelled while waiting (a connection that ends, a
        cancelled ``upsert``) must not unqueue a write whose change the
        replica in memory already holds; ``close`` waits for every job.
        """
        assert self._disk is not None
        return asyncio.shield(asyncio.get_running_loop().run_in_executor(self._disk, fn, *args))

    def _commit(self, commit: Commit) -> asyncio.Future[None]:
        if self._file is None:
            raise ClientClosed("the data file is closed")
        return self._on_disk(self._file.commit, commit)

    # -- connecting ---------------------------------------------------------------------

    async def _credential_now(self) -> str:
        credential = self._credential
        if isinstance(credential, str):
            return credential
        value = credential()
        if inspect.isawaitable(value):
            value = await value
        return str(value)

    async def _run(self) -> None:
        attempt = 0
        index = 0
        while True:
            url = self._urls[index % len(self._urls)]
            try:
                code, reason, welcomed = await self._connect_once(url)
            except Exception as exc:  # a bug, or the data file failing: nothing to retry
                log.exception("the client failed")
                self._fatal = exc
                code, reason, welcomed = None, "", False
            if self._fatal is not None:
                error = self._fatal
                self._stopped = (
                    error if isinstance(error, ClientError) else Stopped(None, repr(error))
                )
                self._report(self._stopped)
                self._changed()
                return
            if welcomed:
                attempt = 0
            plan = reconnect_plan(code, reason, attempt, refreshable=callable(self._credential))
            if plan.stop:
                self._stopped = Stopped(code, reason)
                self._report(self._stopped)
                self._changed()
                return
            attempt += 1
            if plan.next_url:
                index += 1
            log.info(
                "connection to %s ended (%s %s); reconnecting in %.2fs",
                url,
                code,
                reason,
                plan.delay_s,
            )
            await asyncio.sleep(plan.delay_s)

    async def _connect_once(self, url: str) -> tuple[int | None, str, bool]:
        """One connection, from connect to close: (close code, reason, welcomed)."""
        try:
            token = await self._credential_now()
        except Exception as exc:
            log.warning("the credential function failed: %r", exc)
            return None, "no credential", False
        query = urlencode({"device": self.device, "mode": self._mode})
        welcomed = False
        try:
            async with connect(
                f"{url}?{query}",
                additional_headers={"Authorization": f"Bearer {token}"},
                open_timeout=self._open_timeout_s,
                close_timeout=2.0,
                max_size=self._max_message_bytes,
                compression=None,  # the hub does not compress
                user_agent_header="hub-client",
            ) as ws:
                welcome = protocol.loads(await asyncio.wait_for(ws.recv(), self._open_timeout_s))
                if not isinstance(welcome, dict) or welcome.get("type") != "welcome":
                    log.warning("expected a welcome, got %r", str(welcome)[:200])
                    return None, "no welcome", False
                welcomed = True
                await self._session(ws, welcome)
        except ConnectionClosed as exc:
            if exc.rcvd is None:
                return None, "connection lost", welcomed
            return exc.rcvd.code, exc.rcvd.reason, welcomed
        except (OSError, TimeoutError, InvalidHandshake, HubError) as exc:
            log.info("could not connect to %s: %s", url, exc)
        return None, "connection failed", welcomed

    async def _session(self, ws: ClientConnection, welcome: dict[str, Any]) -> None:
        user = welcome.get("user")
        if self._user is None and isinstance(user, str):
            self._user = user
            await self._commit(Commit(meta={"user": user}))
        elif user != self._user:
            self._fatal = Stopped(
                None, f"this data file belongs to user {self._user!r}, not {user!r}"
            )
            return
        log.info("connected as %s/%s (version %s)", user, self.device, welcome.get("version"))
        self._ws = ws
        self._connection = str(welcome.get("connection"))
        self._caught_up = False
        self._pull_wanted.set()  # resume from the stored cursor
        for batch in self._batches.values():
            batch.in_flight = False
        self._in_flight = 0
        self._push_wake.set()
        helpers = {
            asyncio.create_task(self._puller(ws), name="hub-client-pull"),
            asyncio.create_task(self._pusher(ws), name="hub-client-push"),
        }
        for task in helpers:
            task.add_done_callback(lambda t: self._helper_done(t, ws))
        self._changed()
        try:
            while True:
                raw = await ws.recv()
                await self._on_message(ws, raw, helpers)
        finally:
            self._ws = None
            self._caught_up = False
            if self._fresh is not None:  # an unfinished resync starts again on the next connection
                self._fresh = None
                self._resync_wanted = True
            await _cancel_all(helpers)
            for request in self._requests.values():
                request.cancel()
            self._requests.clear()
            self._changed()

    def _helper_done(self, task: asyncio.Task[None], ws: ClientConnection) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is None or isinstance(error, ConnectionClosed):
            return
        log.error("the client failed", exc_info=error)
        self._fatal = error
        asyncio.get_running_loop().create_task(ws.close(1011, "client error"))

    # -- messages from the hub ------------------------------------------------------------

    async def _on_message(
        self, ws: ClientConnection, raw: str | bytes, helpers: set[asyncio.Task[None]]
    ) -> None:
        try:
            message = protocol.loads(raw)
        except HubError:
            log.warning("the hub sent malformed JSON")
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        mid = message.get("id")
        if kind == "change":
            try:
                deltas = [_delta(d) for d in message.get("changes") or []]
            except (KeyError, TypeError, ValueError, AttributeError):
                log.warning("the hub sent a malformed change event; pulling instead")
                self._want_pull()
                return
            await self._on_change_event(message, deltas)
        elif kind == "sync_available":
            version = message.get("version")
            if not isinstance(version, int) or version > self._seen:
                self._want_pull()
        elif kind in ("changes", "error") and mid in self._requests:
            request = self._requests[mid]
            if not request.done():
                request.set_result(message)
        elif kind == "ack" and isinstance(mid, str):
            await self._on_ack(mid, message)
        elif kind == "error" and mid in self._batches:
            await self._on_push_error(mid, message)
        elif kind == "error":
            log.warning("the hub reported %s: %s", message.get("code"), message.get("message"))
        elif kind == "auth_expiring" and callable(self._credential) and not self._refreshing:
            # At most one refresh per interval (a token minted with less than
            # a minute to live is warned about at once, again and again); a
            # warning within it is answered when it ends, not dropped.
            self._refreshing = True
            task = asyncio.create_task(self._refresh(ws), name="hub-client-auth")
            helpers.add(task)
            task.add_done_callback(helpers.discard)
        self._changed()

    async def _on_change_event(self, message: dict[str, Any], deltas: list[Delta]) -> None:
        rows, updates = self._apply([Step.remote(d) for d in deltas], "remote")
        self._emit(updates)
        if rows:
            await self._commit(Commit(records=rows))
        version, prev = message.get("version"), message.get("prev")
        if isinstance(version, int):
            self._saw_version(version, prev if isinstance(prev, int) else None)

    async def _on_ack(self, push_id: str, message: dict[str, Any]) -> None:
        batch = self._batches.pop(push_id, None)
        if batch is None:
            return  # an ack for a push acked before (a replay)
        if batch.in_flight:
            self._in_flight -= 1
        await self._commit(Commit(acked=push_id))
        if message.get("applied") and isinstance(message.get("version"), int):
            self._saw_version(message["version"], None)
        self._push_wake.set()

    async def _on_push_error(self, push_id: str, message: dict[str, Any]) -> None:
        batch = self._batches[push_id]
        if batch.in_flight:
            batch.in_flight = False
            self._in_flight -= 1
        code = str(message.get("code"))
        if code in RETRYABLE_PUSH_ERRORS:
            batch.failures += 1
            batch.retry_at = time.monotonic() + max(0.1, backoff_s(batch.failures))
            log.info("push %s got %s; retrying", push_id, code)
            self._push_wake.set()
            return
        entries = batch.entries
        details = message.get("details")
        index = details.get("index") if isinstance(details, dict) else None
        if code == "payload_too_large" and len(entries) > 1:
            # The hub takes fewer changes in one push than this one holds (its
            # limits may be lower than the client's): the same changes, in two.
            log.info("push %s was too large for the hub; splitting it", push_id)
            half = len(entries) // 2
            await self._rebatch(push_id, [entries[:half], entries[half:]])
            return
        refused = entries
        # Wanted from now: a resync that ends while the refusal is written must
        # not write over the wish (it keeps it when this is set).
        self._resync_wanted = True
        if code == "invalid_change" and isinstance(index, int) and 0 <= index < len(entries):
            # One change is refused (the hub's limits may differ from the
            # client's): the others go again, under a new push id.
            refused = [entries[index]]
            await self._rebatch(push_id, [entries[:index] + entries[index + 1 :]], RESYNC_WANTED)
        else:
            del self._batches[push_id]
            await self._commit(Commit(acked=push_id, meta=RESYNC_WANTED))
        # Retrying cannot help: resync, so that the replica forgets what was
        # refused (wanted on disk with the refusal: a restart resyncs too).
        changes = [e.change for e in refused]
        self._report(PushRejected(push_id, code, str(message.get("message")), changes))
        self._resync_wanted = True
        self._want_pull()
        self._push_wake.set()  # a push slot is free again

    async def _rebatch(
        self, push_id: str, groups: list[list[_Entry]], meta: dict[str, str] | None = None
    ) -> None:
        """Replace an unacked push by pushes of ``groups`` of its changes, each
        under a new id; outbox rows left with the old id (refused) go, with
        ``meta`` written in the same transaction."""
        del self._batches[push_id]
        for entries in groups:
            if not entries:
                continue
            new_id = self._push_id(entries[0].seq)
            self._batches[new_id] = _Batch(new_id, entries)
            await self._commit(Commit(assigned=(new_id, [e.seq for e in entries])))
        await self._commit(Commit(acked=push_id, meta=meta or {}))
        self._push_wake.set()

    async def _refresh(self, ws: ClientConnection) -> None:
        """Send a fresh token before the connection's one expires (not sooner
        than REFRESH_MIN_INTERVAL_S after the last one)."""
        try:
            await asyncio.sleep(self._refreshed_at + REFRESH_MIN_INTERVAL_S - time.monotonic())
            self._refreshed_at = time.monotonic()
            token = await self._credential_now()
            await ws.send(_dumps({"type": "auth", "token": token}))
        finally:
            self._refreshing = False

    # -- pushing ------------------------------------------------------------------------

    async def _pusher(self, ws: ClientConnection) -> None:
        while True:
            self._push_wake.clear()
            now = time.monotonic()
            batch, new = self._next_batch(now)
            if batch is None:
                retries = [b.retry_at for b in self._batches.values() if not b.in_flight]
                wait = max(0.0, min(retries) - now) if retries else None
                if self._in_flight >= PUSHES_IN_FLIGHT:
                    wait = None  # an ack or an error makes room, and wakes this
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._push_wake.wait(), wait)
                continue
            if new:
                seqs = [e.seq for e in batch.entries]
                await self._commit(Commit(assigned=(batch.push_id, seqs)))
                if self._ws is not ws:
                    return
            batch.in_flight = True
            self._in_flight += 1
            changes = [e.change for e in batch.entries]
            await ws.send(_dumps({"type": "push", "id": batch.push_id, "changes": changes}))

    def _next_batch(self, now: float) -> tuple[_Batch | None, bool]:
        """The next push to send: an unacked one due, else a new one of queued changes."""
        if self._in_flight >= PUSHES_IN_FLIGHT:
            return None, False
        for batch in self._batches.values():
            if not batch.in_flight and batch.retry_at <= now:
                return batch, False
        if not self._loose:
            return None, False
        entries: list[_Entry] = []
        size = 0
        most = min(PUSH_BATCH_CHANGES, self._limits.max_changes_per_push)
        while self._loose and len(entries) < most:
            entry_size = len(_dumps(self._loose[0].change))
            if entries and size + entry_size > PUSH_BATCH_BYTES:
                break
            entries.append(self._loose.pop(0))
            size += entry_size
        push_id = self._push_id(entries[0].seq)
        batch = self._batches[push_id] = _Batch(push_id, entries)
        return batch, True

    def _push_id(self, seq: int) -> str:
        return f"{self.device[:24]}-{secrets.token_hex(8)}-{seq}"[:64]

    # -- pulling ------------------------------------------------------------------------

    async def _puller(self, ws: ClientConnection) -> None:
        failures = 0
        while True:
            await self._pull_wanted.wait()
            self._pull_wanted.clear()
            self._pulling = True
            try:
                done = await self._pull(ws)
            finally:
                self._pulling = False
            if done:
                failures = 0
                self._caught_up = True
            else:
                failures += 1
                await asyncio.sleep(max(0.1, backoff_s(failures)))
                self._pull_wanted.set()
            self._changed()

    async def _request(self, ws: ClientConnection, body: dict[str, Any]) -> dict[str, Any]:
        request_id = f"p-{next(self._ids)}"
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = answer
        try:
            await ws.send(_dumps({**body, "id": request_id}))
            return await asyncio.wait_for(answer, REQUEST_TIMEOUT_S)
        finally:
            self._requests.pop(request_id, None)

    async def _pull(self, ws: ClientConnection) -> bool:
        """Pull to the end, from the stored cursor or (resync) from 0; False to retry.

        A pull from 0 is always a resync: merged into the replica it could not
        remove records whose tombstones the hub has purged.
        """
        if self._resync_wanted or self._cursor == "0":
            self._begin_resync()
        since = "0" if self._fresh is not None else self._cursor
        while True:
            try:
                answer = await self._request(
                    ws, {"type": "pull", "since": since, "limit": PULL_LIMIT}
                )
            except TimeoutError:
                log.warning("a pull got no answer in %ss", REQUEST_TIMEOUT_S)
                return False
            if answer.get("type") == "error":
                if answer.get("code") == "reset_required":
                    log.info("the hub wants a full resync: %s", answer.get("message"))
                    self._begin_resync()
                    since = "0"
                    continue
                log.warning("a pull failed: %s %s", answer.get("code"), answer.get("message"))
                return False
            try:
                deltas = [_delta(d) for d in answer.get("changes") or []]
                cursor, has_more, version = (
                    str(answer["cursor"]),
                    bool(answer["has_more"]),
                    int(answer["version"]),
                )
            except (KeyError, TypeError, ValueError, AttributeError):
                log.warning("the hub sent a malformed pull answer")
                return False
            if self._fresh is not None:
                fresh = self._fresh
                for delta in deltas:
                    fresh.apply_delta(delta)
                    self._observe(delta)
            else:
                rows, updates = self._apply([Step.remote(d) for d in deltas], "remote")
                meta = (
                    {"cursor": cursor} if has_more else {"cursor": cursor, "version": str(version)}
                )
                done = self._commit(Commit(records=rows, meta=meta))
                self._emit(updates)
                await done
                self._cursor = cursor
            since = cursor
            if not has_more:
                break
        if self._fresh is not None:
            await self._finish_resync(since, version)
        else:
            self._advance(version)
        return True

    def _begin_resync(self) -> None:
        """A new replica from 0, with every unacked change of this client on top.

        A refusal that arrives meanwhile asks for another resync, after this one.
        """
        self._resync_wanted = False
        fresh = Replica()
        for batch in self._batches.values():
            for entry in batch.entries:
                _apply_change(fresh, entry.change)
        for entry in self._loose:
            _apply_change(fresh, entry.change)
        self._fresh = fresh

    async def _finish_resync(self, cursor: str, version: int) -> None:
        assert self._fresh is not None
        old, new = self._replica, self._fresh
        self._replica, self._fresh = new, None
        rows = [_row(key, record) for key, record in new.records.items()]
        # Still wanted if a refusal came during this one.
        resync = "1" if self._resync_wanted else "0"
        done = self._commit(
            Commit(
                records=rows,
                replace_all=True,
                meta={"cursor": cursor, "version": str(version), "resync": resync},
            )
        )
        self._cursor = cursor
        self._seen, self._known = version, set()
        updates = []
        for key in old.records.keys() | new.records.keys():
            before, after = _visible(old.records.get(key)), _visible(new.records.get(key))
            if before != after:
                updates.append(RecordUpdate(key[0], key[1], after[0], after[1], "resync"))
        self._emit(updates)
        await done
        log.info("resynced from 0: %d records, version %d", len(new.records), version)
