"""The committer: one per process, it commits queued pushes of many users together.

Natural group commit: while one batch's transaction runs, pushes that arrive
wait in the queue; when it ends, everything queued (up to a bound) becomes
the next batch. No timer, no fixed wait: a lone push commits at once, and
under load batches grow until the database keeps up. Measured reason: one
transaction per push is bounded by PostgreSQL's per-transaction cost.

Pushes of one user keep their queue order, so they get versions in the order
they were submitted. One batch is in flight at a time per process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable

from .errors import HubError, Unavailable
from .metrics import Metrics
from .store import Store
from .types import Push, PushResult

__all__ = ["Committer"]

log = logging.getLogger("hub.committer")

# A push, its answer, when it was queued, and the rows it writes.
Queued = tuple[Push, "asyncio.Future[PushResult]", float, int]

SCAN_LIMIT = 4096  # queued pushes looked at for one batch
SMALL_PUSH_ROWS = 100  # a push this small rides along with a full batch ...
RIDE_ALONG_ROWS = 5000  # ... until the riders together write this many rows


class Committer:
    def __init__(
        self,
        store: Store,
        *,
        max_batch_pushes: int = 512,
        max_batch_rows: int = 20000,
        metrics: Metrics | None = None,
    ):
        self.store = store
        self.max_batch_pushes = max_batch_pushes
        self.max_batch_rows = max_batch_rows
        self.metrics = metrics
        self._queue: deque[Queued] = deque()
        self._batch: list[Queued] = []  # the batch being committed
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        # Told of a push committed after its future was answered (abandoned at
        # shutdown): its event is still to be published.
        self.on_late_commit: Callable[[Push, PushResult], None] | None = None

    def start(self) -> None:
        # Kept: asking for the running loop on every push costs a getpid()
        # system call (CPython checks the loop belongs to this process).
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="hub-committer")

    def enqueue(self, push: Push) -> asyncio.Future[PushResult]:
        """Queue a push; the future gets its result or its ``HubError``.

        Futures are resolved in queue order, so callbacks added to them run in
        commit order: the coordinator publishes events from such callbacks.
        """
        if self._closing:
            raise _shutting_down()
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[PushResult] = loop.create_future()
        future.add_done_callback(_consume)
        self._queue.append((push, future, time.perf_counter(), _rows(push)))
        self._wakeup.set()
        return future

    def pending(self) -> int:
        """Pushes not answered yet: queued, and in the batch being committed."""
        return len(self._queue) + sum(not future.done() for _, future, _, _ in self._batch)

    def abandon(self) -> None:
        """Answer every push not answered yet with ``unavailable`` and take no
        more: at shutdown, when the database did not finish in time. A commit
        that still ends well stays committed; the clients' retries are replays."""
        self._closing = True
        for _, future, _, _ in (*self._batch, *self._queue):
            if not future.done():
                future.set_exception(_shutting_down())
        self._queue.clear()
        self._wakeup.set()

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    def _take_batch(self) -> list[Queued]:
        """The next batch: queued pushes in order while their rows (fields
        written, deletes) fit ``max_batch_rows``, the first whatever its size.

        Past that, small pushes of other users still ride along (up to
        RIDE_ALONG_ROWS more), so that one user's big pushes, queued one after
        another, do not make everyone else's small ones wait for each of them.
        A user's pushes keep their order: once one is left for later, so are
        those queued after it.
        """
        batch: list[Queued] = []
        rows = 0
        left: list[Queued] = []
        waiting: set[str] = set()  # users with a push left for a later batch
        queue = self._queue
        for _ in range(min(len(queue), SCAN_LIMIT)):
            if len(batch) >= self.max_batch_pushes:
                break
            item = queue.popleft()
            user, size = item[0].user, item[3]
            if user in waiting:
                left.append(item)
                continue
            fits = not batch or rows + size <= self.max_batch_rows
            rides = size <= SMALL_PUSH_ROWS and rows + size <= self.max_batch_rows + RIDE_ALONG_ROWS
            if not (fits or rides):
                waiting.add(user)
                left.append(item)
                continue
            batch.append(item)
            rows += size
        queue.extendleft(reversed(left))
        return batch

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._batch = self._take_batch()
            began = time.perf_counter()
            try:
                results = await self.store.commit([push for push, _, _, _ in batch])
            except Exception:  # the store answers per push; this is a bug, keep serving
                log.exception("commit of a batch of %d pushes failed", len(batch))
                results = [HubError("the push could not be stored") for _ in batch]
            if self.metrics is not None:
                self._observe(batch, results, began)
            for (push, future, _, _), result in zip(batch, results, strict=True):
                if future.done():
                    if isinstance(result, PushResult) and self.on_late_commit is not None:
                        try:
                            self.on_late_commit(push, result)
                        except Exception:  # its event is best effort; the others' answers are not
                            log.exception("could not publish the event of a late commit")
                    continue
                if isinstance(result, HubError):
                    future.set_exception(result)
                else:
                    future.set_result(result)
            self._batch = []

    def _observe(
        self, batch: list[Queued], results: list[PushResult | HubError], began: float
    ) -> None:
        metrics = self.metrics
        assert metrics is not None
        now = time.perf_counter()
        metrics.commit_seconds.observe(now - began)
        metrics.batch_pushes.observe(len(batch))
        applied = ignored = 0
        kinds: Counter[str] = Counter()
        for (_, _, queued_at, _), result in zip(batch, results, strict=True):
            metrics.push_seconds.observe(now - queued_at)
            if isinstance(result, HubError):
                kinds[result.code] += 1
            elif result.replay:
                kinds["replay"] += 1
            else:
                kinds["applied" if result.applied else "unchanged"] += 1
                applied += result.applied
                ignored += result.ignored
        for kind, n in kinds.items():
            metrics.pushes.labels(kind).inc(n)
        if applied:
            metrics.changes.labels("applied").inc(applied)
        if ignored:
            metrics.changes.labels("ignored").inc(ignored)


def _rows(push: Push) -> int:
    """The rows a push writes: a field row per field written, a record row per delete."""
    return sum(len(c.fields) or 1 for c in push.changes) or 1


def _shutting_down() -> Unavailable:
    return Unavailable("the hub is shutting down; retry", retry_after=1.0)


def _consume(future: asyncio.Future[PushResult]) -> None:
    # Mark the outcome read: a push whose client left is not an unhandled error.
    if not future.cancelled():
        future.exception()
