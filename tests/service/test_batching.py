"""The batcher: equivalence under concurrency, faults, overload, deadlines, disconnects,
draining. Kernel doubles add delay or failures around the real kernel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from models import EmbeddingBag
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import WrappedBag, loaded, table, wrapped

EMBED = "/v1/models/{}/embed"


def _post(client: TestClient, model: str, bags: list[list[int]], **extra: Any) -> Any:
    return client.post(EMBED.format(model), json={"bags": bags, **extra})


def test_batched_results_equal_results_alone(make_client: Callable[..., TestClient]) -> None:
    client = make_client([wrapped("slow", "mean", delay=0.02)])
    rng = np.random.default_rng(0)
    requests = [[list(map(int, rng.integers(0, 50, int(n)))) for n in rng.integers(0, 9, 3)]
                for _ in range(40)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda bags: _post(client, "slow", bags), requests))
    engine = EmbeddingBag.from_pretrained(table(), mode="mean")
    batch_sizes = []
    for bags, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        expected = np.stack([engine(np.array([b], np.int64).reshape(1, -1))[0] for b in bags])
        np.testing.assert_array_equal(np.array(response.json()["embeddings"], np.float32),
                                      expected)
        batch_sizes.append(int(response.headers["x-batch-bags"]))
    assert max(batch_sizes) > 3  # concurrent requests really shared batches


def test_batches_respect_the_budgets(make_client: Callable[..., TestClient]) -> None:
    model = wrapped("slow", delay=0.01)
    client = make_client([model], max_batch_bags=4, max_bags_per_request=4)
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda _: _post(client, "slow", [[1], [2]]), range(24)))
    assert isinstance(model.bag, WrappedBag)
    assert max(model.bag.wrapped.calls) <= 4
    assert sum(model.bag.wrapped.calls) == 48  # every bag computed exactly once


def test_failed_batch_fails_each_request_and_next_batch_works(
        make_client: Callable[..., TestClient]) -> None:
    poison = 13
    client = make_client([wrapped("flaky", delay=0.05,
                                  fail=lambda ids: bool((ids == poison).any()))])
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_post, client, "flaky", [[poison if i == 0 else 1]])
                   for i in range(8)]
        responses = [f.result() for f in futures]
    failed = [r for r in responses if r.status_code != 200]
    assert failed, "the poisoned batch must fail"
    for response in failed:
        assert response.status_code == 500
        assert response.json()["error"] == {
            "type": "compute_failed",
            "message": "computing the batch for model 'flaky' failed: RuntimeError"}
        assert "Traceback" not in response.text
    assert _post(client, "flaky", [[1, 2]]).status_code == 200


@pytest.mark.anyio
async def test_overload_answers_429_at_once() -> None:
    settings = Settings(max_queue_bags=2, max_batch_bags=2, max_bags_per_request=1,
                        retry_after_s=3)
    app = create_app(settings, models=[wrapped("slow", delay=0.5)])
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            started = asyncio.get_running_loop().time()
            calls = [http.post(EMBED.format("slow"), json={"bags": [[i]]}) for i in range(10)]
            responses = await asyncio.gather(*calls)
            elapsed = asyncio.get_running_loop().time() - started
    statuses = sorted(r.status_code for r in responses)
    # All ten arrive before the batcher runs: two fit the bound, eight are refused at once.
    assert statuses == [200, 200] + [429] * 8, statuses
    assert elapsed < 2.0
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["retry-after"] == "3"
    assert "is at capacity" in rejected.json()["error"]["message"]


def test_deadline_turns_a_stuck_request_into_503(make_client: Callable[..., TestClient]
                                                 ) -> None:
    client = make_client([wrapped("stuck", delay=0.5)], request_timeout_s=0.1)
    response = _post(client, "stuck", [[1]])
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "deadline_exceeded"
    assert "retry-after" in response.headers


@pytest.mark.anyio
async def test_disconnected_client_is_dropped_before_compute() -> None:
    model = wrapped("slow", delay=0.3)
    app = create_app(Settings(), models=[model])
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            first = asyncio.ensure_future(http.post(EMBED.format("slow"), json={"bags": [[1]]}))
            await asyncio.sleep(0.05)  # the first batch is computing
            second = asyncio.ensure_future(http.post(EMBED.format("slow"),
                                                     json={"bags": [[2], [3]]}))
            await asyncio.sleep(0.05)  # queued behind it
            second.cancel()  # the client goes away
            assert (await first).status_code == 200
            await asyncio.sleep(0.4)
        assert isinstance(model.bag, WrappedBag)
        assert model.bag.wrapped.calls == [1]  # the cancelled request never computed
        metrics = app.state.service.metrics.requests.labels("slow", "disconnected")
        assert metrics._value.get() == 1


@pytest.mark.anyio
async def test_drain_finishes_admitted_requests_and_refuses_new_ones() -> None:
    model = wrapped("slow", delay=0.2)
    app = create_app(Settings(), models=[model])
    state = app.state.service
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            admitted = [asyncio.ensure_future(http.post(EMBED.format("slow"),
                                                        json={"bags": [[i]]}))
                        for i in range(6)]
            await asyncio.sleep(0.05)
            state.begin_drain()
            assert (await http.get("/v2/health/ready")).status_code == 503
            late = await http.post(EMBED.format("slow"), json={"bags": [[1]]})
            assert late.status_code == 503
            assert late.json()["error"]["message"] == "server is shutting down"
            stop = asyncio.ensure_future(state.stop())
            results = await asyncio.gather(*admitted)
            await stop
    assert [r.status_code for r in results] == [200] * 6


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_loaded_helper_builds_real_models() -> None:
    model = loaded("x", "max")
    assert model.bag.mode == "max" and model.dim == 8


@pytest.mark.anyio
async def test_http_disconnect_while_queued_drops_the_request() -> None:
    """The uvicorn path: the handler keeps running, the client's receive channel says
    http.disconnect; the request must not be computed."""
    model = wrapped("slow", delay=0.3)
    app = create_app(Settings(), models=[model])
    sent: list[dict[str, Any]] = []

    async def call(body: bytes, disconnect_after: float | None) -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.sleep(disconnect_after if disconnect_after is not None else 60)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/models/slow/embed",
                 "raw_path": b"/v1/models/slow/embed", "query_string": b"", "headers": [],
                 "http_version": "1.1", "scheme": "http", "server": ("t", 80),
                 "client": ("c", 1), "root_path": ""}
        await app(scope, receive, send)

    async with app.router.lifespan_context(app):
        first = asyncio.ensure_future(call(b'{"bags": [[1]]}', None))
        await asyncio.sleep(0.05)
        await call(b'{"bags": [[2], [3]]}', 0.02)  # queued, then the client leaves
        await first
    assert isinstance(model.bag, WrappedBag)
    assert model.bag.wrapped.calls == [1]
    statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
    assert sorted(statuses) == [200, 499]
    counter = app.state.service.metrics.requests.labels("slow", "disconnected")
    assert counter._value.get() == 1


def test_client_deadline_header_bounds_its_own_wait(make_client: Callable[..., TestClient]
                                                    ) -> None:
    client = make_client([wrapped("stuck", delay=0.5)], request_timeout_s=30)
    response = client.post(EMBED.format("stuck"), json={"bags": [[1]]},
                           headers={"X-Request-Timeout-Ms": "100"})
    assert response.status_code == 503
    assert response.json()["error"] == {
        "type": "deadline_exceeded", "message": "model 'stuck' did not answer within 0.1 s"}
    for bad in ("0", "-5", "soon", "nan", "inf"):
        response = client.post(EMBED.format("stuck"), json={"bags": [[1]]},
                               headers={"X-Request-Timeout-Ms": bad})
        assert response.status_code == 422
        assert "x-request-timeout-ms must be a positive number" in response.text


def test_small_batches_run_on_the_loop_and_larger_ones_on_the_compute_thread(
        make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from service import batcher

    model = wrapped("items", mode="sum")
    kernel = model.bag.wrapped
    kernel.name = "numba"  # a real CPU kernel as far as the batcher knows
    threads: list[str] = []
    inner = kernel.inner

    def recording(*args: Any) -> np.ndarray:
        threads.append(threading.current_thread().name)
        return inner(*args)

    kernel.inner = recording  # type: ignore[assignment]
    client = make_client([model])
    # 8-float rows (32 bytes): 2 ids are 64 bytes, 4,000 ids 128,000 (> 64 KiB, < 1 MiB).
    small = client.post("/v1/models/items/embed", json={"bags": [[1, 2]]})
    load = client.app.state.service.batchers["items"]._load  # type: ignore[attr-defined]
    load.in_flight += 1  # another request between dispatch and answer
    medium = client.post("/v1/models/items/embed", json={"bags": [[3] * 4000]})
    monkeypatch.setattr(batcher, "IDLE_INLINE_MAX_BYTES", 100_000)  # now "large"
    crowded = client.post("/v1/models/items/embed", json={"bags": [[3] * 4000]})
    load.in_flight -= 1
    alone = client.post("/v1/models/items/embed", json={"bags": [[3] * 4000]})
    monkeypatch.setattr(batcher, "ALONE_INLINE_MAX_BYTES", 100_000)
    larger = client.post("/v1/models/items/embed", json={"bags": [[3] * 4000]})
    assert all(r.status_code == 200 for r in (small, medium, crowded, alone, larger))
    np.testing.assert_allclose(small.json()["embeddings"], [table()[1] + table()[2]],
                               rtol=1e-6)
    np.testing.assert_allclose(larger.json()["embeddings"], [4000 * table()[3]], rtol=1e-4)
    # Small: on the loop; medium (under the idle bound): on the loop, though another
    # request is in flight; large with another in flight: the compute thread; large
    # alone: on the loop; past every bound: the compute thread.
    assert [name.startswith("compute-") for name in threads] == [False, False, True,
                                                                  False, True], threads
    assert load.in_flight == 0  # every answered request let go of its count


@pytest.mark.anyio
async def test_loop_load_says_busy_only_while_the_loop_runs_its_timer_late() -> None:
    import time

    from service.batcher import LOAD_PERIOD_S, LoopLoad

    load = LoopLoad()
    load.saw_request()
    await asyncio.sleep(3 * LOAD_PERIOD_S)  # on time, then idle: the timer stops
    assert not load.busy and not load._ticking
    load.saw_request()
    time.sleep(4 * LOAD_PERIOD_S)  # the loop blocked past the next tick
    await asyncio.sleep(0.001)  # the late tick runs
    assert load.busy
    await asyncio.sleep(3 * LOAD_PERIOD_S)
    assert not load.busy  # no request since: idle again


@pytest.mark.anyio
async def test_after_an_answer_the_loop_polls_for_busy_poll_us_then_sleeps() -> None:
    from service.batcher import LoopLoad

    load = LoopLoad()
    runs = 0
    poll = load._poll

    def counted(loop: asyncio.AbstractEventLoop) -> None:
        nonlocal runs
        runs += 1
        poll(loop)

    load._poll = counted  # type: ignore[method-assign]
    load.answered()  # off: nothing scheduled
    await asyncio.sleep(0.01)
    assert runs == 0
    load.poll_s = 0.05
    load.answered()
    await asyncio.sleep(0.01)  # a sleeping loop would run nothing for these 10 ms
    assert load._polling and runs > 20, runs
    await asyncio.sleep(0.06)
    assert not load._polling
    stopped = runs
    await asyncio.sleep(0.01)
    assert runs == stopped  # asleep again
    load.answered()
    load.offloaded = 1  # a batch on a compute thread: the loop stops polling at once
    await asyncio.sleep(0.005)
    assert not load._polling and runs == stopped + 1


@pytest.mark.anyio
async def test_the_service_polls_after_each_inference_answer_as_configured() -> None:
    from service.batcher import loop_load

    app = create_app(Settings(busy_poll_us=100_000), models=[wrapped("items", mode="sum")])
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://test") as client:
        load = loop_load()
        assert load.poll_s == pytest.approx(0.1) and not load._polling
        assert (await client.get("/v2/health/ready")).status_code == 200
        assert not load._polling  # probes do not start it
        answer = await client.post(EMBED.format("items"), json={"bags": [[1, 2]]})
        assert answer.status_code == 200 and load._polling


@pytest.mark.anyio
async def test_workers_beyond_the_cores_do_not_poll() -> None:
    from service.batcher import loop_load
    from service.settings import usable_cores

    settings = Settings(busy_poll_us=100_000, workers=usable_cores() + 1)
    app = create_app(settings, models=[wrapped("items", mode="sum")])
    async with app.router.lifespan_context(app):
        assert loop_load().poll_s == 0.0


@pytest.mark.anyio
async def test_a_request_alone_skips_the_queue_and_one_under_load_joins_it() -> None:
    model = wrapped("items", mode="sum")
    model.bag.wrapped.name = "numba"  # a CPU kernel: small calls may run on the loop
    app = create_app(Settings(), models=[model])
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://test") as client:
        batcher = app.state.service.batchers["items"]
        alone = await client.post(EMBED.format("items"), json={"bags": [[1, 2]]})
        assert alone.status_code == 200
        assert batcher._running is None  # never went through the batching task
        batcher._load.busy = True
        batcher._load._ticking = True  # hold the verdict: no timer resets it here
        queued = await client.post(EMBED.format("items"), json={"bags": [[1, 2]]})
        assert queued.status_code == 200
        assert batcher._running is not None
        np.testing.assert_array_equal(alone.json()["embeddings"], queued.json()["embeddings"])


@pytest.mark.anyio
@pytest.mark.parametrize("bound_ms", [150.0, 0.0])
async def test_the_queue_is_bounded_by_the_wait_it_implies(bound_ms: float) -> None:
    # One bag a batch, 0.1 s a batch: once a batch has held the queue while others waited,
    # each queued bag is a batch of ~0.1 s; past 150 ms of them (with the one computing)
    # a request is refused at once (0: only the size bounds apply). Every admitted answer
    # is right.
    settings = Settings(max_batch_bags=1, max_bags_per_request=1, max_queue_wait_ms=bound_ms)
    app = create_app(settings, models=[wrapped("slow", mode="sum", delay=0.1)])
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            first = [http.post(EMBED.format("slow"), json={"bags": [[i]]}) for i in range(3)]
            warm = asyncio.gather(*first)  # three queued: the rate is measured on them
            await asyncio.sleep(0.25)
            late = [http.post(EMBED.format("slow"), json={"bags": [[i]]}) for i in range(6)]
            responses = list(await warm) + list(await asyncio.gather(*late))
            batcher = app.state.service.batchers["slow"]
            assert batcher._batch_s is not None and batcher._batch_s > 0.05
    statuses = [r.status_code for r in responses]
    assert statuses[:3] == [200] * 3
    if bound_ms:
        # With the queue empty the first of the six is admitted; at most two more fit the
        # 150 ms (as the last warm batch ends); the rest hear at once.
        assert 1 <= statuses.count(200) - 3 <= 3 and statuses.count(429) >= 3, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert "max_queue_wait_ms=150" in refused.json()["error"]["message"]
    else:
        assert statuses == [200] * 9
    for i, response in enumerate(responses):
        if response.status_code == 200:
            np.testing.assert_allclose(response.json()["embeddings"], [table()[i % 3 if i < 3
                                       else i - 3]], rtol=1e-6)



@pytest.mark.anyio
async def test_the_loop_measures_its_answer_rate_and_the_wait_in_flight_requests_imply(
        ) -> None:
    import time

    from service.batcher import LOAD_PERIOD_S, REFUSALS_PER_ANSWER, LoopLoad

    load = LoopLoad()
    load.in_flight = 9
    assert load.wait_s() == 0.0  # no rate measured yet
    load.saw_request()
    for _ in range(50):  # 50 answers while the loop runs its timer late: busy
        load.answered()
    time.sleep(4 * LOAD_PERIOD_S)
    await asyncio.sleep(0.001)
    assert load.busy
    rate = load._rate
    assert 50 / (20 * LOAD_PERIOD_S) < rate < 50 / (4 * LOAD_PERIOD_S) * 1.01, rate
    # Eight requests ahead of one more, answered at that rate.
    assert load.wait_s() == pytest.approx(8 / rate)
    # A refusal is held for the target, or longer once the held ones would come back
    # faster than REFUSALS_PER_ANSWER of the answers.
    assert load.hold_s(0.5) == 0.5
    load.held = 999
    assert load.hold_s(0.001) == pytest.approx(1000 / (REFUSALS_PER_ANSWER * rate))
    await asyncio.sleep(3 * LOAD_PERIOD_S)
    assert not load.busy and load.wait_s() == 0.0  # idle again: nothing implied


@pytest.mark.anyio
async def test_a_request_the_busy_loop_cannot_answer_in_time_gets_a_held_429() -> None:
    import time

    from service.batcher import loop_load

    # One slow request in flight, a loop measured at 5 answers a second: one more would
    # wait ~0.2 s, past the 50 ms target. Its 429 is held (here 0.8 s: one held refusal
    # may come back at a quarter of the answer rate) outside the in-flight count, then
    # sent; the slow request is answered right.
    settings = Settings(max_queue_wait_ms=50, max_bags_per_request=1, retry_after_s=2)
    app = create_app(settings, models=[wrapped("slow", mode="sum", delay=0.5)])
    async with app.router.lifespan_context(app):
        load = loop_load()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            slow = asyncio.ensure_future(http.post(EMBED.format("slow"), json={"bags": [[1]]}))
            await asyncio.sleep(0.05)
            assert load.in_flight == 1
            load.busy, load._ticking, load._rate = True, True, 5.0  # no timer changes them
            started = time.perf_counter()
            late = asyncio.ensure_future(http.post(EMBED.format("slow"), json={"bags": [[2]]}))
            await asyncio.sleep(0.1)
            assert not late.done() and load.held == 1 and load.in_flight == 1
            refused = await late
            held = time.perf_counter() - started
            answered = await slow
    assert refused.status_code == 429 and 0.75 < held < 3.0, (refused.status_code, held)
    assert "max_queue_wait_ms=50" in refused.json()["error"]["message"]
    assert refused.headers["retry-after"] == "2"
    assert load.held == 0 and load.in_flight == 0
    assert answered.status_code == 200
    np.testing.assert_allclose(answered.json()["embeddings"], [table()[1]], rtol=1e-6)


@pytest.mark.anyio
async def test_only_large_batches_run_parallel_loops_and_only_on_the_compute_thread() -> None:
    """A parallel loop waits for every thread it woke: on a busy host a lone request's
    50-us kernel took 7 ms in parallel. The event loop's thread pools serially, the
    compute thread in parallel only from COMPUTE_PARALLEL_MIN_BYTES."""
    from kernels.numba_kernel import parallel_min_bytes
    from service.batcher import COMPUTE_PARALLEL_MIN_BYTES

    app = create_app(Settings(), models=[loaded("items")])
    async with app.router.lifespan_context(app):
        batcher = app.state.service.batcher("items")
        loop = asyncio.get_running_loop()
        assert (await loop.run_in_executor(batcher._executor, parallel_min_bytes)
                == COMPUTE_PARALLEL_MIN_BYTES)
        assert parallel_min_bytes() is None
