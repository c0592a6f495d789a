"""The transfer benchmark's command line: `--batches` and `--pin-thread` parsing and their errors for bad input, and
the paired-ratio arithmetic of its percentages (no benchmark is run)."""
from __future__ import annotations

import pytest
from bench_module import load_bench_module


@pytest.fixture(scope="module")
def bench():
    return load_bench_module("transfer_bench.py", "transfer_bench_under_test")


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


def test_cpu_byte_check_catches_a_wrong_copy(bench):
    import torch

    from kvbm.layouts import KVGeometry, allocate, copy_blocks

    g = KVGeometry(2, 2, 4, 2, 8, 2)
    src = allocate("vllm_flash_attn_hnd", g, 6, dtype=torch.bfloat16)
    dst = allocate("kvbm_staging", g, 5, dtype=torch.bfloat16)
    bench.fill(src, 1)
    bench.fill(dst, 2)
    before = [dst.piece_view(layer, kv, torch.int16).clone() for layer in range(2) for kv in range(2)]
    copy_blocks(src, dst, [4, 1], [0, 3], backend="torch")
    assert bench.cpu_copy_is_exact(src, dst, [4, 1], [0, 3], before)
    assert not bench.cpu_copy_is_exact(src, dst, [1, 4], [0, 3], before)  # other source blocks
    assert not bench.cpu_copy_is_exact(src, dst, [4], [0], before)  # block 3 should have kept its poison
    unchanged = [b.clone() for b in before]
    assert not bench.cpu_copy_is_exact(src, allocate("kvbm_staging", g, 5, dtype=torch.bfloat16), [4], [0], unchanged)


def test_plot_of_cpu_rows_is_written(bench, tmp_path):
    rows = [{"layout": "vllm_lbnhc", "direction": "gather", "blocks": n, "method": m, "gbps": gbps}
            for n, gbps in ((1, 0.5), (16, 2.0)) for m in ("cpu_numba", "cpu_torch")]
    assert bench.plot({"rows": rows}, tmp_path / "p.png") is None
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert bench.plot({"rows": []}, tmp_path / "q.png") == "no transfer rows to plot"


def test_table_shows_spread(bench):
    row = {"layout": "x", "direction": "gather", "blocks": 1, "method": "cpu_numba", "gbps": 1.0,
           "seconds_min": 0.001, "seconds_median": 0.002, "seconds_max": 0.004, "pct_of_ceiling": None,
           "bytes_ok": False}
    assert "| 1.000 / 2.000 / 4.000 |  | NO |" in bench.table({"rows": [row]})
