"""The kvbm SGLang HiCache storage backend against SGLang 0.5.23's real storage interface on CPU.

The backend is built by SGLang's own `StorageBackendFactory` with the "dynamic" option and registered with a host
pool the way SGLang's cache controller does; keys come from SGLang's own page hashing (salted). SGLang's host pool
classes do not import on CPU (their module chain imports torchvision, whose wheels need CUDA torch), so the host
pool here is a stand-in holding the same ``kv_buffer`` shapes per layout and the same flat data page methods.
Every check is byte-exact on random non-zero data, with poisoned destinations.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang.srt.mem_cache.hicache_storage", reason="SGLang light is not installed "
                    "(tests/install_sglang_light.sh)")

from disk_faults import flip_byte  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402
from sglang.srt.mem_cache.utils import get_storage_hash_str  # noqa: E402

from kvbm.config import KvbmConfigError  # noqa: E402
from kvbm.sglang_integration import storage as storage_mod  # noqa: E402
from kvbm.sglang_integration.host_pool import UnsupportedHostPool  # noqa: E402
from kvbm.sglang_integration.storage import KvbmStorage, key_hash  # noqa: E402

PAGE, LAYERS, HEADS, DIM, PAGES = 4, 3, 2, 8, 16
POISON = 0x5A
MHA_LAYOUTS = ["layer_first", "page_first", "page_first_direct", "page_head"]
MLA_LAYOUTS = ["layer_first", "page_first", "page_first_direct"]


class HostPool:
    """Stand-in for SGLang's MHA / MLA host pool: ``kv_buffer`` in the layout's shape, flat data pages."""

    def __init__(self, layout: str, *, mla: bool = False, pages: int = PAGES, heads: int = HEADS,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        self.layout, self.page_size, self.page_num, self.size = layout, PAGE, pages, pages * PAGE
        self.layer_num, self.dtype, self.device = LAYERS, dtype, "cpu"
        n, L, P = self.size, LAYERS, PAGE
        if mla:
            self.kv_cache_dim = DIM
            shapes = {"layer_first": (L, n, 1, DIM), "page_first": (n, L, 1, DIM),
                      "page_first_direct": (pages, L, P, 1, DIM)}
            self._page_shape = {"layer_first": (L, P, 1, DIM), "page_first": (P, L, 1, DIM),
                                "page_first_direct": (1, L, P, 1, DIM)}[layout]
        else:
            self.head_num, self.head_dim, self.v_head_dim = heads, DIM, DIM
            shapes = {"layer_first": (2, L, n, heads, DIM), "page_first": (2, n, L, heads, DIM),
                      "page_first_direct": (2, pages, L, P, heads, DIM), "page_head": (2, pages, heads, P, L, DIM),
                      "page_unified": (pages, 2 * L * P * heads * DIM)}
            self._page_shape = {"layer_first": (2, L, P, heads, DIM), "page_first": (2, P, L, heads, DIM),
                                "page_first_direct": (2, 1, L, P, heads, DIM),
                                "page_head": (2, 1, heads, P, L, DIM)}.get(layout)
        self.mla = mla
        self.kv_buffer = torch.empty(shapes[layout], dtype=dtype)
        randomize(self.kv_buffer)

    def _page(self, index: int) -> torch.Tensor:
        """The view of the page starting at token slot ``index``."""
        p, P, b = index // PAGE, PAGE, self.kv_buffer
        if self.layout == "layer_first":
            return b[:, p * P:(p + 1) * P] if self.mla else b[:, :, p * P:(p + 1) * P]
        if self.layout == "page_first":
            return b[p * P:(p + 1) * P] if self.mla else b[:, p * P:(p + 1) * P]
        return b[p:p + 1] if self.mla else b[:, p:p + 1]

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        page = self._page(int(index))
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(self._page(0).numel(), dtype=self.dtype)

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        self._page(int(index)).copy_(data_page.reshape(self._page_shape))

    def page_bytes(self, page: int) -> torch.Tensor:
        """A copy of page ``page``'s bytes, in the pool's order."""
        return self._page(page * PAGE).contiguous().view(torch.uint8).clone()

    def poison(self, page: int) -> None:
        self._page(page * PAGE).view(torch.uint8).fill_(POISON)


def randomize(t: torch.Tensor) -> None:
    t.view(torch.uint8).copy_(torch.randint(1, 256, t.view(torch.uint8).shape, dtype=torch.uint8))


def host_indices(pages: list[int]) -> torch.Tensor:
    if not pages:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE) for p in pages])


def storage_config(extra: dict, *, mla: bool = False, tp_rank: int = 0, tp_size: int = 1,
                   layout: str = "page_first") -> HiCacheStorageConfig:
    return HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=False,
                                is_page_first_layout=layout == "page_first", model_name="test/model",
                                extra_config=extra)


@pytest.fixture
def make(tmp_path, monkeypatch):
    """Build backends through SGLang's factory ("dynamic") and register their host pools as its controller does."""
    for name in list(__import__("os").environ):
        if name.startswith("DYN_KVBM_"):
            monkeypatch.delenv(name)
    built = []

    def _make(pool: HostPool, *, host_blocks: int | None = 64, disk_blocks: int | None = None, v1: bool = True,
              tp_rank: int = 0, tp_size: int = 1, **env) -> HiCacheStorage:
        extra = {"backend_name": "kvbm", "module_path": "kvbm.sglang_integration.storage",
                 "class_name": "KvbmStorage", "interface_v1": int(v1), "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path),
                 "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true", "DYN_KVBM_DISK_DISABLE_O_DIRECT": "true"}
        if host_blocks:
            extra["DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS"] = host_blocks
        if disk_blocks:
            extra["DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS"] = disk_blocks
        extra.update(env)
        config = storage_config(extra, mla=pool.mla, tp_rank=tp_rank, tp_size=tp_size, layout=pool.layout)
        backend = StorageBackendFactory.create_backend("dynamic", config, pool)
        backend.register_mem_pool_host(pool)
        backend.on_host_pools_registered()
        built.append(backend)
        return backend

    yield _make
    for backend in built:
        backend.close()


