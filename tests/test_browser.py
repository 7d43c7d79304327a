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

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import Databases, HubProcess, new_user, spawn_hub

from hub.hlc import Clock
from hub.merge import RecordState, Replica, apply_delete, apply_upsert
from hub.types import Delta

try:
    from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
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

    def open(self, context: BrowserContext, user: str) -> Page:
        page = context.new_page()
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        page.goto(f"{self.hub.url}/?user={user}")
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
