"""Dynamic batching on the event loop: who runs with whom, who waits, who gets what."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from weightsmith_server.models.batching import Batcher, BatchingPolicy


class Recorder:
    """A fake batch runner: echoes each caller's first input, remembers each batch's callers."""

    def __init__(self, delay: float = 0.02, fail_on: float | None = None) -> None:
        self.batches: list[list[float]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.started: list[float] = []

    async def __call__(self, model_id, requests, output_layers):
        self.started.append(asyncio.get_running_loop().time())
        self.batches.append([float(r[0][1][0, 0]) for r in requests])
        await asyncio.sleep(self.delay)
        return [
            ValueError("bad row") if float(r[0][1][0, 0]) == self.fail_on else r[0][1] * 2 for r in requests
        ]


def _inputs(value: float, rows: int = 1) -> list[tuple[str, np.ndarray]]:
    return [("", np.full((rows, 3), value, np.float32))]


async def test_lone_caller_runs_at_once_and_gets_its_rows() -> None:
    runner = Recorder()
    batcher = Batcher(runner)
    before = asyncio.get_running_loop().time()
    result = await batcher.submit("m", _inputs(1.0), (), BatchingPolicy(8, 0.0))
    np.testing.assert_array_equal(result, np.full((1, 3), 2.0, np.float32))
    assert runner.started[0] - before < 0.01
    assert runner.batches == [[1.0]]


async def test_callers_arriving_during_a_batch_run_together_each_with_its_rows() -> None:
    runner = Recorder()
    batcher = Batcher(runner)
    policy = BatchingPolicy(4, 0.0)
    results = await asyncio.gather(*(batcher.submit("m", _inputs(float(i)), (), policy) for i in range(7)))
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, np.full((1, 3), 2.0 * i, np.float32))
    # The first runs alone at once; the rest queue and go in batches of at most 4 rows.
    assert runner.batches == [[0.0], [1.0, 2.0, 3.0, 4.0], [5.0, 6.0]]
    assert (batcher.batches, batcher.calls) == (3, 7)


async def test_different_signatures_and_large_calls_are_not_mixed() -> None:
    runner = Recorder()
    batcher = Batcher(runner)
    policy = BatchingPolicy(4, 0.0)
    calls = [
        batcher.submit("m", _inputs(1.0), (), policy),
        batcher.submit("m", _inputs(2.0), ("layer",), policy),  # other output layers
        batcher.submit("other", _inputs(3.0), (), policy),  # other model
        batcher.submit("m", [("", np.full((1, 5), 4.0, np.float32))], (), policy),  # other shape
        batcher.submit("m", _inputs(5.0, rows=4), (), policy),  # a full batch on its own
    ]
    await asyncio.gather(*calls)
    assert sorted(runner.batches) == [[1.0], [2.0], [3.0], [4.0], [5.0]]


async def test_one_callers_error_fails_only_that_caller() -> None:
    batcher = Batcher(Recorder(fail_on=2.0))
    policy = BatchingPolicy(8, 0.0)
    results = await asyncio.gather(
        *(batcher.submit("m", _inputs(float(i)), (), policy) for i in range(4)), return_exceptions=True
    )
    assert isinstance(results[2], ValueError)
    assert [float(r[0, 0]) for i, r in enumerate(results) if i != 2] == [0.0, 2.0, 6.0]


async def test_max_wait_lets_a_next_batch_fill_but_never_delays_a_lone_caller() -> None:
    runner = Recorder(delay=0.2)
    batcher = Batcher(runner)
    loop = asyncio.get_running_loop()
    policy = BatchingPolicy(4, 100.0)
    started = loop.time()
    await batcher.submit("m", _inputs(9.0), (), policy)
    assert runner.started[0] - started < 0.05  # alone: runs at once, whatever the wait

    async def later(value: float, delay: float) -> np.ndarray:
        await asyncio.sleep(delay)
        return await batcher.submit("m", _inputs(value), (), policy)

    # 0 runs alone; 1 queues during it; 2 comes 10 ms after 0 ended: within the wait (at most
    # a quarter of the 200 ms batch: 50 ms), so in the same batch as 1.
    await asyncio.gather(later(0.0, 0), later(1.0, 0.05), later(2.0, 0.21))
    assert runner.batches[1:] == [[0.0], [1.0, 2.0]]
    assert 0.005 <= runner.started[2] - runner.started[1] - 0.2 < 0.5  # waited, within the bound

    # A full next batch starts without waiting out the (long) wait.
    policy = BatchingPolicy(3, 5000.0)
    started = loop.time()
    await asyncio.gather(*(batcher.submit("m", _inputs(float(i)), (), policy) for i in range(4)))
    assert runner.batches[-2:] == [[0.0], [1.0, 2.0, 3.0]]
    assert loop.time() - started < 1.0


async def test_a_cancelled_caller_is_dropped_and_the_others_still_run() -> None:
    runner = Recorder()
    batcher = Batcher(runner)
    policy = BatchingPolicy(8, 0.0)
    first = asyncio.ensure_future(batcher.submit("m", _inputs(0.0), (), policy))
    await asyncio.sleep(0)
    queued = [asyncio.ensure_future(batcher.submit("m", _inputs(float(i)), (), policy)) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    queued[1].cancel()
    await first
    done = await asyncio.gather(queued[0], queued[2])
    assert [float(r[0, 0]) for r in done] == [2.0, 6.0]
    assert runner.batches == [[0.0], [1.0, 3.0]]


@pytest.mark.parametrize("policy", [BatchingPolicy(1, 0.0), BatchingPolicy(0, 10.0)])
async def test_batching_off_runs_every_call_alone(policy: BatchingPolicy) -> None:
    runner = Recorder()
    batcher = Batcher(runner)
    await asyncio.gather(*(batcher.submit("m", _inputs(float(i)), (), policy) for i in range(3)))
    assert sorted(runner.batches) == [[0.0], [1.0], [2.0]]


def test_batching_flags_parse_and_are_checked() -> None:
    from weightsmith_server.config import parse_config

    config = parse_config(["--batch-max-size", "8", "--batch-wait-ms", "2.5"], environ={})
    assert (config.batch_max_size, config.batch_wait_ms) == (8, 2.5)
    assert parse_config([], environ={"WEIGHTSMITH_BATCH_MAX_SIZE": "1"}).batch_max_size == 1
    with pytest.raises(SystemExit):
        parse_config(["--batch-max-size", "0"], environ={})
