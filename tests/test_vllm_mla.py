"""DynamoConnector on an MLA model under tensor parallelism: vLLM 0.33's real scheduler and KV cache planning with
``MLAAttentionSpec`` layers (one latent per token, replicated on every tensor-parallel rank), 2 or 4 worker ranks
(``vllm_ranks``), the latent cache stored once in a host pool and a disk file the ranks share: the first rank of
each stage writes, every rank loads, every byte each rank reads checked against the deterministic model. Needs
vLLM 0.33 light.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import vllm_ranks as R  # first: imports vLLM for the CPU platform
from test_vllm_ranks import assert_clean, chat, ranked, run
from vllm_ranks import H

from kvbm.config import GB
from kvbm.kernels import disk_file

#: 3 layers (2 + 1 over two pipeline stages), one latent of 2 x 16 bf16 channels per token.
MODEL = H.TinyModelSpec(num_layers=3, num_kv_heads=1, num_attention_heads=8, head_dim=16)
LATENT_PAGE = 16 * 32 * 2  #: one layer of one block: tokens x latent width x bf16


def mla_ranked(tmp_path: Path, tp: int, pp: int = 1, **kw: Any) -> R.RankedVllmHarness:
    """A harness of ``tp x pp`` ranks of the MLA model (``ranked``'s tiers and options)."""
    return ranked(tmp_path, tp, pp, model=MODEL, mla=True, **kw)


def assert_stored_once(settled: list[dict[str, Any]], tp: int) -> None:
    """Each stage's ranks map one memfd pool for G2 (the same inode, shared, the pool's size) and read one G3 file
    (the same inode, the tier's size, read-only but on the writer), the stage's first rank is the only one that ran
    stores and cascades, and every rank ran loads."""
    for stage in range(len(settled) // tp):
        group = settled[stage * tp:(stage + 1) * tp]
        maps = [s["host_mapping"] for s in group]
        pool_bytes = group[0]["blocks"]["G2"] * group[0]["block_bytes"]
        assert all(m["path"].startswith("/memfd:kvbm-") and m["shared"] for m in maps)
        assert len({m["inode"] for m in maps}) == 1 and maps[0]["bytes"] == -(-pool_bytes // 4096) * 4096
        files = [s["disk_file"] for s in group]
        if files[0] is not None:
            slot = -(-group[0]["block_bytes"] // 4096) * 4096
            assert len({f["inode"] for f in files}) == 1 and files[0]["bytes"] == group[0]["blocks"]["G3"] * slot
            assert [f["read_only"] for f in files] == [False] + [True] * (tp - 1)
        assert group[0]["executed"]["STORE"] > 0
        assert all(s["executed"].get("STORE", 0) == s["executed"].get("CASCADE", 0) == 0 for s in group[1:])
        assert all(s["executed"]["LOAD"] > 0 for s in group)
    for key in ("host_mapping", "disk_file"):  # one pool and one file per stage
        held = {s[key]["inode"] for s in settled if s[key] is not None}
        assert len(held) in (0, len(settled) // tp)


def test_mla_kv_spec_is_replicated_over_tensor_parallel_ranks(tmp_path: Path) -> None:
    """vLLM plans MLA's cache as replicated on all tp ranks; the connector describes its 4-D views as a latent
    cache and shares the host pool."""
    with mla_ranked(tmp_path, 2) as h:
        assert all(c.kv_tp_replicas == 2 for c in h.rank_configs)
        layout = h.scheduler.connector.layout
        assert layout.shares_tiers and layout.stored_block_bytes == 3 * LATENT_PAGE
        assert layout.total_block_bytes == 2 * 3 * LATENT_PAGE
        cache = h.worker.ranks[1].local.worker.engine_cache
        assert cache.geometry.num_kv == 1 and cache.geometry.head_dim == 32 and cache.geometry.num_heads == 1


@pytest.mark.parametrize("tp", [2, 4], ids=["tp2", "tp4"])
def test_mla_latent_stored_once_loaded_on_every_rank(tmp_path: Path, tp: int) -> None:
    """Multi-turn chats with G2 only: later turns load on every rank, byte-exact; G2 is one pool per engine, only
    rank 0 ran the stores, every rank the loads."""
    with mla_ranked(tmp_path, tp, host=256) as h:
        run(h, chat())
        counts = h.worker.counts
        assert counts["load_jobs"] > 0 and counts["loaded_blocks"] > 0 and counts["load_errors"] == 0
        assert all(counts[f"verified{r}"] > 0 for r in range(tp))
        assert h.cache_stats.external_hits > 0
        assert_stored_once(h.worker.settle(), tp)
        assert_clean(h)


@pytest.mark.parametrize(("tp", "pp", "kv_layout"), [(2, 1, "HND"), (2, 2, None)], ids=["tp2-lbhnc", "tp2-pp2"])
def test_mla_shared_host_pool_with_disk_tier(tmp_path: Path, tp: int, pp: int, kv_layout: str | None) -> None:
    """A small shared G2 pushes blocks to the shared G3: the writer alone copies them, and every rank loads from
    both byte-exact; under pipeline parallelism each stage has its own pool, file and writer."""
    extra = {"kv_layout": kv_layout} if kv_layout else None
    with mla_ranked(tmp_path, tp, pp, host=24, disk=512, extra=extra) as h:
        run(h, chat())
        counts = h.worker.counts
        assert counts["load_jobs"] > 0 and counts["load_errors"] == 0
        assert all(counts[f"verified{r}"] > 0 for r in range(tp * pp))
        assert h.cache_stats.external_hits > 0
        settled = h.worker.settle()
        assert_stored_once(settled, tp)
        assert all(s["executed"]["G2->G3"] > 0 for s in settled[::tp])  # each stage's writer
        assert all(s["executed"]["G3->G1"] > 0 for s in settled)  # every rank reads the one file
        assert_clean(h)


def test_mla_tiers_sized_by_one_copy(tmp_path: Path) -> None:
    """``DYN_KVBM_CPU_CACHE_GB`` and ``DYN_KVBM_DISK_CACHE_GB`` count one copy of the replicated latent (each
    stage's layers once, on disk in 4 KiB-aligned slots), not one per rank."""
    copy_bytes = 3 * LATENT_PAGE
    extra = {"DYN_KVBM_CPU_CACHE_GB": 300 * copy_bytes / GB + 1e-9, "DYN_KVBM_DISK_CACHE_GB": 200 * 4096 / GB + 1e-9,
             "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path), "DYN_KVBM_DISK_DISABLE_O_DIRECT": "true"}
    with mla_ranked(tmp_path, 2, 2, host=None, disk=None, extra=extra) as h:
        settled = h.worker.settle()
        assert [s["block_bytes"] for s in settled] == [2 * LATENT_PAGE] * 2 + [LATENT_PAGE] * 2
        assert all(s["blocks"]["G2"] == 300 and s["blocks"]["G3"] == 200 for s in settled)
        assert sum({s["host_mapping"]["inode"]: s["host_mapping"]["bytes"] for s in settled}.values()) \
            == 300 * copy_bytes
        assert sum({s["disk_file"]["inode"]: s["disk_file"]["bytes"] for s in settled}.values()) == 2 * 200 * 4096
        assert_clean(h)


def test_mla_load_failing_on_a_reader_fails_for_all(tmp_path: Path) -> None:
    """Rank 1 (a reader of the shared pool) fails every 2nd load move: vLLM's aggregator unions the failed blocks
    so every rank recomputes them, and the writer's good copy is never trusted alone."""
    with mla_ranked(tmp_path, 2, faults={1: 2}) as h:
        run(h, chat())
        counts = h.worker.counts
        assert counts["load_jobs"] > 1 and counts["load_errors"] > 0
        assert h.worker.rank_invalid[1] and not h.worker.rank_invalid[0]
        assert all(counts[f"verified{r}"] > 0 for r in range(2))
        assert_clean(h)


def _abstract_sockets(name: str) -> list[str]:
    return [line for line in Path("/proc/net/unix").read_text().splitlines() if name in line]


def test_mla_rank_processes_share_one_pool_and_file_and_leave_nothing_after_kill(tmp_path: Path) -> None:
    """Ranks as spawned OS processes map the writer's pool (one memfd) and read its G3 file (one descriptor), both
    received over sockets; killing a rank with SIGKILL leaves nothing behind: no file in /dev/shm or the disk
    cache's directory, no socket name, and the pool and file go with their last process."""
    shm_before = set(os.listdir("/dev/shm"))
    g3 = tmp_path / "g3"
    g3.mkdir()
    with mla_ranked(tmp_path, 2, ranks="process", host=24, disk=512, extra={"DYN_KVBM_DISK_CACHE_DIR": str(g3)}) as h:
        engine = h.vllm_config.instance_id
        run(h, chat())
        counts = h.worker.counts
        assert counts["load_jobs"] > 0 and counts["load_errors"] == 0
        assert counts["verified0"] > 0 and counts["verified1"] > 0
        settled = h.worker.settle()
        assert_stored_once(settled, 2)
        assert settled[1]["executed"]["G3->G1"] > 0  # the reader process read the writer's file
        processes = [rank.process for rank in h.worker.ranks]
        os.kill(processes[0].pid, signal.SIGKILL)  # the writer
        processes[0].join(10)
        assert not _abstract_sockets(f"kvbm-pool-{engine}") and not _abstract_sockets(f"kvbm-g3-{engine}")
        assert set(os.listdir("/dev/shm")) == shm_before
    assert not any(p.is_alive() for p in processes)
    assert set(os.listdir("/dev/shm")) == shm_before
    assert not _abstract_sockets(f"kvbm-pool-{engine}") and not _abstract_sockets(f"kvbm-g3-{engine}")
    # no name at all where the filesystem has unnamed files; else the killed writer's, reclaimed by the next start
    left = os.listdir(g3)
    assert left == [] if unnamed_files(g3) else all(n.startswith(f"kvbm-g3-{processes[0].pid}-") for n in left)


def unnamed_files(directory: Path) -> bool:
    """Whether the filesystem of ``directory`` makes unnamed (O_TMPFILE) files."""
    try:
        os.close(os.open(directory, os.O_RDWR | disk_file.O_TMPFILE, 0o600))
    except OSError:
        return False
    return bool(disk_file.O_TMPFILE)
