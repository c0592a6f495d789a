"""Every kernel backend against the torch reference: every preset pair, random geometry, dtypes and block ids,
byte-exact, destinations poisoned. On a machine without a GPU the Triton kernel runs through Triton's interpreter
(conftest sets TRITON_INTERPRET=1), so grids here stay small."""
from __future__ import annotations

import random

import pytest
import torch

from kvbm.layouts import KVGeometry, allocate, copy_blocks, presets_for
from layout_oracle import fill_random, to_logical

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e5m2, torch.uint8, torch.float64]


def geometries(seed: int, count: int):
    rng = random.Random(seed)
    out = [(KVGeometry(2, 2, 1, 1, 576, 2), torch.bfloat16), (KVGeometry(2, 1, 3, 1, 656, 1), torch.uint8)]
    for _ in range(count):
        dtype = rng.choice(DTYPES)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if rng.random() < 0.3:
            g = KVGeometry(rng.randint(1, 2), 1, rng.choice([1, 2, 5]), 1, rng.choice([576, 3, 64]), itemsize)
        else:
            g = KVGeometry(rng.randint(1, 2), 2, rng.choice([1, 2, 3, 16]), rng.randint(1, 3),
                           rng.choice([1, 5, 8, 64, 128]), itemsize)
        out.append((g, dtype))
    return out


def run_pair(backend, a, b, g, dtype, rng, gen):
    n_src, n_dst = rng.randint(1, 4), rng.randint(1, 4)
    src = allocate(a, g, n_src, dtype=dtype, device=DEVICE)
    dst = allocate(b, g, n_dst, dtype=dtype, device=DEVICE)
    ref = allocate(b, g, n_dst, dtype=dtype, device=DEVICE)
    fill_random(src, gen)
    fill_random(dst, gen)
    for t_ref, t_dst in zip(ref.tensors, dst.tensors):
        t_ref.copy_(t_dst)
    k = rng.randint(1, min(n_src, n_dst))
    src_ids = [rng.randrange(n_src) for _ in range(k)]
    dst_ids = rng.sample(range(n_dst), k)
    copy_blocks(src, dst, src_ids, dst_ids, backend=backend)
    copy_blocks(src, ref, src_ids, dst_ids, backend="torch")
    assert torch.equal(to_logical(b, dst), to_logical(b, ref)), f"{backend}: {a} -> {b} {g} {dtype} {src_ids}->{dst_ids}"


