"""Seeded XXH3-64 of many blocks in one call, with the GIL released for the whole batch.

The disk tier checksums every slot it writes and reads on its I/O threads. python-xxhash holds the GIL while it
hashes inputs of up to 64 KiB, so those threads hashed such blocks one at a time. Here one compiled loop (numba,
``nogil``) calls the xxhash library that python-xxhash is built with (its extension module exports
``XXH3_64bits_withSeed``) once per row, at the address found at run time (so the loop stays in numba's on-disk
cache): the same sums as ``xxhash.xxh3_64_intdigest(row[:nbytes], seed=seed)``. Where the symbol is not exported
(another xxhash build), the rows are hashed one by one with python-xxhash, which gives the same sums.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Sequence

import numba
import numpy as np
import xxhash
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = ["checksums", "warm_up"]

logger = logging.getLogger(__name__)

#: Entry points tried in order: the CPU-dispatching one (AVX2 / AVX-512 where the CPU has them), then the plain one.
_SYMBOLS = ("XXH3_64bits_withSeed_dispatch", "XXH3_64bits_withSeed")


@functools.lru_cache(maxsize=None)
def _library_hash() -> int | None:
    """The address of the xxhash library's seeded XXH3-64, or None where it cannot be found."""
    try:
        library = ctypes.CDLL(xxhash._xxhash.__file__)
    except (AttributeError, OSError) as e:
        logger.debug("xxhash's library cannot be loaded (%s): checksums are computed one block at a time", e)
        return None
    for symbol in _SYMBOLS:
        entry = getattr(library, symbol, None)
        if entry is not None:
            return ctypes.cast(entry, ctypes.c_void_p).value
    logger.debug("%s exports none of %s: checksums are computed one block at a time", xxhash._xxhash.__file__,
                 _SYMBOLS)
    return None


@intrinsic
def _call_xxh3(typingctx, function, data, length, seed):  # pragma: no cover (compiled)
    """``XXH64_hash_t XXH3_64bits_withSeed(const void *data, size_t len, XXH64_hash_t seed)`` at ``function``."""
    def codegen(context, builder, signature, args):
        word, byte_pointer = ir.IntType(64), ir.IntType(8).as_pointer()
        prototype = ir.FunctionType(word, [byte_pointer, word, word])
        entry = builder.inttoptr(args[0], prototype.as_pointer())
        return builder.call(entry, [builder.inttoptr(args[1], byte_pointer), args[2], args[3]])
    return types.uint64(types.intp, types.intp, types.intp, types.uint64), codegen


@numba.njit(cache=True, nogil=True)
def _hash_rows(function, rows, index, nbytes, seeds, out):  # pragma: no cover (compiled)
    """Rows ``index`` of ``rows`` into ``out``; False (nothing hashed) if an index is out of range."""
    for i in range(index.shape[0]):
        if index[i] < 0 or index[i] >= rows.shape[0]:
            return False
    base, stride = rows.ctypes.data, rows.strides[0]
    for i in range(index.shape[0]):
        out[i] = _call_xxh3(function, base + index[i] * stride, nbytes, seeds[i])
    return True


def checksums(rows: np.ndarray, nbytes: int, seeds: np.ndarray | Sequence[int],
              index: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
    """XXH3-64 of the first ``nbytes`` bytes of rows ``index`` of ``rows`` (all rows if None), row ``index[i]``
    under ``seeds[i]``, as uint64.

    ``rows`` is a 2-D uint8 array whose rows are contiguous (any row stride: a buffer reshaped to one slot per row,
    a slice of one); ``index`` picks rows without copying them. Raises ValueError for other arrays, an ``nbytes``
    wider than a row, an index out of range or a seed count other than the row count."""
    if not isinstance(rows, np.ndarray) or rows.ndim != 2 or rows.dtype != np.uint8:
        raise ValueError(f"rows must be a 2-D uint8 array, got {getattr(rows, 'dtype', type(rows))} "
                         f"of shape {getattr(rows, 'shape', None)}")
    if rows.shape[0] and rows.shape[1] > 1 and rows.strides[1] != 1:
        raise ValueError(f"each row must be contiguous, got element stride {rows.strides[1]}")
    if not 0 <= nbytes <= rows.shape[1]:
        raise ValueError(f"nbytes {nbytes} is not within a row of {rows.shape[1]} bytes")
    index = np.arange(rows.shape[0]) if index is None else np.ascontiguousarray(index, dtype=np.int64)
    seeds = np.ascontiguousarray(seeds, dtype=np.uint64)
    if index.ndim != 1 or seeds.shape != index.shape:
        raise ValueError(f"{seeds.shape} seeds for {index.shape} rows")
    out = np.empty(index.size, dtype=np.uint64)
    function = _library_hash()
    if function is not None:
        if not _hash_rows(function, rows, index, int(nbytes), seeds, out):
            raise ValueError(f"row index out of range for {rows.shape[0]} rows")
        return out
    for i, r in enumerate(index.tolist()):
        if not 0 <= r < rows.shape[0]:
            raise ValueError(f"row index {r} out of range for {rows.shape[0]} rows")
        out[i] = xxhash.xxh3_64_intdigest(rows[r, :nbytes], seed=int(seeds[i]))
    return out


def warm_up() -> None:
    """Find the library and compile (or load from numba's cache) the loop, so a first disk write does not pay."""
    checksums(np.ones((1, 1), dtype=np.uint8), 1, [1])