def page_keys(n: int, salt: str | None = None, start: int = 0) -> list[str]:
    """SGLang's own chained page hashes of n pages of tokens (namespaced by ``salt``)."""

    class Key(list):
        extra_key = None
        cache_salt = salt

    return get_storage_hash_str(Key(range(start, start + n * PAGE)), None, page_size=PAGE)


POOLS = [pytest.param("mha", layout, id=f"mha-{layout}") for layout in MHA_LAYOUTS] + \
        [pytest.param("mla", layout, id=f"mla-{layout}") for layout in MLA_LAYOUTS]


@pytest.mark.parametrize("kind,layout", POOLS)
def test_zero_copy_round_trip(make, kind, layout):
    """batch_set_v1 then batch_get_v1 into other, poisoned pages: byte-exact; exists counts the stored prefix."""
    pool = HostPool(layout, mla=kind == "mla")
    backend = make(pool)
    assert isinstance(backend, KvbmStorage)
    keys = page_keys(4)
    src = [3, 7, 0, 12]
    want = [pool.page_bytes(p) for p in src]
    assert backend.batch_exists(keys) == 0
    assert backend.batch_set_v1(keys, host_indices(src)) == [True] * 4
    assert backend.batch_exists(keys) == 4 and backend.exists(keys[2])
    dst = [9, 1, 15, 4]
    for p in dst:
        pool.poison(p)
    assert backend.batch_get_v1(keys, host_indices(dst)) == [True] * 4
    for p, w in zip(dst, want):
        assert torch.equal(pool.page_bytes(p), w)
    backend.check_invariants()


@pytest.mark.parametrize("kind,layout", POOLS)
def test_flat_page_round_trip(make, kind, layout):
    """The flat-page calls as SGLang's controller makes them (get_data_page -> batch_set; dummy pages ->
    batch_get -> set_from_flat_data_page), and single get/set; bytes land in the pool's own page order."""
    pool = HostPool(layout, mla=kind == "mla")
    backend = make(pool, v1=False)
    keys = page_keys(3)
    src, dst = [2, 5, 11], [6, 8, 14]
    want = [pool.page_bytes(p) for p in src]
    assert backend.batch_set(keys, [pool.get_data_page(p * PAGE) for p in src]) is True
    for p in dst:
        pool.poison(p)
    pages = backend.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
    assert all(page is not None for page in pages)
    for p, page in zip(dst, pages):
        pool.set_from_flat_data_page(p * PAGE, page)
    for p, w in zip(dst, want):
        assert torch.equal(pool.page_bytes(p), w)
    # one page at a time, and the two interfaces share what they store
    key = page_keys(1, start=1000)[0]
    assert backend.set(key, pool.get_data_page(13 * PAGE)) and backend.exists(key)
    pool.poison(10)
    assert backend.batch_get_v1([key], host_indices([10])) == [True]
    assert torch.equal(pool.page_bytes(10), pool.page_bytes(13))
    target = pool.get_dummy_flat_data_page()
    assert backend.get(key, target) is target
    assert torch.equal(target.view(torch.uint8), pool.get_data_page(13 * PAGE).contiguous().view(torch.uint8))
    assert backend.get(page_keys(1, start=2000)[0], pool.get_dummy_flat_data_page()) is None


