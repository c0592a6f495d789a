"""The Triton kernel compiles offline for Hopper (sm_90), with 16-byte vector accesses on dense rows.

Runs in a subprocess: the rest of the suite defines kernels under TRITON_INTERPRET=1, which cannot compile.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="triton is part of the test extras; without it there is no GPU backend")

SCRIPT = textwrap.dedent("""
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kvbm.kernels.triton_copy import copy_blocks_kernel

    names = list(copy_blocks_kernel.arg_names)
    # a vLLM FlashAttention piece (32 KiB, one dense row of 4096 8-byte units) gathered into block-major staging
    consts = dict(num_pieces=64, src_block_stride=4096, dst_block_stride=262144, d1=1, d2=4096, s0=0, s1=0, t0=0,
                  t1=0, s2=1, t2=1, rows=1, col_tiles=2, tiles_per_piece=2, ALIGN=2, BLOCK_R=1, BLOCK_C=2048)
    sig = {n: ("*i64" if i < 6 else "i32") for i, n in enumerate(names)}
    sig.update({n: "constexpr" for n in consts})
    # what Triton's launcher specializes at run time: 16-byte aligned base pointers
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("src_ptr", "dst_ptr")}
    src = ASTSource(copy_blocks_kernel, sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    ptx = kernel.asm["ptx"]
    print("cubin", len(kernel.asm["cubin"]))
    print("target", re.search(r"\\.target (\\S+)", ptx).group(1))
    print("ops", " ".join(sorted(set(re.findall(r"[ls][dt]\\.global\\S*", ptx)))))
""")


def test_copy_kernel_compiles_for_sm90_with_vector_accesses():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert int(lines["cubin"]) > 0
    assert lines["target"] in ("sm_90", "sm_90a")
    ops = lines["ops"].split()
    assert "ld.global.v2.b64" in ops and "st.global.v2.b64" in ops, ops
