"""Dynamic batching: one batcher per model owns its kernel and answers every request.

Requests queue FIFO. The loop takes requests up to ``max_batch_ids`` / ``max_batch_bags``,
concatenates them into one flat batch while the previous batch is still computing, then
tops the batch up with whatever arrived meanwhile and hands it to a one-thread executor
(the kernels release the GIL and use their own threads). Rows are split back per request.
Every admitted request ends with a result or an exception: a failed batch fails each of
its requests with the same error; requests whose client went away or whose deadline
passed are dropped before compute. Admission is bounded in queued ids and bags: past it,
``Overloaded`` (429) at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from prometheus_client import Gauge
from starlette.types import Receive

from kernels.numba_kernel import parallel_from_here
from models import FlatBatch
from models.text import StaticModel, TextBatch
from service.errors import (
    ClientDisconnected,
    ComputeFailed,
    DeadlineExceeded,
    NotReady,
    Overloaded,
)
from service.metrics import Metrics, multiprocess_mode
from service.registry import LoadedModel
from service.settings import Settings

logger = logging.getLogger(__name__)

#: A request still queued this long starts watching for its client's disconnect.
WATCH_AFTER_S = 0.05
#: Batches gathering at most this many bytes of rows run on the event loop (see
#: ``Batcher._inline``): 32 ids of 512-byte rows are 16 KiB.
INLINE_MAX_BYTES = 64 << 10
#: ... and batches of at most this many bytes when nothing else is queued for the model
#: (64 bags of 32 ids of 512-byte rows: ~0.1 ms serially) ...
IDLE_INLINE_MAX_BYTES = 1 << 20
#: ... and of at most this many when, besides, no other request is in flight on this
#: loop (see ``Batcher._inline``).
ALONE_INLINE_MAX_BYTES = 4 << 20
#: The compute thread's kernels run their parallel loops from this many bytes of rows
#: (the event loop's thread never does: see ``Batcher.__init__``). A busy host can stall a
#: parallel loop by a time slice (~5 ms); past ~8 MiB (15-30 ms serially) the second core
#: is worth that risk.
COMPUTE_PARALLEL_MIN_BYTES = 8 << 20


#: How often :class:`LoopLoad` looks, and how late its timer may fire, on average, on a
#: loop with time to spare (one request's work is ~0.2-0.3 ms, so one connection averages
#: ~0.1 ms; a saturated loop runs a timer milliseconds late).
LOAD_PERIOD_S = 0.005
BUSY_LAG_S = 0.0005
#: Refusals by time are held so that they come back at most this often per answer.
REFUSALS_PER_ANSWER = 0.25


#: What a request queues: flat bags (tables, collections) or texts (text models).
Work = FlatBatch | TextBatch


@dataclass(frozen=True)
class BatchResult:
    """One request's rows and how it went. ``rows`` is ``(bags, D)``; ``tokens``: the
    tokens a text request's texts became (0 otherwise)."""

    rows: npt.NDArray[np.floating]
    queue_s: float
    compute_s: float
    batch_bags: int
    batch_ids: int
    tokens: int = 0


def _ids(batch: Work) -> int:
    """A batch's size in the queue's id budget: its ids, or a text batch's characters."""
    return batch.work if isinstance(batch, TextBatch) else int(batch.indices.shape[0])


@dataclass(eq=False)
class _Pending:
    batch: Work
    future: asyncio.Future[BatchResult]
    enqueued: float
    #: The client disconnected while queued: drop it before compute.
    client_gone: bool = False
    #: The waiter gave up (deadline, cancellation): drop it, answer nobody.
    abandoned: bool = False
    ids: int = field(init=False)
    bags: int = field(init=False)
    #: Output rows: bags, or a collection's samples.
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.ids = _ids(self.batch)
        self.bags = self.batch.num_bags
        self.rows = self.batch.num_rows

    @property
    def gone(self) -> bool:
        return self.abandoned or self.client_gone


class _Watch:
    """Listens for ``http.disconnect`` on a queued request's receive channel."""

    def __init__(self, pending: _Pending, receive: Receive | None) -> None:
        self._pending = pending
        self._receive = receive
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._receive is not None and not self._pending.future.done():
            self._task = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        assert self._receive is not None
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._pending.client_gone = True
                return

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


