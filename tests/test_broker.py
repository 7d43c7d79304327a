"""One conformance suite for every broker: the guarantees of hub/broker.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as redis
from support import new_user, wait_for

from hub.broker import Broker
from hub.broker_memory import MemoryBroker
from hub.broker_redis import RedisBroker


class Inbox:
    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.arrived = asyncio.Event()

    def __call__(self, payload: bytes) -> None:
        self.items.append(payload)
        self.arrived.set()

    async def next(self, timeout: float = 5.0) -> bytes:
        await wait_for(lambda: self.items, timeout)
        return self.items.pop(0)


@pytest.fixture(params=["memory", "redis"])
async def pair(request, redis_url) -> AsyncIterator[tuple[Broker, Broker]]:
    """A publishing and a subscribing side: one broker for memory (one process
    is its whole world), two for Redis (as two hub processes)."""
    if request.param == "memory":
        broker = MemoryBroker()
        await broker.start()
        yield broker, broker
        await broker.close()
        return
    a, b = RedisBroker(redis_url), RedisBroker(redis_url)
    await a.start()
    await b.start()
    await wait_for(lambda: a.connected and b.connected)
    yield a, b
    await a.close()
    await b.close()


async def subscribed(broker: Broker, user: str, handler: Callable[[bytes], None]) -> None:
    await asyncio.wait_for(broker.subscribe(user, handler), 5)


async def test_a_subscriber_gets_what_is_published_for_its_user_in_order(pair):
    publisher, subscriber = pair
    user = new_user()
    inbox = Inbox()
    await subscribed(subscriber, user, inbox)
    for i in range(50):
        publisher.publish(user, f"event-{i}".encode())
    received = [await inbox.next() for _ in range(50)]
    assert received == [f"event-{i}".encode() for i in range(50)]


async def test_a_subscriber_never_gets_another_users_events(pair):
    publisher, subscriber = pair
    alice, bob = new_user(), new_user()
    inbox = Inbox()
    await subscribed(subscriber, bob, inbox)
    publisher.publish(alice, b"for alice")
    publisher.publish(bob, b"for bob")
    assert await inbox.next() == b"for bob"
    publisher.publish(bob, b"again")
    assert await inbox.next() == b"again"
    assert inbox.items == []


async def test_unsubscribe_stops_delivery(pair):
    publisher, subscriber = pair
    user, marker_user = new_user(), new_user()
    inbox, marker = Inbox(), Inbox()
    await subscribed(subscriber, user, inbox)
    await subscribed(subscriber, marker_user, marker)
    subscriber.unsubscribe(user)
    # Unsubscribing is asynchronous on the wire; once a later subscription of
    # the same connection works, the earlier unsubscribe has been processed.
    await subscribed(subscriber, new_user(), Inbox())
    publisher.publish(user, b"too late")
    publisher.publish(marker_user, b"marker")
    assert await marker.next() == b"marker"
    assert inbox.items == []


async def test_probe_is_ok_while_the_transport_works(pair):
    publisher, subscriber = pair
    for broker in (publisher, subscriber):
        report = await broker.probe(2.0)
        assert report["ok"] is True and report["kind"] == broker.kind


async def test_payloads_are_delivered_byte_for_byte(pair):
    publisher, subscriber = pair
    user = new_user()
    inbox = Inbox()
    await subscribed(subscriber, user, inbox)
    payload = bytes(range(256)) * 300
    publisher.publish(user, payload)
    assert await inbox.next() == payload


async def test_redis_subscription_comes_back_after_client_kill(redis_url):
    """A killed pub/sub connection (CLIENT KILL TYPE pubsub) is noticed, and the
    broker subscribes again by itself."""
    publisher, subscriber = RedisBroker(redis_url), RedisBroker(redis_url)
    await publisher.start()
    await subscriber.start()
    admin = redis.Redis.from_url(redis_url)
    try:
        user = new_user()
        inbox = Inbox()
        await subscribed(subscriber, user, inbox)
        publisher.publish(user, b"before")
        assert await inbox.next() == b"before"
        reconnects = subscriber.reconnects
        await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await wait_for(lambda: subscriber.reconnects > reconnects, timeout=10)

        async def delivered() -> bool:
            publisher.publish(user, b"after")
            try:
                await asyncio.wait_for(inbox.arrived.wait(), 0.3)
            except TimeoutError:
                return False
            return b"after" in inbox.items

        inbox.arrived.clear()
        await wait_for(delivered, timeout=15, interval=0.1)
        assert (await subscriber.probe(2.0))["ok"] is True
    finally:
        await admin.aclose()
        await publisher.close()
        await subscriber.close()


async def test_redis_broker_reports_an_outage_and_never_raises_on_publish():
    from support import restartable_redis

    with restartable_redis() as server:
        broker = RedisBroker(server.url)
        await broker.start()
        try:
            await wait_for(lambda: broker.connected)
            assert (await broker.probe(2.0))["ok"] is True
            server.stop()
            await wait_for(lambda: not broker.connected, timeout=10)
            broker.publish(new_user(), b"lost")  # dropped, at most once; no exception
            assert (await broker.probe(0.5))["ok"] is False
            server.start()
            await wait_for(lambda: broker.connected, timeout=15)
            report = await wait_for(lambda: _ok_probe(broker), timeout=10, interval=0.1)
            assert report["ok"] is True
        finally:
            await broker.close()


async def _ok_probe(broker: RedisBroker):
    report = await broker.probe(0.5)
    return report if report["ok"] else None


@pytest.fixture
async def redis_user(redis_url) -> AsyncIterator[tuple[str, str, str]]:
    """A Redis ACL user with a password: (url with its credentials, name, password)."""
    import secrets
    from urllib.parse import urlsplit, urlunsplit

    name, password = f"hub-test-{secrets.token_hex(4)}", secrets.token_hex(8)
    admin = redis.Redis.from_url(redis_url)
    await admin.execute_command("ACL", "SETUSER", name, "on", f">{password}", "~*", "&*", "+@all")
    parts = urlsplit(redis_url)
    netloc = f"{name}:{password}@{parts.hostname}:{parts.port}"
    try:
        yield urlunsplit(parts._replace(netloc=netloc)), name, password
    finally:
        await admin.execute_command("ACL", "DELUSER", name)
        await admin.aclose()


async def test_redis_broker_authenticates_with_the_urls_user_and_password(redis_user):
    url, _, _ = redis_user
    publisher, subscriber = RedisBroker(url), RedisBroker(url)
    await publisher.start()
    await subscriber.start()
    try:
        await wait_for(lambda: publisher.connected and subscriber.connected)
        user, inbox = new_user(), Inbox()
        await subscribed(subscriber, user, inbox)
        publisher.publish(user, b"authenticated")
        assert await inbox.next() == b"authenticated"
    finally:
        await publisher.close()
        await subscriber.close()


async def test_redis_broker_with_a_wrong_password_stays_down_and_never_raises(redis_user):
    url, name, password = redis_user
    broker = RedisBroker(url.replace(f":{password}@", ":wrong@"))
    await broker.start()
    try:
        await wait_for(lambda: broker.reconnects >= 2)  # refused, and tried again
        assert not broker.connected
        broker.publish(new_user(), b"kept or dropped, never raised")
        assert (await broker.probe(0.5))["ok"] is False
    finally:
        await broker.close()


def _on_database(url: str, db: int) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


async def test_deployments_on_other_redis_databases_do_not_hear_each_other(redis_url):
    # Two deployments share a Redis server, one on database 13, one on 14
    # (pub/sub itself ignores the number), with the same user ids.
    here, there = [RedisBroker(_on_database(redis_url, db)) for db in (13, 14)]
    neighbour = RedisBroker(_on_database(redis_url, 13))  # another process of `here`
    brokers = (here, there, neighbour)
    for broker in brokers:
        await broker.start()
    try:
        await wait_for(lambda: all(b.connected for b in brokers))
        user = new_user()
        inbox = Inbox()
        await subscribed(here, user, inbox)
        there.publish(user, b"the other deployment's")
        neighbour.publish(user, b"this deployment's")
        assert await inbox.next() == b"this deployment's"
        neighbour.publish(user, b"and again")
        assert await inbox.next() == b"and again"
        assert inbox.items == []
    finally:
        for broker in brokers:
            await broker.close()


async def test_redis_broker_names_the_users_whose_events_a_reconnect_may_have_lost(redis_url):
    """After its pub/sub connection is killed and made again, the broker
    names (on_gap) every user whose channel was live before: one given up
    and wanted again in one loop turn too, not one given up."""
    broker = RedisBroker(redis_url)
    gaps: list[str] = []
    broker.on_gap = gaps.extend
    await broker.start()
    admin = redis.Redis.from_url(redis_url)
    try:
        alice, bob, carol = new_user(), new_user(), new_user()
        for user in (alice, bob, carol):
            await subscribed(broker, user, Inbox())
        broker.unsubscribe(alice)
        broker.subscribe(alice, Inbox())  # (the same loop turn)
        broker.unsubscribe(carol)
        await asyncio.sleep(0.2)  # the UNSUBSCRIBE is sent
        assert gaps == []
        reconnects = broker.reconnects
        await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await wait_for(lambda: broker.reconnects > reconnects, timeout=10)
        await wait_for(lambda: {alice, bob} <= set(gaps), timeout=15)
        assert carol not in gaps
    finally:
        await admin.aclose()
        await broker.close()


async def test_redis_broker_names_users_whose_events_it_dropped_on_a_link_that_holds(
    redis_url, monkeypatch
):
    """An event dropped (the outbox full) while the link stays up is named
    (on_unsure) once a probe proves the link again, not at some later
    reconnect; the other users published meanwhile are not."""
    from hub import broker_redis

    broker = RedisBroker(redis_url, check_s=0.2)
    unsure: list[str] = []
    broker.on_unsure = unsure.extend
    await broker.start()
    try:
        await wait_for(lambda: broker.connected, timeout=10)
        dropped, fine = new_user(), new_user()
        broker.publish(fine, b"goes out")
        monkeypatch.setattr(broker_redis, "MAX_OUTBOX", 0)
        broker.publish(dropped, b"dropped")
        monkeypatch.setattr(broker_redis, "MAX_OUTBOX", 50_000)
        await wait_for(lambda: unsure, timeout=10)
        assert unsure == [dropped] and broker.reconnects == 0
    finally:
        await broker.close()