def test_exists_is_a_prefix_and_duplicates(make):
    """batch_exists stops at the first missing key; a key twice in one set is stored once, both reported."""
    pool = HostPool("layer_first")
    backend = make(pool)
    keys = page_keys(4)
    assert backend.batch_set_v1([keys[0], keys[2]], host_indices([0, 2])) == [True, True]
    assert backend.batch_exists(keys) == 1
    assert backend.batch_exists(keys[2:3]) == 1
    assert backend.batch_set_v1([keys[1], keys[1]], host_indices([1, 3])) == [True, True]
    assert backend.batch_exists(keys) == 3
    assert backend.batch_set_v1([keys[0]], host_indices([5])) == [True]  # already stored: kept, reported stored
    pool.poison(4)
    assert backend.batch_get_v1([keys[0]], host_indices([4])) == [True]
    assert torch.equal(pool.page_bytes(4), pool.page_bytes(0))


def test_salt_namespaces_keys(make):
    """The same tokens under two cache salts are two keys: one salt's pages are not found under the other."""
    pool = HostPool("page_first")
    backend = make(pool)
    a, b = page_keys(3, salt="tenant-a"), page_keys(3, salt="tenant-b")
    assert set(a).isdisjoint(b) and set(a).isdisjoint(page_keys(3))
    assert backend.batch_set_v1(a, host_indices([0, 1, 2])) == [True] * 3
    assert backend.batch_exists(a) == 3 and backend.batch_exists(b) == 0 and backend.batch_exists(page_keys(3)) == 0
    pool.poison(5)
    assert backend.batch_get_v1(b[:1], host_indices([5])) == [False]
    assert (pool.page_bytes(5) == POISON).all()


def test_eviction_in_host_tier(make):
    """G2 of 4 blocks, no disk: storing 6 pages evicts the 2 least recently used; their gets miss and leave the
    destination untouched."""
    pool = HostPool("page_first_direct")
    backend = make(pool, host_blocks=4)
    keys = page_keys(6)
    want = [pool.page_bytes(p) for p in range(6)]
    for i in range(6):
        assert backend.batch_set_v1([keys[i]], host_indices([i])) == [True]
    assert [backend.exists(k) for k in keys] == [False, False, True, True, True, True]
    for p in (8, 9, 10):
        pool.poison(p)
    assert backend.batch_get_v1([keys[0], keys[1], keys[5]], host_indices([8, 9, 10])) == [False, False, True]
    assert (pool.page_bytes(8) == POISON).all() and (pool.page_bytes(9) == POISON).all()
    assert torch.equal(pool.page_bytes(10), want[5])


def test_disk_tier_cascade_and_load(make):
    """G2 of 2 blocks over G3: pages evicted from G2 are read back from G3 byte-exact."""
    pool = HostPool("layer_first")
    backend = make(pool, host_blocks=2, disk_blocks=16)
    keys = page_keys(6)
    want = [pool.page_bytes(p) for p in range(6)]
    for i in range(6):
        assert backend.batch_set_v1([keys[i]], host_indices([i])) == [True]
    assert backend.batch_exists(keys) == 6
    for p in range(8, 14):
        pool.poison(p)
    assert backend.batch_get_v1(keys, host_indices(list(range(8, 14)))) == [True] * 6
    for p, w in zip(range(8, 14), want):
        assert torch.equal(pool.page_bytes(p), w)
    backend.check_invariants()


def test_disk_only_failed_read_is_a_miss(make):
    """Disk-only mode: a page whose stored bytes were damaged fails its read, is reported False, writes nothing
    into the host pool and is dropped (no longer exists); the other pages load byte-exact."""
    pool = HostPool("page_first")
    backend = make(pool, host_blocks=None, disk_blocks=8)
    keys = page_keys(3)
    want = [pool.page_bytes(p) for p in range(3)]
    assert backend.batch_set_v1(keys, host_indices([0, 1, 2])) == [True] * 3
    disk = backend._store.cache("G3")
    slot = backend._index.pool("G3").lookup(key_hash(keys[1]))
    flip_byte(disk.file.path, slot * disk.slot_bytes + 5)
    for p in (4, 5, 6):
        pool.poison(p)
    assert backend.batch_get_v1(keys, host_indices([4, 5, 6])) == [True, False, True]
    assert torch.equal(pool.page_bytes(4), want[0]) and torch.equal(pool.page_bytes(6), want[2])
    assert (pool.page_bytes(5) == POISON).all()
    assert backend.batch_exists(keys) == 1 and not backend.exists(keys[1])
    backend.check_invariants()


