"""The browser client (hub/static/hub.js) and the demo app, in real headless Chromium.

A real hub process in development mode (so ``/dev/token`` hands out tokens)
serves the demo at ``/`` and the client at ``/client/hub.js``. Each browser
context is one device (its own localStorage, IndexedDB and Web Locks); the
pages of one context are tabs of one device. Screenshots go to
``test-artifacts/browser/``.

Needs Chromium at /usr/bin/chromium (``apt-get install chromium``) and the
``playwright`` package (in the ``test`` extra); without them these tests skip.
Playwright never downloads a browser here: it drives the system's Chromium.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import Databases, HubProcess, new_user, spawn_hub

from hub.auth import make_token
from hub.hlc import Clock
from hub.merge import RecordState, Replica, apply_delete, apply_upsert
from hub.types import Delta

try:
    from playwright.sync_api import (
        Browser,
        BrowserContext,
        Page,
        WebSocketRoute,
        expect,
        sync_playwright,
    )
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "browser"
WAIT_MS = 15_000

_missing = []
if not os.access(CHROMIUM, os.X_OK):
    _missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
if sync_playwright is None:
    _missing.append("the playwright package (pip install -e '.[test]', or pip install playwright)")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(_missing), reason="browser tests need " + " and ".join(_missing) if _missing else ""
    ),
]


# -- a development hub on a port of our own ------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DevHub:
    """A hub process in development mode on a fixed port (so it can come back on
    the same origin after a restart), on a database of its own."""

    def __init__(self, database_url: str, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.database_url = database_url
        self.log_dir = log_dir
        self.env = {
            "HUB_DATABASE_URL": database_url,
            "HUB_JWT_SECRET": "",  # empty counts as unset: the development secret
            "HUB_ALLOWED_ORIGINS": self.url,
            "HUB_PORT": str(self.port),
        }
        self.process: HubProcess | None = None

    def start(self) -> None:
        self.process = spawn_hub(self.env, self.log_dir)
        assert self.process.url == self.url, (self.process.url, self.url)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def cli(self, *args: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
        env.update(self.env)
        done = subprocess.run(
            [sys.executable, "-m", "hub", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout

    def token(self, user: str) -> str:
        answer = httpx.get(f"{self.url}/dev/token", params={"user": user}, timeout=10)
        answer.raise_for_status()
        return str(answer.json()["token"])

    def pull_all(self, user: str) -> list[dict[str, Any]]:
        """Every delta of the user, by HTTP pull from 0."""
        headers = {"Authorization": f"Bearer {self.token(user)}"}
        deltas: list[dict[str, Any]] = []
        since: str = "0"
        while True:
            answer = httpx.get(
                f"{self.url}/v1/sync/pull",
                params={"since": since, "limit": 100},
                headers=headers,
                timeout=10,
            )
            answer.raise_for_status()
            page = answer.json()
            deltas.extend(page["changes"])
            since = page["cursor"]
            if not page["has_more"]:
                return deltas

    def devices(self, user: str) -> list[dict[str, Any]]:
        headers = {"Authorization": f"Bearer {self.token(user)}"}
        answer = httpx.get(f"{self.url}/v1/devices", headers=headers, timeout=10)
        answer.raise_for_status()
        return list(answer.json())


@pytest.fixture(scope="module")
def dev_hub(databases: Databases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevHub]:
    hub = DevHub(databases.create(), tmp_path_factory.mktemp("browser-hub"))
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def browser(dev_hub: DevHub) -> Iterator[Browser]:
    """Chromium, started after the hub: Playwright's event loop runs until the
    module ends, and the fixtures that use asyncio.run must come before it."""
    assert sync_playwright is not None
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Devices:
    """Browser contexts (devices) of a test; every page's uncaught errors are kept."""

    def __init__(self, browser: Browser, hub: DevHub, name: str) -> None:
        self.browser = browser
        self.hub = hub
        self.name = name
        self.contexts: list[BrowserContext] = []
        self.page_errors: list[str] = []

    def new(self) -> BrowserContext:
        context = self.browser.new_context(viewport={"width": 720, "height": 560})
        context.set_default_timeout(WAIT_MS)
        self.contexts.append(context)
        return context

    def open(self, context: BrowserContext, user: str | None, relay: Relay | None = None) -> Page:
        """A tab of the demo for ``user``, or (``user`` None) a bare page of the
        hub's origin; with ``relay``, its WebSockets go through the relay."""
        page = context.new_page()
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        if relay is not None:
            page.route_web_socket("**/v1/ws", relay)
        page.goto(f"{self.hub.url}/?user={user}" if user else f"{self.hub.url}/health/live")
        return page

    def shot(self, page: Page, label: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{self.name}-{label}.png"))

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def devices(browser: Browser, dev_hub: DevHub, request: pytest.FixtureRequest) -> Iterator[Devices]:
    found = Devices(browser, dev_hub, request.node.name.removeprefix("test_"))
    try:
        yield found
    finally:
        found.close()
    assert not found.page_errors, found.page_errors


# -- helpers on the demo page ------------------------------------------------------------------


def wait_synced(page: Page, count: int | None = None) -> None:
    """Wait until the page is online, has nothing pending and (if given) shows ``count`` todos."""
    want = "" if count is None else f" && document.body.dataset.count === '{count}'"
    try:
        page.wait_for_function(
            "() => document.body.dataset.state === 'online'"
            " && document.body.dataset.pending === '0'" + want,
            timeout=WAIT_MS,
        )
    except PlaywrightTimeout:
        seen = page.evaluate(
            "() => ({body: {...document.body.dataset}, status: window.hub && window.hub.status,"
            " error: document.getElementById('error').textContent})"
        )
        raise AssertionError(f"not synced (want {count} todos): {seen}") from None


def add(page: Page, title: str) -> None:
    page.fill("#title", title)
    page.click("#add button")


def item(page: Page, title: str) -> Any:
    return page.locator("#todos li", has_text=title)


def replica(page: Page) -> dict[tuple[str, str], Any]:
    """The page's replica, in the comparable form of ``Replica.state()``."""
    records = page.evaluate("() => window.hub.records()")
    out = {}
    for r in records:
        state = RecordState(deleted_hlc=r["deleted_hlc"])
        apply_upsert(state, ((n, f["value"], f["hlc"]) for n, f in r["fields"].items()))
        out[(r["collection"], r["id"])] = (
            {n: (f.value, f.hlc) for n, f in state.visible().items()},
            r["deleted_hlc"],
        )
    return out


def server_state(hub: DevHub, user: str) -> dict[tuple[str, str], Any]:
    """The user's state on the hub: an HTTP pull from 0 folded by the reference merge."""
    server = Replica()
    for d in hub.pull_all(user):
        server.apply_delta(
            Delta(
                d["collection"],
                d["id"],
                d["version"],
                d["device"],
                {n: (f["value"], f["hlc"]) for n, f in d["fields"].items()},
                d["deleted"],
                d["deleted_hlc"],
                d["origin"],
                d["actor"],
            )
        )
    return server.state()


def titles(page: Page) -> list[str]:
    return [t.strip() for t in page.locator("#todos li .title").all_inner_texts()]


def wait_equal(pages: list[Page], hub: DevHub, user: str, timeout: float = 15.0) -> None:
    """Every page's replica equals the hub's state (tombstones included)."""
    deadline = time.monotonic() + timeout
    while True:
        want = server_state(hub, user)
        got = [replica(page) for page in pages]
        if all(g == want for g in got):
            return
        if time.monotonic() > deadline:
            assert got == [want] * len(pages)
        time.sleep(0.2)


# -- the merge and the clock are the reference's ----------------------------------------------


def test_merge_and_clock_match_the_reference(browser: Browser, dev_hub: DevHub) -> None:
    """hub.js's merge gives hub/merge.py's state for random deltas, in any order,
    with ties and writes stamped at the delete stamp; its clock ticks as hub/hlc.py's."""
    rng = random.Random(20241121)
    stamps = [f"17321856{rng.randrange(10):05d}-{rng.randrange(3):04d}-{n}" for n in "ab" * 6]
    values: list[Any] = [1, "x", None, [2], {"k": True}]

    def value(name: str, stamp: str) -> Any:  # one stamp, one value: as devices write
        return values[sum(map(ord, name + stamp)) % len(values)]

    cases = []
    wants = []
    for _ in range(300):
        deltas = []
        for _ in range(rng.randrange(1, 7)):
            fields = {}
            for name in rng.sample(["title", "done", "constructor", "n.1"], rng.randrange(0, 3)):
                stamp = rng.choice(stamps)
                fields[name] = {"value": value(name, stamp), "hlc": stamp}
            deleted = rng.choice(stamps) if rng.random() < 0.4 or not fields else None
            deltas.append({"fields": fields, "deleted_hlc": deleted})
        want = RecordState()
        for d in deltas:
            if d["deleted_hlc"] is not None:
                apply_delete(want, d["deleted_hlc"])
            apply_upsert(want, ((n, f["value"], f["hlc"]) for n, f in d["fields"].items()))
        visible = {n: {"value": f.value, "hlc": f.hlc} for n, f in want.visible().items()}
        cases.append(deltas)
        wants.append({"visible": visible, "deleted": want.deleted, "cut": want.deleted_hlc})
    walls = [1732185600000, 1732185600000, 1732185599000, 1732185600001] + [1732185600001] * 3
    clock = Clock("dev-1", wall=iter(walls).__next__)
    want_stamps = [clock.now() for _ in walls]

    page = browser.new_page()
    try:
        page.goto(f"{dev_hub.url}/health/live")
        result = page.evaluate(
            """async ([cases, walls]) => {
                const m = await import('/client/hub.js');
                const merged = (deltas) => {
                    const r = m.newRecord();
                    for (const d of deltas) m.applyDelta(r, d);
                    return {visible: m.visibleFields(r), deleted: m.isDeleted(r),
                            cut: r.deleted_hlc};
                };
                const forward = cases.map((deltas) => merged(deltas));
                const backward = cases.map((deltas) => merged([...deltas].reverse()));
                let state = null;
                const stamps = walls.map((w) => {
                    state = m.tickClock(state, w);
                    return m.formatStamp(state.wallMs, state.counter, 'dev-1');
                });
                // A clock that observed a stamp from elsewhere ticks past it.
                const seen = m.observeClock(m.tickClock(null, 5), '1732185700000-0042-other');
                const after = m.tickClock(seen, 1732185600000);
                return {forward, backward, stamps, after};
            }""",
            [cases, walls],
        )
    finally:
        page.close()
    assert result["forward"] == wants
    assert result["backward"] == wants
    assert result["stamps"] == want_stamps
    assert result["after"] == {"wallMs": 1732185700000, "counter": 43}


# -- the demo, as people use it -------------------------------------------------------------


def test_edits_on_one_device_appear_on_the_other(devices: Devices) -> None:
    user = new_user()
    a = devices.open(devices.new(), user)
    b = devices.open(devices.new(), user)
    wait_synced(a, 0)
    wait_synced(b, 0)
    expect(a.locator("#state")).to_have_text("online")

    add(a, "Buy milk")
    add(a, "Water the plants")
    expect(item(b, "Buy milk")).to_be_visible()
    expect(item(b, "Water the plants")).to_be_visible()
    assert titles(b) == ["Buy milk", "Water the plants"]

    item(b, "Buy milk").locator("input[type=checkbox]").check()
    expect(item(a, "Buy milk")).to_have_class("done")
    item(a, "Water the plants").locator("button.delete").click()
    expect(item(b, "Water the plants")).to_have_count(0)
    add(b, "Call mum")
    expect(item(a, "Call mum")).to_be_visible()

    wait_synced(a, 2)
    wait_synced(b, 2)
    devices.shot(a, "device-a")
    devices.shot(b, "device-b")
    wait_equal([a, b], devices.hub, user)
    names = {d["device"] for d in devices.hub.devices(user)}
    assert len(names) == 2 and all(n.startswith("web-") for n in names), names


def test_offline_edits_converge_when_back(devices: Devices) -> None:
    user = new_user()
    a_ctx, b_ctx = devices.new(), devices.new()
    a = devices.open(a_ctx, user)
    b = devices.open(b_ctx, user)
    wait_synced(a, 0)
    wait_synced(b, 0)
    add(a, "Shared one")
    add(a, "Shared two")
    expect(item(b, "Shared two")).to_be_visible()

    b_ctx.set_offline(True)
    expect(b.locator("#state")).to_have_text("offline")
    add(b, "Written offline")
    item(b, "Shared one").locator("input[type=checkbox]").check()
    item(b, "Shared two").locator("button.delete").click()
    expect(b.locator("#pending")).to_have_text("3 pending")
    # Meanwhile the other device goes on: a new todo, and a title change of a
    # todo the offline one toggles (different fields of one record both survive).
    add(a, "Written online")
    a.evaluate(
        """async () => {
            const todos = await window.hub.list('todos');
            const todo = todos.find((t) => t.fields.title === 'Shared one');
            await window.hub.upsert('todos', todo.id, {title: 'Shared one (renamed)'});
        }"""
    )
    wait_synced(a)
    devices.shot(b, "offline")
    assert "Written online" not in titles(b)

    b_ctx.set_offline(False)
    wait_synced(b, 3)
    wait_synced(a, 3)
    for page in (a, b):
        assert sorted(titles(page)) == ["Shared one (renamed)", "Written offline", "Written online"]
        expect(item(page, "Shared one (renamed)")).to_have_class("done")
    devices.shot(b, "back-online")
    devices.shot(a, "other-device")
    wait_equal([a, b], devices.hub, user)


def test_tabs_of_one_device_share_one_connection(devices: Devices) -> None:
    user = new_user()
    laptop = devices.new()
    tab1 = devices.open(laptop, user)
    wait_synced(tab1, 0)
    tab2 = devices.open(laptop, user)
    phone = devices.open(devices.new(), user)
    wait_synced(tab2, 0)
    wait_synced(phone, 0)
    roles = {tab1.inner_text("#role"), tab2.inner_text("#role")}
    assert roles == {"this tab syncs", "another tab syncs"}

    add(tab2, "From the second tab")  # written by a tab that does not talk to the hub
    add(tab1, "From the first tab")
    add(phone, "From the phone")
    for page in (tab1, tab2, phone):
        expect(page.locator("#todos li")).to_have_count(3)
        wait_synced(page, 3)
    listed = {d["device"]: d["connections"] for d in devices.hub.devices(user)}
    assert sorted(listed.values()) == [1, 1], listed  # one connection per device, not per tab

    # The syncing tab closes: the other one takes over, and nothing is lost.
    leader, follower = (
        (tab1, tab2) if tab1.inner_text("#role") == "this tab syncs" else (tab2, tab1)
    )
    leader.close()
    expect(follower.locator("#role")).to_have_text("this tab syncs")
    add(follower, "After the handover")
    expect(item(phone, "After the handover")).to_be_visible()
    wait_synced(follower, 4)
    devices.shot(follower, "handover")
    wait_equal([follower, phone], devices.hub, user)


def test_hub_restart_and_resync_from_zero(devices: Devices) -> None:
    """SIGTERM closes with 1012 ("reconnect in N s"); edits made meanwhile wait in
    the outbox. After ``hub resync-all`` every cursor gets 410: the client starts
    again from 0 and ends up with the hub's state."""
    hub = devices.hub
    user = new_user()
    a = devices.open(devices.new(), user)
    b = devices.open(devices.new(), user)
    wait_synced(a, 0)
    wait_synced(b, 0)
    add(a, "Before the restart")
    add(a, "Deleted before the restart")
    expect(item(b, "Deleted before the restart")).to_be_visible()
    item(b, "Deleted before the restart").locator("button.delete").click()
    wait_synced(a, 1)
    wait_synced(b, 1)

    for page in (a, b):
        page.evaluate("() => window.hub.sync()")  # a cursor past 0, for resync-all to refuse
        page.evaluate(
            """() => {
                window.seen = {closes: [], sources: []};
                window.hub.on('disconnect', (d) => window.seen.closes.push(d));
                window.hub.on('change', (d) => window.seen.sources.push(d.source));
            }"""
        )
    hub.stop()
    expect(a.locator("#state")).to_have_text("offline")
    add(a, "While the hub was down")
    expect(a.locator("#pending")).to_have_text("1 pending")
    hub.cli("resync-all", "--yes")
    hub.start()

    expect(item(b, "While the hub was down")).to_be_visible(timeout=20_000)
    wait_synced(a, 2)
    wait_synced(b, 2)
    devices.shot(b, "after-restart")
    wait_equal([a, b], hub, user)
    assert sorted(titles(a)) == ["Before the restart", "While the hub was down"]
    for page in (a, b):
        seen = page.evaluate("() => window.seen")
        first = seen["closes"][0]
        assert first["code"] == 1012 and "reconnect in" in first["reason"], seen
        assert "reset" in seen["sources"], seen  # 410 reset_required: rebuilt from 0


def test_a_revoked_device_stops_reconnecting(devices: Devices) -> None:
    """4003: the client says "forbidden" and stays away; its local data stays."""
    hub = devices.hub
    user = new_user()
    page = devices.open(devices.new(), user)
    wait_synced(page, 0)
    add(page, "Kept locally")
    wait_synced(page, 1)
    device = page.evaluate("() => localStorage.getItem('hub-demo-device')")
    answer = httpx.delete(
        f"{hub.url}/v1/devices/{device}",
        headers={"Authorization": f"Bearer {hub.token(user)}"},
        timeout=10,
    )
    assert answer.status_code == 204, answer.text
    expect(page.locator("#state")).to_have_text("forbidden")
    expect(page.locator("#error")).not_to_be_empty()
    page.wait_for_timeout(1500)  # no reconnect: still forbidden, no connection
    expect(page.locator("#state")).to_have_text("forbidden")
    assert [d["connections"] for d in hub.devices(user) if d["device"] == device] == [0]
    assert titles(page) == ["Kept locally"]
    devices.shot(page, "revoked")


# -- what goes wrong between the hub and a device ------------------------------------------------


class Relay:
    """Relays a page's WebSocket to the hub message by message, so that a test
    can make the hub's answers come late, come as errors, or not come at all.

    - ``refuse_connections``: that many connections are closed with 1013 at the
      auth message, as the hub does while its database is down;
    - ``refuse_pulls``: error codes the next pulls are answered with, with
      ``retry_after``, as the hub answers them when busy;
    - ``hold_pulls``: that many answers to pulls from a cursor (not from 0) are
      kept in ``held`` until :meth:`release`;
    - ``after_welcome``: messages sent to the page right after a welcome;
    - ``max_changes``: pushes of more changes are answered payload_too_large,
      as a hub set to take fewer changes per push answers them;
    - ``silent_connections``: that many connections are taken and never
      answered, as by a hung hub or proxy.
    """

    def __init__(self) -> None:
        self.refuse_connections = 0
        self.refuse_pulls: list[str] = []
        self.hold_pulls = 0
        self.held: list[tuple[WebSocketRoute, str]] = []
        self.after_welcome: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None
        self.pulls: dict[str, Any] = {}  # pull id -> since
        self.max_changes: int | None = None
        self.refused_pushes = 0
        self.silent_connections = 0  # taken, and never answered (a hung hub)

    def __call__(self, ws: WebSocketRoute) -> None:
        if self.silent_connections > 0:
            self.silent_connections -= 1
            ws.on_message(lambda _: None)
            return
        if self.refuse_connections > 0:
            self.refuse_connections -= 1
            ws.on_message(
                lambda _: ws.close(code=1013, reason="the database is unavailable; retry")
            )
            return
        hub = ws.connect_to_server()

        def from_page(text: str | bytes) -> None:
            message = json.loads(text)
            too_many = (
                self.max_changes is not None and len(message.get("changes", [])) > self.max_changes
            )
            if message.get("type") == "push" and too_many:
                self.refused_pushes += 1
                refusal = {
                    "type": "error",
                    "code": "payload_too_large",
                    "message": f"number of changes is {len(message['changes'])}",
                    "id": message["id"],
                }
                ws.send(json.dumps(refusal))
                return
            if message.get("type") == "pull":
                self.pulls[message["id"]] = message["since"]
                if self.refuse_pulls:
                    refusal = {
                        "type": "error",
                        "code": self.refuse_pulls.pop(0),
                        "message": "try again later",
                        "id": message["id"],
                        "retry_after": 0.2,
                    }
                    ws.send(json.dumps(refusal))
                    return
            hub.send(text)

        def from_hub(text: str | bytes) -> None:
            message = json.loads(text)
            kind = message.get("type")
            if kind == "changes" and self.hold_pulls > 0 and self.pulls.get(message["id"]) != 0:
                self.hold_pulls -= 1
                self.held.append((ws, str(text)))
                return
            ws.send(text)
            if kind == "welcome" and self.after_welcome is not None:
                for extra in self.after_welcome(message):
                    ws.send(json.dumps(extra))

        ws.on_message(from_page)
        hub.on_message(from_hub)

    def release(self) -> None:
        held, self.held = self.held, []
        for ws, text in held:
            ws.send(text)


def wait_until(page: Page, condition: Callable[[], bool], what: str) -> None:
    """Wait for a condition on this side (the relay's), letting Playwright's events run."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        page.wait_for_timeout(20)


def watch(page: Page) -> None:
    """Keep the client's events from now on in ``window.seen``."""
    page.evaluate(
        """() => {
            window.seen = {errors: [], closes: [], sources: [], states: []};
            window.hub.on('error', (d) => window.seen.errors.push(d));
            window.hub.on('disconnect', (d) => window.seen.closes.push(d));
            window.hub.on('change', (d) => window.seen.sources.push(d.source));
            window.hub.on('status', (d) => window.seen.states.push(d.state));
        }"""
    )


def stamp(device: str = "other") -> str:
    return f"{time.time_ns() // 1_000_000:013d}-0000-{device}"


def todo(record_id: str, title: str, **more: Any) -> dict[str, Any]:
    """An upsert of a todo as pushed, stamped now by the device ``other``."""
    now = stamp()
    fields = {"title": {"value": title, "hlc": now}}
    fields.update({name: {"value": value, "hlc": now} for name, value in more.items()})
    return {"collection": "todos", "id": record_id, "op": "upsert", "fields": fields}


def http_push(hub: DevHub, user: str, changes: list[dict[str, Any]]) -> None:
    """A push by another device of the user, over HTTP."""
    answer = httpx.post(
        f"{hub.url}/v1/sync/push",
        json={"device": "other", "changes": changes},
        headers={"Authorization": f"Bearer {hub.token(user)}"},
        timeout=30,
    )
    answer.raise_for_status()


def queue_unchecked(page: Page, change: dict[str, Any]) -> None:
    """Put a change straight into the outbox, as a client without today's checks
    of upsert may have left it there."""
    page.evaluate(
        """(change) => new Promise((resolve, reject) => {
            const tx = window.hub.db.transaction('outbox', 'readwrite');
            tx.objectStore('outbox').add({change, batch: ''});
            tx.oncomplete = () => resolve();
            tx.onerror = () => reject(tx.error);
        })""",
        change,
    )


def hub_titles(hub: DevHub, user: str) -> list[str]:
    state = server_state(hub, user)
    return sorted(fields["title"][0] for (_, _), (fields, _) in state.items() if "title" in fields)


def test_changes_the_hub_would_refuse_throw_before_anything_is_written(devices: Devices) -> None:
    """upsert and delete check what the hub checks: a change they take is one
    the hub takes, and one they refuse leaves no trace."""
    hub = devices.hub
    user = new_user()
    page = devices.open(devices.new(), user)
    wait_synced(page, 0)
    watch(page)
    refused = page.evaluate(
        """async () => {
            const deep = (n) => JSON.parse('['.repeat(n) + ']'.repeat(n));
            const big = {};
            for (let i = 0; i < 17; i++) big['part' + i] = 'x'.repeat(63 * 1024);
            const writes = {
                origin: () => hub.upsert('things', 'a', {t: 'x'}, {origin: 'robot'}),
                deleteOrigin: () => hub.delete('things', 'a', {origin: 'robot'}),
                nul: () => hub.upsert('things', 'a', {t: 'a\\u0000b'}),
                nulKey: () => hub.upsert('things', 'a', {t: {'k\\u0000': 1}}),
                nulId: () => hub.upsert('things', 'a\\u0000', {t: 1}),
                nulActor: () => hub.upsert('things', 'a', {t: 1}, {actor: {who: '\\u0000'}}),
                loneSurrogate: () => hub.upsert('things', 'a', {t: 'a\\uD800'}),
                deep: () => hub.upsert('things', 'a', {t: deep(129)}),
                // 212 numbers of 309 digits each, as PostgreSQL writes 1e308: over 64 KiB
                exponents: () => hub.upsert('things', 'a', {t: Array(212).fill(1e308)}),
                actor: () => hub.upsert('things', 'a', {t: 1}, {actor: {note: 'y'.repeat(4100)}}),
                nan: () => hub.upsert('things', 'a', {t: NaN}),
                infinity: () => hub.upsert('things', 'a', {t: [1, -Infinity]}),
                value: () => hub.upsert('things', 'a', {t: 'z'.repeat(64 * 1024)}),
                // every field under 64 KiB, the change over what one message carries
                tooBig: () => hub.upsert('things', 'a', big),
            };
            const out = {};
            for (const [name, write] of Object.entries(writes)) {
                try {
                    await write();
                    out[name] = 'written';
                } catch (err) {
                    out[name] = err.name;
                }
            }
            return {out, pending: hub.status.pending, records: (await hub.records()).length};
        }"""
    )
    assert refused["pending"] == 0 and refused["records"] == 0, refused
    assert all(kind in ("TypeError", "RangeError") for kind in refused["out"].values()), refused

    # Just within every limit: written here, and taken by the hub.
    page.evaluate(
        """async () => {
            const deep = (n) => JSON.parse('['.repeat(n) + ']'.repeat(n));
            await hub.upsert('things', 'deep', {t: deep(128)});
            await hub.upsert('things', 'exponents', {t: Array(211).fill(1e308)});
            const options = {actor: {note: 'y'.repeat(4000)}, origin: 'agent'};
            await hub.upsert('things', 'actor', {t: 1}, options);
            await hub.upsert('things', 'value', {t: 'z'.repeat(64 * 1024 - 2)});
            await hub.upsert('things', 'text', {t: 'ünïcödé 🎉', 'k.1': {'🎉': [-0, 1.5e-7]}});
            await hub.delete('things', 'text', {origin: 'migration', actor: {by: 'me'}});
        }"""
    )
    wait_synced(page)
    assert page.evaluate("() => window.seen.errors") == []
    assert sorted(key[1] for key in server_state(hub, user)) == [
        "actor",
        "deep",
        "exponents",
        "text",
        "value",
    ]


def test_one_refused_change_leaves_the_rest_of_its_push(devices: Devices) -> None:
    """The hub refuses a push whole, naming the change: that change is dropped
    (and reported), the others of its push go again and arrive."""
    hub = devices.hub
    user = new_user()
    context = devices.new()
    page = devices.open(context, user)
    wait_synced(page, 0)
    add(page, "Synced before")
    wait_synced(page, 1)
    watch(page)
    context.set_offline(True)
    expect(page.locator("#state")).to_have_text("offline")
    add(page, "Written offline")
    bad = todo("t-bad", "Refused by the hub") | {"origin": "robot"}
    queue_unchecked(page, bad)
    add(page, "Also written offline")
    expect(page.locator("#pending")).to_have_text("3 pending")
    context.set_offline(False)

    wait_synced(page, 3)
    errors = page.evaluate("() => window.seen.errors")
    assert [(e["code"], e["changes"]) for e in errors] == [("invalid_change", [bad])], errors
    assert hub_titles(hub, user) == ["Also written offline", "Synced before", "Written offline"]
    wait_equal([page], hub, user)


def test_a_change_too_big_for_one_message_never_blocks_the_outbox(devices: Devices) -> None:
    """A change over what one message carries is refused by upsert; one already
    in the outbox is dropped and reported, never sent (the hub would close the
    connection with 1009, again at every reconnect)."""
    hub = devices.hub
    user = new_user()
    context = devices.new()
    page = devices.open(context, user)
    wait_synced(page, 0)
    watch(page)
    big = {f"part{i}": "x" * (63 * 1024) for i in range(17)}
    thrown = page.evaluate(
        """async (big) => {
            try {
                await hub.upsert('todos', 't-big', {title: 'Big', ...big});
                return 'written';
            } catch (err) {
                return err.name;
            }
        }""",
        big,
    )
    assert thrown == "RangeError"
    assert page.evaluate("() => hub.status.pending") == 0

    context.set_offline(True)
    expect(page.locator("#state")).to_have_text("offline")
    add(page, "Before the big one")
    queue_unchecked(page, todo("t-big", "Big", **big))
    add(page, "After the big one")
    context.set_offline(False)
    wait_synced(page, 2)
    seen = page.evaluate("() => window.seen")
    assert [(e["code"], [c["id"] for c in e["changes"]]) for e in seen["errors"]] == [
        ("payload_too_large", ["t-big"])
    ], seen["errors"]
    assert [c["code"] for c in seen["closes"]] == [1006], seen["closes"]  # going offline only
    assert hub_titles(hub, user) == ["After the big one", "Before the big one"]
    wait_equal([page], hub, user)


def test_a_hub_taking_fewer_changes_per_push_gets_them_all(devices: Devices) -> None:
    """A push refused as payload_too_large (a hub taking fewer changes per push
    than the client's 200) goes again in halves; nothing is dropped."""
    hub = devices.hub
    user = new_user()
    relay = Relay()
    context = devices.new()
    page = devices.open(context, user, relay)
    wait_synced(page, 0)
    watch(page)
    context.set_offline(True)
    expect(page.locator("#state")).to_have_text("offline")
    relay.max_changes = 5
    for i in range(12):
        add(page, f"Offline {i:02d}")
    expect(page.locator("#pending")).to_have_text("12 pending")
    context.set_offline(False)
    wait_synced(page, 12)
    assert relay.refused_pushes >= 1
    assert page.evaluate("() => window.seen.errors") == []
    assert hub_titles(hub, user) == [f"Offline {i:02d}" for i in range(12)]
    wait_equal([page], hub, user)


def test_a_resync_does_not_take_a_page_asked_before_it(devices: Devices) -> None:
    """A push refused for good starts a resync while a pull from the old cursor
    is on its way: that page is not the resync's first page (which replaces the
    replica); the resync pulls from 0 and keeps every record."""
    hub = devices.hub
    user = new_user()
    http_push(hub, user, [todo(f"old-{i}", f"Old {i}") for i in range(3)])
    relay = Relay()
    page = devices.open(devices.new(), user, relay)
    wait_synced(page, 3)
    http_push(hub, user, [todo(f"new-{i}", f"New {i}") for i in range(2)])
    wait_synced(page, 5)  # as events; the cursor stays where it was
    watch(page)

    relay.hold_pulls = 1
    page.evaluate("() => { window.hub.sync(); }")  # its answer is held
    wait_until(page, lambda: len(relay.held) == 1, "the pull's answer")
    queue_unchecked(page, todo("t-bad", "Refused by the hub") | {"origin": "robot"})
    page.evaluate("() => { window.hub.sync(); }")  # sends the bad change: the resync begins
    page.wait_for_function("() => window.seen.errors.length > 0")
    relay.release()

    page.wait_for_function("() => window.seen.sources.includes('reset')")  # the replica replaced
    wait_synced(page, 5)
    wait_equal([page], hub, user)
    errors = page.evaluate("() => window.seen.errors")
    assert [e["code"] for e in errors] == ["invalid_change"], errors


def test_a_refused_pull_is_asked_again(devices: Devices) -> None:
    """Pulls answered rate_limited, unavailable or internal are asked again
    after retry_after; the client says syncing until one succeeds."""
    hub = devices.hub
    user = new_user()
    http_push(hub, user, [todo("t-1", "Already there")])
    relay = Relay()
    relay.refuse_pulls = ["rate_limited", "unavailable", "internal"]  # the pulls on connect
    page = devices.open(devices.new(), user, relay)
    wait_synced(page, 1)
    assert relay.refuse_pulls == []

    watch(page)
    relay.refuse_pulls = ["rate_limited"]
    # An event over 64 KiB comes as sync_available: the client pulls.
    http_push(
        hub, user, [todo("t-2", "Too big for an event", notes="n" * 40_000, more="m" * 40_000)]
    )
    wait_synced(page, 2)
    assert relay.refuse_pulls == []
    states = page.evaluate("() => window.seen.states")
    assert states[-2:] == ["syncing", "online"], states
    wait_equal([page], hub, user)


def test_repeated_1013_before_a_welcome_backs_off(devices: Devices) -> None:
    """While the hub cannot serve (its database is down) it closes every new
    connection with 1013: the client waits longer each time."""
    user = new_user()
    relay = Relay()
    context = devices.new()
    page = devices.open(context, user, relay)
    wait_synced(page, 0)
    watch(page)
    page.evaluate("() => { Math.random = () => 0.999; }")  # the top of each jitter range
    relay.refuse_connections = 3
    context.set_offline(True)
    expect(page.locator("#state")).to_have_text("offline")
    context.set_offline(False)  # reconnects at once, and is refused thrice

    wait_synced(page, 0)
    closes = page.evaluate("() => window.seen.closes")
    delays = [c["reconnectInMs"] for c in closes if c["code"] == 1013]
    assert delays == [500, 999, 1998], closes  # 0.5 s x 2^attempt, at the top of the jitter
    assert relay.refuse_connections == 0


def test_another_users_events_never_reach_a_replica(devices: Devices) -> None:
    """A replica (A's) whose token function hands out another user's token (B's)
    refuses the connection before anything that follows the welcome is merged,
    even when its IndexedDB is slow."""
    hub = devices.hub
    user_a, user_b = new_user(), new_user()
    relay = Relay()
    page = devices.open(devices.new(), None, relay)
    page.evaluate(
        """async (token) => {
            const m = await import('/client/hub.js');
            const client = new m.HubClient({device: 'd1', dbName: 'shared', token});
            await client.start();
            await client.upsert('todos', 'a1', {title: "A's todo"});
            await new Promise((resolve) => client.on('status', (s) => {
                if (s.state === 'online' && s.pending === 0) resolve();
            }));
            client.close();
        }""",
        hub.token(user_a),
    )

    def event_of_b(welcome: dict[str, Any]) -> list[dict[str, Any]]:
        if welcome["user"] != user_b:
            return []
        now = stamp("b-phone")
        delta = {
            "collection": "todos",
            "id": "b1",
            "version": welcome["version"] + 1,
            "device": "b-phone",
            "fields": {"title": {"value": "B's private todo", "hlc": now}},
            "deleted": False,
            "deleted_hlc": None,
            "origin": None,
            "actor": None,
        }
        return [
            {
                "type": "change",
                "version": welcome["version"] + 1,
                "prev": welcome["version"],
                "device": "b-phone",
                "changes": [delta],
            }
        ]

    relay.after_welcome = event_of_b
    result = page.evaluate(
        """async ({token, user}) => {
            const until = (test, what) => new Promise((resolve, reject) => {
                const started = Date.now();
                const poll = () => {
                    if (test()) resolve();
                    else if (Date.now() - started > 10000) reject(new Error(what));
                    else setTimeout(poll, 10);
                };
                poll();
            });
            // Count the messages the page gets.
            window.received = 0;
            const Base = window.WebSocket;
            window.WebSocket = class extends Base {
                constructor(...args) {
                    super(...args);
                    this.addEventListener('message', () => { window.received += 1; });
                }
            };
            const m = await import('/client/hub.js');
            const client = new m.HubClient({device: 'd1', dbName: 'shared', token, user});
            const errors = [];
            client.on('error', (e) => errors.push(e.code));
            await client.start();
            // A slow IndexedDB from now: the replica's meta store stays busy until released.
            const db = await new Promise((resolve, reject) => {
                const open = indexedDB.open('shared', 1);
                open.onsuccess = () => resolve(open.result);
                open.onerror = () => reject(open.error);
            });
            let busy = true;
            const tx = db.transaction('meta', 'readwrite');
            const spin = () => { if (busy) tx.objectStore('meta').get('user').onsuccess = spin; };
            spin();
            const freed = new Promise((resolve) => { tx.oncomplete = resolve; });
            await until(() => window.received >= 1, 'the welcome');
            await new Promise((resolve) => setTimeout(resolve, 50)); // and the event, if it came
            busy = false;
            await freed;
            db.close();
            await until(() => client.status.state === 'forbidden', 'forbidden');
            const ids = (await client.records()).map((r) => r.id);
            client.close();
            return {errors, ids};
        }""",
        {"token": hub.token(user_b), "user": user_a},
    )
    assert result == {"errors": ["wrong_user"], "ids": ["a1"]}, result


def test_short_lived_tokens_are_not_refreshed_over_and_over(devices: Devices) -> None:
    """A token that lives 30 s is warned about at once (the hub warns a minute
    ahead), and again after each refresh: the client refreshes once per 15 s
    at most, not at every warning."""
    hub = devices.hub
    user = new_user()
    secret = (hub.log_dir / "data" / "dev-jwt-secret").read_text().strip()
    calls: list[float] = []

    def short_token() -> str:
        calls.append(time.monotonic())
        return make_token(secret, user, ttl_s=30)

    page = devices.open(devices.new(), None)
    page.expose_function("shortToken", short_token)
    page.evaluate(
        """async () => {
            const m = await import('/client/hub.js');
            const client = new m.HubClient(
                {device: 'd1', dbName: 'short-tokens', token: () => window.shortToken()});
            window.client = client;
            await client.start();
            await new Promise((resolve) => client.on('status', (s) => {
                if (s.state === 'online') resolve();
            }));
        }"""
    )
    deadline = time.monotonic() + 10
    while len(calls) < 2 and time.monotonic() < deadline:  # connect, then the first refresh
        page.wait_for_timeout(50)
    assert len(calls) == 2, len(calls)
    page.wait_for_timeout(2000)  # what answering every warning would make of it meanwhile
    assert len(calls) == 2, len(calls)
    page.evaluate("() => window.client.close()")


def test_a_replica_is_its_users_alone(devices: Devices) -> None:
    """Two users on one browser and device id: the replica of each is their
    own, by default, from the first write on. Edits Alice made offline, on a
    replica that never connected, are neither shown to Bob nor pushed as his;
    a replica named by the app and shared by both is refused to the second."""
    hub = devices.hub
    alice, bob = new_user(), new_user()
    context = devices.new()
    page = devices.open(context, None)
    page.evaluate("async () => { window.m = await import('/client/hub.js'); }")
    context.set_offline(True)
    page.evaluate(
        """async (token) => {
            const client = new window.m.HubClient({device: 'd1', token});
            await client.start();
            await client.upsert('todos', 'a1', {title: "Alice's, offline"});
            client.close();
        }""",
        hub.token(alice),
    )
    context.set_offline(False)
    result = page.evaluate(
        """async ({bobToken, aliceToken}) => {
            const m = await import('/client/hub.js');
            const synced = (client) => new Promise((resolve) => {
                const check = (s) => { if (s.state === 'online' && s.pending === 0) resolve(); };
                client.on('status', check);
                check(client.status);
            });
            const bob = new m.HubClient({device: 'd1', token: bobToken});
            await bob.start();
            const bobSees = (await bob.list('todos')).map((r) => r.id);
            await bob.upsert('todos', 'b1', {title: "Bob's"});
            await synced(bob);
            bob.close();
            const alice = new m.HubClient({device: 'd1', token: aliceToken});
            await alice.start();
            const aliceSees = (await alice.list('todos')).map((r) => r.id);
            await synced(alice);
            alice.close();
            // A database the app names, shared: the second user is refused.
            const first = new m.HubClient({device: 'd2', dbName: 'app-db', token: aliceToken});
            await first.start();
            first.close();
            const second = new m.HubClient({device: 'd2', dbName: 'app-db', token: bobToken});
            let refused = null;
            try {
                await second.start();
            } catch (err) {
                refused = err.code;
            }
            return {bobSees, aliceSees, refused, state: second.status.state};
        }""",
        {"bobToken": hub.token(bob), "aliceToken": hub.token(alice)},
    )
    assert result == {
        "bobSees": [],
        "aliceSees": ["a1"],
        "refused": "wrong_user",
        "state": "forbidden",
    }, result
    assert [d["id"] for d in hub.pull_all(alice)] == ["a1"]
    assert [d["id"] for d in hub.pull_all(bob)] == ["b1"]


def test_a_connection_never_welcomed_is_given_up_and_tried_again(devices: Devices) -> None:
    """A hub (or proxy) that takes the WebSocket and never answers: after 15 s
    the client drops it, says so, and connects again."""
    relay = Relay()
    relay.silent_connections = 1
    page = devices.open(devices.new(), None, relay)
    closes = page.evaluate(
        """async (token) => {
            const m = await import('/client/hub.js');
            const client = new m.HubClient({device: 'd1', token});
            const closes = [];
            client.on('disconnect', (d) => closes.push([d.code, d.reason]));
            await client.start();
            await new Promise((resolve) => client.on('status', (s) => {
                if (s.state === 'online') resolve();
            }));
            client.close();
            return closes;
        }""",
        devices.hub.token(new_user()),
    )
    assert closes == [[4000, "no welcome from the hub"]], closes
    assert relay.silent_connections == 0


def test_changes_past_a_pushs_limits_are_refused_and_batches_keep_within_them(
    devices: Devices,
) -> None:
    """What the hub refuses for a whole push is refused by upsert (more than
    20,000 fields; numbers that add more than 1 MiB once written out), and
    queued changes that each pass go in pushes that pass too: 18 changes of
    about 60 KiB of written-out numbers each are all stored."""
    user = new_user()
    page = devices.open(devices.new(), None)
    result = page.evaluate(
        """async (token) => {
            const m = await import('/client/hub.js');
            const client = new m.HubClient({device: 'd1', token, tabs: false});
            const errors = [];
            client.on('error', (e) => errors.push(e.code));
            await client.start();
            const refusals = [];
            const many = {};
            for (let i = 0; i <= 20000; i++) many['f' + i] = 0;
            const huge = {};
            for (let i = 0; i < 18; i++) huge['f' + i] = Array(200).fill(1e308);
            for (const fields of [many, huge]) {
                try {
                    await client.upsert('todos', 'refused', fields);
                    refusals.push('written');
                } catch (err) {
                    refusals.push(err.name);
                }
            }
            for (let i = 0; i < 18; i++) {
                await client.upsert('todos', 'n' + i, {big: Array(200).fill(1e308)});
            }
            await new Promise((resolve) => {
                const check = (s) => { if (s.state === 'online' && s.pending === 0) resolve(); };
                client.on('status', check);
                check(client.status);
            });
            client.close();
            return {refusals, errors};
        }""",
        devices.hub.token(user),
    )
    assert result == {"refusals": ["RangeError", "RangeError"], "errors": []}, result
    stored = {d["id"] for d in devices.hub.pull_all(user)}
    assert stored == {f"n{i}" for i in range(18)}


def test_start_and_close_race_and_legacy_replicas(devices: Devices) -> None:
    """A client closed while it starts lets go of its database (it can be
    deleted); an actor's numbers count toward a push's limit; a replica of
    the version before (named "hub:<device>", filled offline, never
    connected) is taken over and its queued edit pushed."""
    user = new_user()
    page = devices.open(devices.new(), None)
    result = page.evaluate(
        """async (token) => {
            const m = await import('/client/hub.js');
            const early = new m.HubClient({device: 'd9', dbName: 'race', token});
            const starting = early.start().catch((err) => err.name);
            early.close();
            await starting;
            const deleted = await new Promise((resolve) => {
                const r = indexedDB.deleteDatabase('race');
                r.onsuccess = () => resolve('deleted');
                r.onblocked = () => setTimeout(() => resolve('blocked'), 2000);
            });
            // A replica as the version before left it: no user yet, one edit queued.
            const legacy = await new Promise((resolve, reject) => {
                const open = indexedDB.open('hub:d1', 1);
                open.onupgradeneeded = () => {
                    const db = open.result;
                    db.createObjectStore('records');
                    db.createObjectStore('outbox', {keyPath: 'seq', autoIncrement: true})
                        .createIndex('batch', 'batch');
                    db.createObjectStore('meta');
                };
                open.onsuccess = () => resolve(open.result);
                open.onerror = () => reject(open.error);
            });
            const hlc = m.formatStamp(Date.now(), 0, 'd1');
            const change = {collection: 'todos', id: 'old', op: 'upsert',
                            fields: {title: {value: 'made offline', hlc}}};
            await new Promise((resolve) => {
                const tx = legacy.transaction(['records', 'outbox'], 'readwrite');
                const record = {collection: 'todos', id: 'old', ...m.newRecord()};
                m.applyChange(record, change);
                tx.objectStore('records').put(record, ['todos', 'old']);
                tx.objectStore('outbox').add({change, batch: ''});
                tx.oncomplete = resolve;
            });
            legacy.close();
            const client = new m.HubClient({device: 'd1', token, tabs: false});
            await client.start();
            let actor = null;
            const fields = {};
            for (let i = 0; i < 17; i++) fields['f' + i] = Array(203).fill(1e308);
            try {
                await client.upsert('todos', 'big', fields, {actor: Array(13).fill(1e308)});
            } catch (err) {
                actor = err.name;
            }
            await new Promise((resolve) => {
                const check = (s) => { if (s.state === 'online' && s.pending === 0) resolve(); };
                client.on('status', check);
                check(client.status);
            });
            const dbName = client.dbName;
            client.close();
            return {deleted, actor, dbName};
        }""",
        devices.hub.token(user),
    )
    assert result == {"deleted": "deleted", "actor": "RangeError", "dbName": "hub:d1"}, result
    assert [d["id"] for d in devices.hub.pull_all(user)] == ["old"]


def test_a_too_big_change_in_a_batch_claimed_before_does_not_block_the_outbox(
    devices: Devices,
) -> None:
    """A change too big for one message, in a batch an earlier version
    claimed: it leaves the outbox, reported, and what follows is pushed."""
    user = new_user()
    page = devices.open(devices.new(), None)
    result = page.evaluate(
        """async (token) => {
            const m = await import('/client/hub.js');
            const first = new m.HubClient({device: 'd1', dbName: 'stale', token, tabs: false});
            await first.start();
            first.close();
            const db = await new Promise((resolve, reject) => {
                const open = indexedDB.open('stale', 1);
                open.onsuccess = () => resolve(open.result);
                open.onerror = () => reject(open.error);
            });
            const hlc = m.formatStamp(Date.now(), 0, 'd1');
            const change = {collection: 'todos', id: 'huge', op: 'upsert',
                            fields: {body: {value: 'x'.repeat(1100000), hlc}}};
            await new Promise((resolve) => {
                const tx = db.transaction(['outbox'], 'readwrite');
                tx.objectStore('outbox').add({change, batch: 'p-claimed-earlier'});
                tx.oncomplete = resolve;
            });
            db.close();
            const client = new m.HubClient({device: 'd1', dbName: 'stale', token, tabs: false});
            const errors = [];
            client.on('error', (e) => errors.push(e.code));
            await client.start();
            await client.upsert('todos', 'after', {title: 'next'});
            await new Promise((resolve) => {
                const check = (s) => { if (s.state === 'online' && s.pending === 0) resolve(); };
                client.on('status', check);
                check(client.status);
            });
            client.close();
            return errors;
        }""",
        devices.hub.token(user),
    )
    assert result == ["payload_too_large"], result
    assert [d["id"] for d in devices.hub.pull_all(user)] == ["after"]