BACKENDS = ["triton"] + (["numba"] if DEVICE == "cpu" else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mla", [False, True], ids=["kv", "mla"])
def test_backend_matches_reference_for_every_preset_pair(backend, mla):
    rng = random.Random(7 + mla)
    gen = torch.Generator().manual_seed(8 + mla)
    pool = [(g, dt) for g, dt in geometries(21 + mla, 6) if (g.num_kv == 1) == mla]
    for i, a in enumerate(presets_for(pool[0][0])):
        for j, b in enumerate(presets_for(pool[0][0])):
            g, dtype = pool[(i + j) % len(pool)]  # every pair, geometries spread over the pairs
            run_pair(backend, a, b, g, dtype, rng, gen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_random_geometries_into_and_out_of_staging(backend):
    rng = random.Random(11)
    gen = torch.Generator().manual_seed(12)
    for g, dtype in geometries(13, 8):
        for a in presets_for(g):
            run_pair(backend, a, "kvbm_staging", g, dtype, rng, gen)
            run_pair(backend, "kvbm_staging", a, g, dtype, rng, gen)


def test_auto_backend_is_triton_on_gpu_and_numba_not_the_interpreter_on_cpu():
    from kvbm.layouts.conversion import _BACKENDS

    g = KVGeometry(1, 2, 2, 1, 4, 2)
    src = allocate("vllm_flash_attn_nhd", g, 2, dtype=torch.bfloat16, device=DEVICE)
    dst = allocate("kvbm_staging", g, 2, dtype=torch.bfloat16, device=DEVICE)
    chosen = [b.name for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority) if b.preferred_for(src, dst, 1)]
    assert chosen[0] == ("triton" if DEVICE == "cuda" else "numba")


def test_plan_widens_to_eight_byte_units_and_merges_dense_pieces():
    from kvbm.kernels.copy_plan import build_plan

    g = KVGeometry(2, 2, 16, 8, 128, 2)
    fa = allocate("vllm_flash_attn_nhd", g, 3, dtype=torch.bfloat16)
    st = allocate("kvbm_staging", g, 3, dtype=torch.bfloat16)
    plan = build_plan(fa, st)
    assert plan.unit == 8 and plan.rows == 1 and plan.row_len == 16 * 8 * 128 * 2 // 8
    hnd = allocate("vllm_flash_attn_hnd", g, 3, dtype=torch.bfloat16)
    plan = build_plan(hnd, st)  # permuted: rows of one head's channels
    assert plan.unit == 8 and plan.rows == 16 * 8 and plan.row_len == 128 * 2 // 8


def test_capped_grid_loops_over_all_tiles():
    """The CTA-cap knob: a grid smaller than the tile count still copies every tile."""
    from kvbm.kernels.triton_copy import triton_copy

    gen = torch.Generator().manual_seed(3)
    g = KVGeometry(2, 2, 3, 2, 5, 2)
    src = allocate("vllm_flash_attn_hnd", g, 4, dtype=torch.bfloat16, device=DEVICE)
    dst = allocate("trtllm_pool", g, 4, dtype=torch.bfloat16, device=DEVICE)
    ref = allocate("trtllm_pool", g, 4, dtype=torch.bfloat16, device=DEVICE)
    fill_random(src, gen)
    fill_random(dst, gen)
    for a, b in zip(ref.tensors, dst.tensors):
        a.copy_(b)
    ids = torch.tensor([2, 0, 3], dtype=torch.int64)
    out = torch.tensor([1, 3, 0], dtype=torch.int64)
    triton_copy(src, dst, ids, out, max_ctas=3)
    copy_blocks(src, ref, ids, out, backend="torch")
    assert torch.equal(to_logical("trtllm_pool", dst), to_logical("trtllm_pool", ref))


def test_launch_needs_a_block_count_for_raw_id_addresses():
    """Ids given as raw device addresses carry no length: launch refuses them without num_blocks, before launching."""
    from kvbm.kernels.copy_plan import build_plan
    from kvbm.kernels.device_pointer import DevicePointer
    from kvbm.kernels.triton_copy import launch

    g = KVGeometry(2, 2, 3, 2, 5, 2)
    src = allocate("vllm_flash_attn_nhd", g, 2, dtype=torch.bfloat16, device=DEVICE)
    dst = allocate("kvbm_staging", g, 2, dtype=torch.bfloat16, device=DEVICE)
    ids = DevicePointer(0, torch.int64)
    with pytest.raises(TypeError, match="num_blocks"):
        launch(build_plan(src, dst), ids, ids)


def test_repeated_launches_of_one_plan_copy_exactly():
    """Launches after a plan's first reuse its compiled kernel (on a GPU): block counts whose tile totals are and are
    not multiples of 16, a one-tile launch, ids at addresses of every 8-byte alignment, a capped grid and an explicit
    stream all copy byte-exact into poisoned destinations. (Through the interpreter every launch is a JIT launch.)"""
    from kvbm.kernels.copy_plan import build_plan
    from kvbm.kernels.device_pointer import DevicePointer
    from kvbm.kernels.triton_copy import launch

    gen = torch.Generator().manual_seed(17)
    rng = random.Random(17)
    g = KVGeometry(2, 2, 1, 1, 8, 2)  # one 16-byte row per piece: one tile per (block, piece)
    src = allocate("vllm_flash_attn_hnd", g, 40, dtype=torch.bfloat16, device=DEVICE)
    dst = allocate("kvbm_staging", g, 40, dtype=torch.bfloat16, device=DEVICE)
    fill_random(src, gen)
    plan = build_plan(src, dst)
    ids = torch.tensor(rng.sample(range(40), 40) * 2, dtype=torch.int64, device=DEVICE)
    out = torch.tensor(rng.sample(range(40), 40) * 2, dtype=torch.int64, device=DEVICE)
    stream = torch.cuda.Stream() if DEVICE == "cuda" else None
    for n, first, max_ctas in [(8, 0, None), (1, 1, None), (3, 5, None), (16, 2, 3), (31, 9, None), (40, 0, None)]:
        for t in dst.tensors:
            t.view(torch.uint8).fill_(0xA5)
        ref = allocate("kvbm_staging", g, 40, dtype=torch.bfloat16, device=DEVICE)
        for a, b in zip(ref.tensors, dst.tensors):
            a.copy_(b)
        if DEVICE == "cuda":  # raw addresses, as the transfer engine passes them
            s = DevicePointer(ids.data_ptr() + 8 * first, torch.int64)
            d = DevicePointer(out.data_ptr() + 8 * first, torch.int64)
        else:  # the interpreter reads tensors only
            s, d = ids[first:first + n], out[first:first + n]
        launch(plan, s, d, num_blocks=n, max_ctas=max_ctas, stream=stream)
        if stream is not None:
            stream.synchronize()
        copy_blocks(src, ref, ids[first:first + n].cpu(), out[first:first + n].cpu(), backend="torch")
        assert torch.equal(to_logical("kvbm_staging", dst), to_logical("kvbm_staging", ref)), (n, first, max_ctas)
    if DEVICE == "cuda":
        assert len(plan.triton_compiled) == 1  # one compiled kernel served every launch after the first


def test_launch_hooks_set_reads_triton_hook_chains_and_plain_hooks():
    """Newer Tritons keep each launch hook as a chain of functions, empty when none is set (never None); older ones
    a function or None. Only a set hook counts: with one, launches must go through Triton's runner."""
    import triton

    from kvbm.kernels.triton_copy import launch_hooks_set

    runtime = triton.knobs.runtime
    saved = runtime.launch_enter_hook
    try:
        chain = getattr(saved, "calls", None) is not None
        if chain:
            assert not saved.calls and not launch_hooks_set()
            saved.add(print)
            assert launch_hooks_set()
            saved.remove(print)
            assert not launch_hooks_set()
        runtime.launch_enter_hook = None
        assert not launch_hooks_set()
        runtime.launch_enter_hook = print
        assert launch_hooks_set()
    finally:
        runtime.launch_enter_hook = saved
    assert not launch_hooks_set()


@pytest.mark.skipif(DEVICE != "cuda", reason="the compiled-kernel launch path exists only on a GPU")
def test_compiled_launches_call_triton_launch_hooks_when_set():
    """Launches of a compiled kernel go straight through its launcher, unless a Triton launch hook (a profiler's)
    is set: then through Triton's runner, which calls it. Both copy byte-exact."""
    import triton

    from kvbm.kernels.copy_plan import build_plan
    from kvbm.kernels.triton_copy import launch

    g = KVGeometry(2, 2, 4, 2, 8, 2)
    src = allocate("vllm_flash_attn_nhd", g, 12, dtype=torch.bfloat16, device=DEVICE)
    fill_random(src, torch.Generator().manual_seed(5))
    plan_dst = allocate("kvbm_staging", g, 12, dtype=torch.bfloat16, device=DEVICE)
    plan = build_plan(src, plan_dst)
    ids = torch.tensor([7, 2, 9, 4], dtype=torch.int64, device=DEVICE)
    out = torch.tensor([0, 5, 1, 11], dtype=torch.int64, device=DEVICE)
    calls = []
    runtime = triton.knobs.runtime
    unset = runtime.launch_enter_hook  # an empty hook chain in newer Tritons, None in older ones
    for hooked in (False, True, False):  # the first launch compiles (JIT); the next ones run the compiled kernel
        for t in plan_dst.tensors:
            t.view(torch.uint8).fill_(0xA5)
        ref = allocate("kvbm_staging", g, 12, dtype=torch.bfloat16, device=DEVICE)
        for a, b in zip(ref.tensors, plan_dst.tensors):
            a.copy_(b)
        before = len(calls)
        if hooked:
            runtime.launch_enter_hook = lambda metadata: calls.append(metadata)
        try:
            launch(plan, ids, out)
        finally:
            runtime.launch_enter_hook = unset
        torch.cuda.synchronize()
        assert len(calls) == before + hooked
        copy_blocks(src, ref, ids.cpu(), out.cpu(), backend="torch")
        assert torch.equal(to_logical("kvbm_staging", plan_dst), to_logical("kvbm_staging", ref))
    assert len(plan.triton_compiled) == 1


def test_compiled_kernel_and_launch_constants_of_a_plan():
    """`compiled_kernel` compiles with a launch of no tiles (the destination keeps its bytes) and keeps the kernel on
    the plan for later launches (none under the interpreter); `launch_constants` gives the plan's tiles per block pair
    and the addresses of its bases and offset tables. `first_piece_address` is `piece_addresses()[0]`."""
    from triton.compiler import CompiledKernel

    from kvbm.kernels.copy_plan import build_plan
    from kvbm.kernels.triton_copy import _constants, compiled_kernel, launch_constants

    g = KVGeometry(2, 2, 4, 2, 8, 2)
    src = allocate("vllm_flash_attn_hnd", g, 6, dtype=torch.bfloat16, device=DEVICE)
    dst = allocate("kvbm_staging", g, 6, dtype=torch.bfloat16, device=DEVICE)
    fill_random(src, torch.Generator().manual_seed(3))
    fill_random(dst, torch.Generator().manual_seed(4))
    before = [t.view(torch.int16).clone() for t in dst.tensors]  # (bytes: random bf16 has NaNs)
    assert src.first_piece_address() == src.piece_addresses()[0]
    plan = build_plan(src, dst)
    stream = torch.cuda.Stream() if DEVICE == "cuda" else None
    kernel = compiled_kernel(plan, stream)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        assert isinstance(kernel, CompiledKernel) and compiled_kernel(plan, stream) is kernel
    else:
        assert kernel is None
    assert all(torch.equal(a.view(torch.int16), b) for a, b in zip(dst.tensors, before))
    tiles, pointers = launch_constants(plan)
    assert tiles == _constants(plan)[0] and tiles % plan.num_pieces == 0
    assert pointers == (plan.src_base.data_ptr(), plan.dst_base.data_ptr(), plan.src_offsets_aligned.data_ptr(),
                        plan.dst_offsets_aligned.data_ptr())
