"""The batcher without a network: mixed jobs share one run, deadlines, isolation, no idle wait."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from runtime.batcher import Batcher, DeadlineExpired


class Recorder:
    """run_batch stand-in: records each call's payloads; payload 'bad' makes a batch fail."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[list] = []
        self.delay = delay

    def __call__(self, payloads):
        self.calls.append(list(payloads))
        if self.delay:
            time.sleep(self.delay)
        if "bad" in payloads:
            raise ValueError("bad row")
        return [f"out:{p}" for p in payloads]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_concurrent_jobs_share_one_run_and_keep_their_results():
    rec = Recorder()

    async def main():
        b = Batcher(rec, max_batch=64, max_delay_ms=50)
        b.start()
        with b.expecting():  # a job still being preprocessed holds the batch open
            futs = [b.submit(f"job{i}", rows=1 + i % 3) for i in range(10)]
            await asyncio.sleep(0.01)
            futs.append(b.submit("last", rows=2))
        out = await asyncio.gather(*futs)
        await b.close()
        return out

    out = run(main())
    assert out == [f"out:job{i}" for i in range(10)] + ["out:last"]
    assert len(rec.calls) == 1 and len(rec.calls[0]) == 11


def test_max_batch_counts_rows_and_never_splits_a_job():
    rec = Recorder()

    async def main():
        b = Batcher(rec, max_batch=4, max_delay_ms=50)
        futs = [b.submit(f"j{i}", rows=3) for i in range(3)] + [b.submit("big", rows=9)]
        b.start()
        await asyncio.gather(*futs)
        await b.close()

    run(main())
    assert [c for c in rec.calls] == [["j0"], ["j1"], ["j2"], ["big"]]


def test_lone_request_does_not_wait_for_max_delay():
    rec = Recorder()

    async def main():
        b = Batcher(rec, max_batch=32, max_delay_ms=2000)
        b.start()
        t0 = time.monotonic()
        await b.submit("solo", rows=1)
        dt = time.monotonic() - t0
        await b.close()
        return dt

    assert run(main()) < 0.5


def test_waits_at_most_max_delay_for_expected_jobs():
    rec = Recorder()

    async def main():
        b = Batcher(rec, max_batch=32, max_delay_ms=100)
        b.start()
        with b.expecting():  # never arrives in time
            t0 = time.monotonic()
            await b.submit("first", rows=1)
            dt = time.monotonic() - t0
        await b.close()
        return dt

    assert 0.09 <= run(main()) < 1.0


def test_expired_jobs_are_dropped_before_inference():
    rec = Recorder(delay=0.1)

    async def main():
        b = Batcher(rec, max_batch=1, max_delay_ms=0)
        b.start()
        slow = b.submit("slow", rows=1)  # occupies the engine for 100 ms
        late = b.submit("late", rows=1, deadline=time.monotonic() + 0.02)
        ok = b.submit("ok", rows=1, deadline=time.monotonic() + 5)
        assert await slow == "out:slow"
        with pytest.raises(DeadlineExpired):
            await late
        assert await ok == "out:ok"
        await b.close()
        return b.stats

    stats = run(main())
    assert ["late"] not in rec.calls and stats["expired"] == 1


def test_a_failing_job_fails_alone():
    rec = Recorder()

    async def main():
        b = Batcher(rec, max_batch=8, max_delay_ms=50)
        futs = [b.submit(p, rows=1) for p in ("a", "bad", "c")]
        b.start()
        res = await asyncio.gather(*futs, return_exceptions=True)
        await b.close()
        return res, b.stats

    (a, bad, c), stats = run(main())
    assert (a, c) == ("out:a", "out:c") and isinstance(bad, ValueError)
    assert rec.calls[0] == ["a", "bad", "c"] and stats["isolated_failures"] == 1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(Recorder(), max_batch=0)
    with pytest.raises(ValueError, match="max_delay_ms"):
        Batcher(Recorder(), max_delay_ms=-1)
    with pytest.raises(ValueError, match="in_flight"):
        Batcher(Recorder(), in_flight=0)


class Rendezvous:
    """run_batch that returns only once ``parties`` batches are running at the same time
    (threading.Barrier): with fewer batches in flight it times out and fails its jobs."""

    def __init__(self, parties: int):
        self.barrier = threading.Barrier(parties, timeout=2.0)
        self.running = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, payloads):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.barrier.wait()
        finally:
            with self.lock:
                self.running -= 1
        return [f"out:{p}" for p in payloads]


@pytest.mark.parametrize("in_flight", [1, 2])
def test_batches_in_flight_run_at_once(in_flight):
    """Two full batches: with in_flight=2 the second starts while the first still runs; with
    1 they run one after the other (the rendezvous of two never happens)."""
    rv = Rendezvous(2)

    async def main():
        b = Batcher(rv, max_batch=2, max_delay_ms=50, in_flight=in_flight)
        futs = [b.submit(f"j{i}", rows=1) for i in range(4)]
        b.start()
        out = await asyncio.gather(*futs, return_exceptions=True)
        await b.close()
        return out, b.stats

    out, stats = run(main())
    if in_flight == 2:
        assert out == [f"out:j{i}" for i in range(4)] and rv.most == 2
        assert stats["batches"] == 2 and stats["rows"] == 4
    else:
        assert rv.most == 1 and all(isinstance(o, Exception) for o in out)


def test_close_fails_the_jobs_of_every_running_batch():
    release = threading.Event()

    def slow(payloads):
        release.wait(5)
        return [f"out:{p}" for p in payloads]

    async def main():
        b = Batcher(slow, max_batch=1, max_delay_ms=0, in_flight=2)
        futs = [b.submit(f"j{i}", rows=1) for i in range(3)]
        b.start()
        await asyncio.sleep(0.1)  # j0 and j1 run, j2 waits for a slot
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0.05)
        release.set()
        await closing
        return await asyncio.gather(*futs, return_exceptions=True)

    out = run(main())
    assert all(isinstance(o, RuntimeError) and "shutting down" in str(o) for o in out)


def test_batches_group_similar_lengths_and_respect_the_token_cap():
    rec = Recorder()

    async def main(max_tokens):
        rec.calls.clear()
        b = Batcher(rec, max_batch=4, max_delay_ms=50, max_tokens=max_tokens)
        lengths = [10, 120, 12, 118, 11, 9, 125, 119]
        futs = [b.submit(f"L{n}", rows=1, length=n) for n in lengths]
        b.start()
        await asyncio.gather(*futs)
        await b.close()
        return [sorted(c) for c in rec.calls]

    # Oldest first, then its nearest lengths: short rows are not padded to 125 tokens.
    assert run(main(0)) == [["L10", "L11", "L12", "L9"], ["L118", "L119", "L120", "L125"]]
    # rows x longest <= 250 tokens: two long rows per batch at most.
    calls = run(main(250))
    assert all(len(c) * max(int(x[1:]) for x in c) <= 250 for c in calls)
    assert sum(len(c) for c in calls) == 8