def test_hash_collision_is_a_miss(make, monkeypatch):
    """Two keys on one kvbm hash: the second is not stored and never served the first's bytes."""
    monkeypatch.setattr(storage_mod, "key_hash", lambda key: 42)
    pool = HostPool("page_first")
    backend = make(pool)
    a, b = page_keys(2)
    assert backend.batch_set_v1([a], host_indices([0])) == [True]
    assert backend.batch_set_v1([b], host_indices([1])) == [False]
    assert backend.exists(a) and not backend.exists(b)
    pool.poison(3)
    assert backend.batch_get_v1([b], host_indices([3])) == [False]
    assert (pool.page_bytes(3) == POISON).all()


def test_tensor_parallel_ranks_answer_for_their_shard(make):
    """Two TP ranks, each with its own shard and store: a page stored on one rank only is a hit there and a miss
    on the other, so SGLang's minimum over ranks loads nothing; stored on both, both load their own bytes."""
    pools = [HostPool("page_first", heads=1) for _ in range(2)]
    ranks = [make(pool, tp_rank=r, tp_size=2) for r, pool in enumerate(pools)]
    keys = page_keys(2)
    assert ranks[0].batch_set_v1(keys, host_indices([0, 1])) == [True, True]
    assert min(r.batch_exists(keys) for r in ranks) == 0
    assert ranks[1].batch_set_v1(keys, host_indices([0, 1])) == [True, True]
    assert min(r.batch_exists(keys) for r in ranks) == 2
    for pool, rank in zip(pools, ranks):
        want = [pool.page_bytes(p) for p in (0, 1)]
        pool.poison(7), pool.poison(8)
        assert rank.batch_get_v1(keys, host_indices([7, 8])) == [True, True]
        assert torch.equal(pool.page_bytes(7), want[0]) and torch.equal(pool.page_bytes(8), want[1])


def test_clear_forgets_everything(make):
    pool = HostPool("layer_first")
    backend = make(pool, host_blocks=2, disk_blocks=4)
    keys = page_keys(3)
    assert backend.batch_set_v1(keys, host_indices([0, 1, 2])) == [True] * 3
    backend.clear()
    assert backend.batch_exists(keys) == 0
    assert backend.batch_set_v1(keys, host_indices([0, 1, 2])) == [True] * 3
    assert backend.batch_exists(keys) == 3


def test_refusals(make):
    """What the backend cannot serve stops start-up with a message."""
    with pytest.raises(UnsupportedHostPool, match="page_unified"):
        make(HostPool("page_unified"))
    with pytest.raises(NotImplementedError, match="MLA"):
        make(HostPool("page_first", mla=True), tp_size=2, tp_rank=1)
    with pytest.raises(KvbmConfigError, match="no kvbm tier"):
        make(HostPool("page_first"), host_blocks=None)
    backend = make(HostPool("page_first"))
    with pytest.raises(ValueError, match="whole host pool pages"):
        backend.batch_set_v1(page_keys(1), torch.arange(1, PAGE + 1))
    with pytest.raises(ValueError, match="2 pages"):
        backend.batch_get_v1(page_keys(2), host_indices([0]))


def test_calls_from_several_threads(make):
    """SGLang calls from its prefetch and backup threads at once: every page stored by one thread is read back
    byte-exact by another."""
    import threading

    pool = HostPool("page_first", pages=32)
    backend = make(pool, host_blocks=8, disk_blocks=32)
    keys = page_keys(12)
    want = {i: pool.page_bytes(i) for i in range(12)}
    errors: list[BaseException] = []

    def writer(part: range) -> None:
        try:
            for i in part:
                assert backend.batch_set_v1([keys[i]], host_indices([i])) == [True]
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(range(k, 12, 3),)) for k in range(3)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        backend.batch_exists(keys)
    for t in threads:
        t.join()
    assert not errors
    assert backend.batch_exists(keys) == 12
    dst = list(range(16, 28))
    for p in dst:
        pool.poison(p)
    assert backend.batch_get_v1(keys, host_indices(dst)) == [True] * 12
    for i, p in enumerate(dst):
        assert torch.equal(pool.page_bytes(p), want[i])


def test_host_pool_group_is_refused(make):
    class PoolGroup:
        layout, page_size, mla = "page_first", PAGE, False

    with pytest.raises(UnsupportedHostPool, match="hybrid"):
        make(PoolGroup())

    backend = make(HostPool("page_first"))
    backend.register_mem_host_pool_v2(backend.mem_pool_host, "kv")
    with pytest.raises(UnsupportedHostPool, match="mamba"):
        backend.register_mem_host_pool_v2(object(), "mamba")