class LoopLoad:
    """Whether the event loop is saturated, from how late a timer it runs every
    :data:`LOAD_PERIOD_S` fires (only while requests come: an idle server sleeps).

    A request alone may be pooled in its own task (:meth:`Batcher._compute_now`), but
    only while the loop has time to spare: under load, requests that wait one turn of the
    loop in the queue batch together and go to the compute thread, which frees the loop
    (one-bag requests at 64 connections: 4,600 req/s queued, 4,080 each in its own task).
    It also keeps the loop polling for a moment after each answer (:meth:`answered`).
    """

    def __init__(self) -> None:
        #: The ticks' lateness, averaged over the last few, is past :data:`BUSY_LAG_S`.
        self.busy = False
        self._lag = 0.0
        self._ticking = False
        self._requests = 0
        #: Seconds the loop polls without sleeping after an answer (``busy_poll_us``).
        self.poll_s = 0.0
        #: Batches now on compute threads: the loop sleeps while they run.
        self.offloaded = 0
        #: Inference requests between dispatch and answer, counted by
        #: :class:`service.fastpath.FastPath`.
        self.in_flight = 0
        self._poll_until = 0.0
        self._polling = False
        #: Answers since the last tick, and their rate per second while the loop is busy
        #: (averaged over ticks): with :attr:`in_flight`, the wait it implies.
        self._answers = 0
        self._rate = 0.0
        self._ticked_at = 0.0
        #: Refusals being held (see :meth:`hold_s`), counted by FastPath.
        self.held = 0

    def saw_request(self) -> None:
        self._requests += 1
        if not self._ticking:
            self._ticking = True
            loop = asyncio.get_running_loop()
            self._ticked_at = loop.time()
            self._answers = 0
            loop.call_at(loop.time() + LOAD_PERIOD_S, self._tick, loop.time() + LOAD_PERIOD_S)

    def _tick(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        # Averaged: one tick lands anywhere in a step of the loop, early or late in it.
        self._lag = 0.5 * self._lag + 0.5 * (now - due)
        self.busy = self._lag > BUSY_LAG_S
        if self.busy and now > self._ticked_at:
            rate = self._answers / (now - self._ticked_at)
            self._rate = rate if not self._rate else 0.8 * self._rate + 0.2 * rate
        self._answers = 0
        self._ticked_at = now
        if self._requests == 0:  # nothing since the last tick: stop until the next one
            self._ticking = self.busy = False
            self._lag = 0.0
            return
        self._requests = 0
        loop.call_at(now + LOAD_PERIOD_S, self._tick, now + LOAD_PERIOD_S)

    def hold_s(self, target: float) -> float:
        """How long to hold a refusal by time: the target wait, or longer when so many
        refused connections cycle that their refusals would come faster than
        :data:`REFUSALS_PER_ANSWER` of the loop's answer rate (each costs the loop its
        HTTP parse and a send: about a third of a one-bag answer)."""
        if self._rate <= 0.0:
            return target
        return max(target, (self.held + 1) / (REFUSALS_PER_ANSWER * self._rate))

    def wait_s(self) -> float:
        """Seconds the requests in flight on this loop ahead of one more take to be
        answered, at the rate the busy loop answers them (Little's law); 0 while the loop
        keeps up. It counts the wait a queue does not show: with many connections the
        loop itself is the bottleneck (parsing, dispatch, encoding answers), and requests
        wait for it, not for the kernel."""
        if not self.busy or self._rate <= 0.0:
            return 0.0
        return max(self.in_flight - 1, 0) / self._rate

    def answered(self) -> None:
        """An answer went out: for the next :attr:`poll_s` the loop polls its sockets
        without sleeping, so a kept-alive connection's next request is read as it lands.

        A loop that sleeps is woken by the kernel when a request arrives, and on these
        VMs that wake-up (an inter-processor interrupt, the thread scheduled again) is a
        large part of a small request's round trip: one-bag requests at one connection
        2,640-3,200 -> 3,230-3,840 req/s with 100-1,000 us of polling (BENCHMARKS.md).
        A callback that schedules itself keeps the loop's poll timeout at zero (asyncio
        and uvloop alike). It stops while a batch runs on a compute thread, whose
        parallel loops want every core, and costs at most ``poll_s`` of a core per
        answer when no request follows."""
        self._answers += 1
        if not self.poll_s:
            return
        loop = asyncio.get_running_loop()
        self._poll_until = loop.time() + self.poll_s
        if not self._polling:
            self._polling = True
            loop.call_soon(self._poll, loop)

    def _poll(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.offloaded or loop.time() >= self._poll_until:
            self._polling = False
            return
        loop.call_soon(self._poll, loop)


_LOADS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopLoad] = (
    weakref.WeakKeyDictionary())


def loop_load(loop: asyncio.AbstractEventLoop | None = None) -> LoopLoad:
    """The one :class:`LoopLoad` of ``loop`` (default: the running loop), shared by its
    batchers, which feed it, and its connections' transports, which read it."""
    loop = loop or asyncio.get_running_loop()
    load = _LOADS.get(loop)
    if load is None:
        load = _LOADS[loop] = LoopLoad()
    return load


def _concat(items: list[_Pending], dtype: np.dtype[np.floating]) -> Work:
    """One batch holding the items' bags (or texts) in order."""
    if len(items) == 1:
        return items[0].batch
    if isinstance(items[0].batch, TextBatch):
        return TextBatch(tuple(text for p in items if isinstance(p.batch, TextBatch)
                               for text in p.batch.texts))
    flat = [p.batch for p in items if isinstance(p.batch, FlatBatch)]
    indices = np.concatenate([b.indices for b in flat])
    offsets = np.zeros(sum(p.bags for p in items) + 1, dtype=np.int64)
    start, base = 0, 0
    for b in flat:
        bags = b.num_bags
        offsets[start + 1 : start + bags + 1] = b.offsets[1:] + base
        start += bags
        base += int(b.indices.shape[0])
    weights = None
    if any(b.per_sample_weights is not None for b in flat):
        # A request without weights weighs every id 1: w * row == row exactly.
        weights = np.concatenate([
            b.per_sample_weights if b.per_sample_weights is not None
            else np.ones(b.indices.shape[0], dtype=dtype) for b in flat])
    return FlatBatch(indices, offsets, weights, flat[0].bags_per_row)


class Batcher:
    """The queue and compute loop of one model. Create and use on the event loop."""

    def __init__(self, model: LoadedModel, settings: Settings, metrics: Metrics) -> None:
        self.model = model
        self._settings = settings
        self._queue: deque[_Pending] = deque()
        self.queued_ids = 0
        self.queued_bags = 0
        self._wake = asyncio.Event()
        self._closing = False
        #: Requests between lookup and answer (see :meth:`hold`).
        self.holders = 0
        self._released: asyncio.Event | None = None
        # The event loop's thread pools serially, and the compute thread in parallel only
        # from COMPUTE_PARALLEL_MIN_BYTES: a parallel loop waits for every thread it woke.
        # Measured on 2 cores, a lone 64-bag request: with both cores busy with other
        # processes its kernel took 7.0-7.4 ms in parallel, 0.05 serially; and with both
        # threads starting parallel loops libgomp's workers slept between calls, so after
        # any burst the lone request's kernel took 0.17 ms instead of 0.05, for good.
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix=f"compute-{model.name}",
            initializer=parallel_from_here, initargs=(COMPUTE_PARALLEL_MIN_BYTES,))
        parallel_from_here(None)
        self._task: asyncio.Task[None] | None = None
        #: The batch computing now, if any.
        self._running: asyncio.Task[None] | None = None
        self._load = loop_load()
        #: Seconds a batch holds the queue (moving average over batches that others
        #: waited for, from one's start to the next's; None before the first): with the
        #: batches the queue makes, the wait it implies.
        self._batch_s: float | None = None
        self._dispatched_at = 0.0
        self._dtype = np.dtype(model.bag.compute_dtype)
        self._cpu_kernel = model.bag.kernel.name in ("numba", "numpy")
        self._row_bytes = model.row_bytes
        # Resolved once: labels() takes a lock and a dict lookup on every call.
        self._count = {outcome: metrics.requests.labels(model.name, outcome)
                       for outcome in ("ok", "invalid", "overloaded", "deadline",
                                       "disconnected", "failed")}
        self._queue_seconds = metrics.queue_seconds.labels(model.name)
        self._request_seconds = metrics.request_seconds.labels(model.name)
        # Read at scrape time: nothing to update per request. Across worker processes a
        # scrape reads files, so there the gauge is updated as the queue moves instead.
        self._queue_gauge: Gauge | None = None
        if multiprocess_mode():
            self._queue_gauge = metrics.queue_ids.labels(model.name)
        else:
            metrics.queue_ids.labels(model.name).set_function(lambda: self.queued_ids)
        self._batch_bags = metrics.batch_bags.labels(model.name)
        self._batch_ids = metrics.batch_ids.labels(model.name)
        self._compute_seconds = metrics.compute_seconds.labels(model.name)
        self._oov_ids = metrics.oov_ids
        #: A collection's oov action per feature (``zero`` skips, ``hash`` wraps).
        self._oov_actions: dict[str, str] = {}
        if model.spec.tables is not None:
            self._oov_actions = {feature: "skipped" if table.oov == "zero" else "hashed"
                                 for table in model.spec.tables
                                 for feature in table.feature_names}
        metrics.table_bytes.labels(model.name, model.bag.table_dtype).set(model.table_bytes)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(),
                                                            name=f"batcher-{self.model.name}")

    def hold(self) -> None:
        """A request took this batcher to answer it: a swap retires the batcher only after
        every such request let go, so each is answered wholly by the table it started on."""
        self.holders += 1

    def release(self) -> None:
        self.holders -= 1
        if self.holders == 0 and self._released is not None:
            self._released.set()

    async def retire(self) -> None:
        """Replaced by a new version: wait for the requests holding this one, answer
        everything queued, then stop. No new request can find it any more."""
        if self.holders:
            self._released = asyncio.Event()
            await self._released.wait()
        await self.close()

    async def close(self) -> None:
        """Stop admitting, finish everything admitted, then stop the loop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, batch: Work, receive: Receive | None = None,
                     timeout: float | None = None) -> BatchResult:
        """Queue one request's validated batch and wait for its rows.

        Args:
            batch: the request in kernel layout.
            timeout: this request's own deadline in seconds, capped by
                ``request_timeout_s`` (``None``: the setting).
            receive: the request's ASGI receive (body already read): a request still
                queued after ``WATCH_AFTER_S`` starts listening on it for the client's
                disconnect, and is dropped before compute if it comes. Requests answered
                sooner never pay for a watcher task.

        Raises:
            Overloaded: the queue is full (429, with Retry-After).
            NotReady: the server is shutting down.
            DeadlineExceeded: not computed within the deadline.
            ComputeFailed: the batch holding this request failed.
        """
        name = self.model.name
        if self._closing:
            raise NotReady("server is shutting down", headers=self._retry())
        enqueued = time.perf_counter()
        settings = self._settings
        if (self.queued_ids + _ids(batch) > settings.max_queue_ids
                or self.queued_bags + batch.num_bags > settings.max_queue_bags):
            self._count["overloaded"].inc()
            raise Overloaded(f"model {name!r} is at capacity ({self.queued_ids} ids and "
                             f"{self.queued_bags} bags queued); retry later",
                             headers=self._retry())
        self._refuse_if_late()
        self._load.saw_request()
        if (not self._queue and not self._computing and not self._load.busy
                and self._inline(batch)):
            return self._compute_now(batch, enqueued)
        loop = asyncio.get_running_loop()
        pending = _Pending(batch, loop.create_future(), enqueued)
        self._queue.append(pending)
        self._account(pending, +1)
        self._wake.set()
        # Timers instead of asyncio.wait_for + shield and an eager watcher: no extra task
        # per request on the common path.
        deadline = settings.request_timeout_s if timeout is None else min(
            timeout, settings.request_timeout_s)
        timer = loop.call_later(deadline, self._expire, pending, deadline)
        watch = _Watch(pending, receive)
        watch_timer = loop.call_later(WATCH_AFTER_S, watch.start) if receive else None
        try:
            return await pending.future
        except asyncio.CancelledError:  # the request task itself was cancelled
            pending.abandoned = True
            self._count["disconnected"].inc()
            raise
        finally:
            timer.cancel()
            if watch_timer is not None:
                watch_timer.cancel()
            watch.stop()

    def _expire(self, pending: _Pending, deadline: float) -> None:
        """The deadline passed before the request's rows were ready."""
        if pending.future.done():
            return
        pending.abandoned = True
        self._count["deadline"].inc()
        pending.future.set_exception(DeadlineExceeded(
            f"model {self.model.name!r} did not answer within {deadline:g} s",
            headers=self._retry()))

    def refuse_if_full(self) -> None:
        """Answer 429 before a body is even read when nothing more can be admitted: under
        a flood, rejecting costs no parsing (measured: the median 429 took 0.3 s when
        every body was parsed first)."""
        settings = self._settings
        if (self.queued_ids >= settings.max_queue_ids
                or self.queued_bags >= settings.max_queue_bags):
            self._count["overloaded"].inc()
            raise Overloaded(f"model {self.model.name!r} is at capacity ({self.queued_ids} "
                             f"ids and {self.queued_bags} bags queued); retry later",
                             headers=self._retry())
        self._load.saw_request()
        self._refuse_if_late()

    def expected_wait(self) -> float:
        """Seconds a request queued now would wait before its batch computes: the batch
        computing now and the batches the queued requests make (each takes what the batch
        budgets allow), each as long as batches held the queue lately while backed up
        (compute plus the answers' encoding on the loop: for 64-bag requests ~3x the
        kernel alone). Counted in batches, not ids: many small queued requests are one
        batch, not many."""
        settings = self._settings
        batches = max(-(-self.queued_ids // settings.max_batch_ids),
                      -(-self.queued_bags // settings.max_batch_bags))
        return (batches + self._computing) * (self._batch_s or 0.0)

    @property
    def _computing(self) -> bool:
        """Whether a batch computes now (its task runs until its answers are handed out)."""
        return self._running is not None and not self._running.done()

    def _refuse_if_late(self) -> None:
        """429 when the wait a request admitted now implies is past ``max_queue_wait_ms``:
        the queue's (:meth:`expected_wait`; a request finding the queue empty is always
        admitted) or the event loop's (:meth:`LoopLoad.wait_s`: the requests in flight
        ahead of it, at the rate the loop answers). Admitted requests keep a latency near
        the target; the refusal is held for that target wait before it goes out
        (``Overloaded.hold_s``). Clients that retry at once are the reason: every one
        of their connections always holds a request, so a refusal answered at once comes
        straight back and frees nothing (Little's law: the admitted requests' latency is
        the connections they hold over the rate they are answered). Held, it keeps its
        connection out of line about as long as an admitted request may wait, and
        :meth:`LoopLoad.hold_s` paces the refused clients (hey at 80 connections,
        ``max_queue_wait_ms=10``: admitted p99 one bag 23.3 -> 15.8 ms, 64 bags 50.5 ->
        17.0 ms, answers/s within 20%; held for the target alone, not paced, the refusals
        came back so often that answers/s fell to 10-55%; BENCHMARKS.md, overload)."""
        bound = self._settings.max_queue_wait_ms / 1e3
        if not bound:
            return
        wait = max(self.expected_wait() if self._queue else 0.0, self._load.wait_s())
        if wait > bound:
            self._count["overloaded"].inc()
            raise Overloaded(f"model {self.model.name!r} is at capacity: a request now would "
                             f"wait ~{wait * 1e3:.0f} ms, past max_queue_wait_ms="
                             f"{self._settings.max_queue_wait_ms:g}; retry later",
                             headers=self._retry(),
                             hold_s=min(self._load.hold_s(bound), self._settings.retry_after_s))

    def record(self, outcome: str, result: BatchResult | None = None,
               total_s: float = 0.0, oov: dict[str, int] | None = None) -> None:
        """Count one finished request (``ok`` with its timings, ``invalid``, ``failed``)
        and, for a collection, the ids its tables' ``oov`` policies skipped or hashed."""
        self._count[outcome].inc()
        if result is not None:
            self._queue_seconds.observe(result.queue_s)
            self._request_seconds.observe(total_s)
        for feature, count in (oov or {}).items():
            self._oov_ids.labels(self.model.name, feature,
                                 self._oov_actions.get(feature, "hashed")).inc(count)

    def _retry(self) -> dict[str, str]:
        return {"Retry-After": str(self._settings.retry_after_s)}

    def _account(self, pending: _Pending, sign: int) -> None:
        self.queued_ids += sign * pending.ids
        self.queued_bags += sign * pending.bags
        if self._queue_gauge is not None:
            self._queue_gauge.inc(sign * pending.ids)

    def _take(self, ids_budget: int, bags_budget: int) -> list[_Pending]:
        """Pop requests FIFO within the budgets, dropping abandoned ones."""
        items: list[_Pending] = []
        ids = bags = 0
        while self._queue:
            pending = self._queue[0]
            if pending.gone:
                self._queue.popleft()
                self._account(pending, -1)
                self._drop(pending)
                continue
            if ids + pending.ids > ids_budget or bags + pending.bags > bags_budget:
                break
            self._queue.popleft()
            self._account(pending, -1)
            items.append(pending)
            ids += pending.ids
            bags += pending.bags
        return items

    def _drop(self, pending: _Pending) -> None:
        if pending.abandoned:
            pending.future.cancel()  # nobody awaits it any more
        elif not pending.future.done():
            self._count["disconnected"].inc()
            pending.future.set_exception(ClientDisconnected(
                "the client disconnected before its batch ran"))

    async def _loop(self) -> None:
        settings = self._settings
        while True:
            if not self._queue:
                if self._closing:
                    break
                self._wake.clear()
                await self._wake.wait()
                continue
            items = self._take(settings.max_batch_ids, settings.max_batch_bags)
            if not items:
                continue
            running = self._running
            backlogged = self._computing
            if running is not None and backlogged:
                prepared = _concat(items, self._dtype)  # overlaps the running batch
                await running
                more = self._take(settings.max_batch_ids - sum(p.ids for p in items),
                                  settings.max_batch_bags - sum(p.bags for p in items))
                if more:
                    items += more
                    prepared = _concat(items, self._dtype)
            else:
                prepared = _concat(items, self._dtype)
            now = time.perf_counter()
            if backlogged:
                # Requests waited for the last batch: from its start to this one's is how
                # long it held the queue, its answers' encoding on the loop included.
                self._held(now - self._dispatched_at)
            self._dispatched_at = now
            self._running = asyncio.get_running_loop().create_task(
                self._compute(items, prepared))
        if self._running is not None:
            await self._running

    def _inline(self, batch: Work) -> bool:
        """Whether to compute ``batch`` on the event loop: a CPU kernel's call under
        :data:`INLINE_MAX_BYTES` of rows (tens of microseconds) costs less than the
        hand-off to the compute thread and back (measured 0.3-0.4 ms on these VMs, ten
        times the kernel for one bag); so does one under :data:`IDLE_INLINE_MAX_BYTES`
        when no other request waits for this model (64-bag requests, one connection:
        1,080-1,160 -> 1,480-1,500 requests/s; 16 connections: +8%; the batches of
        one-bag requests at 16 connections: 3,700-3,800 req/s on the compute thread,
        4,500-4,900 here), and one under :data:`ALONE_INLINE_MAX_BYTES` when, besides, no
        other request is in flight on the loop. The loop pools serially: a 2-4 MiB batch
        holds it for milliseconds, and with other clients' requests in flight
        RELIABILITY's flood (64 clients, 2 MiB requests) read an admitted p99 of 1.6-1.8 s
        in two runs of three without that condition, 0.57-0.60 s with it, while one
        client's 4 MiB KServe requests keep computing here (1,346 -> 1,854 req/s against
        a 1 MiB bound)."""
        if not self._cpu_kernel or isinstance(batch, TextBatch):
            return False  # texts are tokenized on the compute thread, never on the loop
        size = batch.indices.shape[0] * self._row_bytes
        return size <= INLINE_MAX_BYTES or (not self._queue and (
            size <= IDLE_INLINE_MAX_BYTES
            or (size <= ALONE_INLINE_MAX_BYTES and self._load.in_flight <= 1)))

    def _run_kernel(self, batch: Work
                    ) -> tuple[npt.NDArray[np.floating], npt.NDArray[np.int64] | None]:
        """The batch's rows, and for texts each text's token count."""
        bag = self.model.bag
        if isinstance(batch, TextBatch):
            if not isinstance(bag, StaticModel):
                raise TypeError(f"model {self.model.name!r} takes no texts")
            return bag.encode_batch(batch.texts)
        if isinstance(bag, StaticModel):  # token ids sent as they are
            counts = np.diff(batch.offsets)
            return bag.pool(batch.indices, counts), counts
        rows: npt.NDArray[np.floating] = bag.kernel(batch.indices, batch.offsets,
                                                    batch.per_sample_weights)
        return rows, None

    def _compute_now(self, batch: Work, enqueued: float) -> BatchResult:
        """A request small enough for the event loop, with nothing queued or computing:
        pooled in its own task. The queue's round trip (the batching task woken, a
        future, two timers, two more turns of the loop) cost more than the kernel."""
        started = time.perf_counter()
        self._batch_bags.observe(batch.num_bags)
        self._batch_ids.observe(_ids(batch))
        try:
            rows, tokens = self._run_kernel(batch)
        except Exception as exc:  # noqa: BLE001 - answered as any failed batch is
            raise self._failed(exc, 1) from None
        compute_s = time.perf_counter() - started
        self._compute_seconds.observe(compute_s)
        return BatchResult(rows, started - enqueued, compute_s, batch.num_bags, _ids(batch),
                           0 if tokens is None else int(tokens.sum()))

    def _held(self, seconds: float) -> None:
        """A batch held the queue ``seconds``: the moving average admission reads."""
        self._batch_s = seconds if self._batch_s is None else 0.8 * self._batch_s + 0.2 * seconds

    def _failed(self, exc: Exception, requests: int) -> ComputeFailed:
        """Log a failed batch; the error each of its requests gets."""
        name = self.model.name
        logger.exception("batch failed", exc_info=exc,
                         extra={"model": name, "requests": requests})
        return ComputeFailed(f"computing the batch for model {name!r} failed: "
                             f"{type(exc).__name__}")

    async def _compute(self, items: list[_Pending], batch: Work) -> None:
        live = [p for p in items if not p.gone]
        for p in items:
            if p.gone:
                self._drop(p)
        if not live:
            return
        if len(live) != len(items):
            items, batch = live, _concat(live, self._dtype)
        started = time.perf_counter()
        self._batch_bags.observe(batch.num_bags)
        self._batch_ids.observe(_ids(batch))
        try:
            if self._inline(batch):
                rows, tokens = self._run_kernel(batch)
            else:
                self._load.offloaded += 1
                try:
                    rows, tokens = await asyncio.get_running_loop().run_in_executor(
                        self._executor, self._run_kernel, batch)
                finally:
                    self._load.offloaded -= 1
        except Exception as exc:  # noqa: BLE001 - every waiter gets the error
            error = self._failed(exc, len(items))
            for p in items:
                if p.abandoned:
                    p.future.cancel()
                elif not p.future.done():
                    p.future.set_exception(error)
            return
        compute_s = time.perf_counter() - started
        self._compute_seconds.observe(compute_s)
        if self._batch_s is None:
            self._batch_s = compute_s  # a floor until the queue backs up
        start = 0
        for p in items:
            if p.abandoned:
                p.future.cancel()
            elif not p.future.done():
                used = 0 if tokens is None else int(tokens[start : start + p.rows].sum())
                p.future.set_result(BatchResult(rows[start : start + p.rows],
                                                started - p.enqueued, compute_s,
                                                batch.num_bags, _ids(batch), used))
            start += p.rows
