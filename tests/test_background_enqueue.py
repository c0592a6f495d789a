"""Enqueues finished on the engine's enqueue thread (`kvbm.kernels.background_enqueue`), on the CPU: the thread
runs jobs in order and survives a failing one; a transfer handed over is not done, waited for or waited on by a
stream before its gate has passed, and its failure is known once it has. The GPU side (`onboard_groups` with later
groups on the thread, byte-exact) is in test_transfer_engine.py."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from kvbm.kernels import block_transfer
from kvbm.kernels.background_enqueue import EnqueueProgress, EnqueueThread
from kvbm.kernels.paths.gpu_host import _block_transfer
from kvbm.kernels.transfer import TransferHandle


def _settled(done: threading.Event, timeout: float = 10.0) -> None:
    assert done.wait(timeout), "the enqueue thread did not run the job"


def test_the_thread_runs_jobs_in_order_after_prepare_and_goes_on_after_one_raises(caplog):
    order: list[str] = []
    last = threading.Event()
    thread = EnqueueThread("test-enqueue", lambda: order.append("prepare"))

    def failing() -> None:
        order.append("failing")
        raise RuntimeError("driver call failed")

    thread.run(lambda: order.append("first"))
    thread.run(failing)
    thread.run(lambda: (order.append("after"), last.set()))
    _settled(last)
    assert order == ["prepare", "first", "failing", "after"]
    assert "an enqueue job raised" in caplog.text


def test_a_failed_prepare_is_logged_and_the_jobs_still_run(caplog):
    ran = threading.Event()

    def prepare() -> None:
        raise RuntimeError("no CUDA context")

    EnqueueThread("test-enqueue-prepare", prepare).run(ran.set)
    _settled(ran)
    assert "setting up the enqueue thread failed" in caplog.text


def test_gates_pass_in_order_as_the_count_advances_and_all_at_finish():
    progress = EnqueueProgress(3)
    gates = [progress.gate(k) for k in range(3)]
    assert [g.passed() for g in gates] == [False, False, False]
    progress.enqueued[0] = 2
    assert [g.passed() for g in gates] == [True, True, False]
    gates[1].wait()  # passed: returns at once
    progress.finish()
    assert all(g.passed() for g in gates)


def test_a_wait_blocks_until_the_enqueue_thread_records_its_transfer():
    progress = EnqueueProgress(2)
    release = threading.Event()
    thread = EnqueueThread("test-enqueue-wait", lambda: None)

    def job() -> None:
        release.wait(10)
        progress.enqueued[0] = 1
        time.sleep(0.05)
        progress.finish()

    thread.run(job)
    started = time.perf_counter()
    threading.Timer(0.05, release.set).start()
    progress.gate(0).wait()
    assert time.perf_counter() - started >= 0.04
    assert not progress.gate(1).passed()
    progress.gate(1).wait()
    assert progress.gate(1).passed()


def test_a_handle_handed_over_is_not_done_before_its_gate_and_fails_with_the_error_set_before_it_passes():
    progress = EnqueueProgress(2)
    ok = TransferHandle("staged", 4, 4096, gate=progress.gate(0))
    bad = TransferHandle("staged", 4, 4096, gate=progress.gate(1))
    assert not ok.done() and not bad.done()
    progress.enqueued[0] = 1  # the first group's event recorded (no event here: a CPU stand-in), then a call fails
    assert ok.done() and not bad.done()
    ok.wait()
    bad.error = RuntimeError("cuMemcpy2DAsync failed")
    progress.finish()
    assert bad.done() and not bad.ok
    with pytest.raises(RuntimeError, match="cuMemcpy2DAsync"):
        bad.wait()
    bad.settle()  # (never raises)
    transfer = _block_transfer(bad)
    transfer.wait()
    assert set(transfer.reasons) == set(range(4)) and "cuMemcpy2DAsync" in transfer.reasons[0]


class _Event:
    """A recorded CUDA event's stand-in: done at once, with a raw handle."""

    cuda_event = 0x5EED

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


@pytest.mark.parametrize("raw", [True, False])
def test_a_stream_waits_on_the_event_of_a_transfer_handed_over_only_once_its_gate_passed(monkeypatch, raw):
    """`order_raw_stream` (each layer's wait) and `order_stream` pass the gate before the stream waits on the event:
    a wait on an event not yet recorded would order nothing."""
    progress = EnqueueProgress(1)
    handle = TransferHandle("staged", 2, 2048, event=_Event(), gate=progress.gate(0))
    transfer = _block_transfer(handle)
    seen: list[tuple[int, bool]] = []
    monkeypatch.setattr(block_transfer.stream_events, "wait",
                        lambda stream, event: seen.append((event, progress.gate(0).passed())))
    stream = SimpleNamespace(wait_event=lambda event: seen.append((event.cuda_event, progress.gate(0).passed())))
    threading.Timer(0.05, progress.finish).start()
    if raw:
        transfer.order_raw_stream(7)
    else:
        transfer.order_stream(stream)
    assert seen == [(_Event.cuda_event, True)]


def test_a_transfer_without_a_gate_orders_a_stream_at_once(monkeypatch):
    handle = TransferHandle("staged", 2, 2048, event=_Event())
    seen: list[int] = []
    monkeypatch.setattr(block_transfer.stream_events, "wait", lambda stream, event: seen.append(event))
    _block_transfer(handle).order_raw_stream(7)
    assert seen == [_Event.cuda_event]
