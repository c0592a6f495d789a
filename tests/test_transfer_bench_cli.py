"""The transfer benchmark's command line: `--batches` and `--pin-thread` parsing and their errors for bad input, and
the paired-ratio arithmetic of its percentages (no benchmark is run)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "transfer_bench.py"


@pytest.fixture(scope="module")
def bench():
    # loaded from its file: the repo root is not on the test path (see tests/run.sh)
    spec = importlib.util.spec_from_file_location("transfer_bench_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_block_counts_parse(bench):
    assert bench.block_counts("1,16,256") == [1, 16, 256]
    assert bench.block_counts("1024") == [1024]


@pytest.mark.parametrize("text", ["", "0", "16,-1", "a,16", "16,", "1.5"])
def test_bad_block_counts_are_refused(bench, text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--batches", text])
    assert exit_info.value.code == 2
    assert "positive integers" in capsys.readouterr().err


def test_pin_thread_takes_an_allowed_cpu(bench):
    import os

    cpu = max(os.sched_getaffinity(0))
    assert bench.allowed_cpu(str(cpu)) == cpu


@pytest.mark.parametrize("text,message", [("x", "expected a CPU number"),
                                          ("100000", "not one this process may run on")])
def test_bad_pin_thread_is_refused(bench, text, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--pin-thread", text])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_paired_percent_is_the_median_of_each_pair_s_ratio(bench):
    """Each timing is compared with its own ceiling copy, so a link that slows down between pairs cancels out."""
    ceiling = [1.0, 2.0, 4.0]  # seconds for 100 bytes: the link slowed down between pairs
    method = [1.0, 2.0, 8.0]  # 50 bytes: half the ceiling's rate, half, then a quarter
    assert bench.paired_percent(method, ceiling, 50, 100) == pytest.approx(50.0)
    assert bench.paired_percent([1.0], [1.0], 97, 100) == pytest.approx(97.0)
