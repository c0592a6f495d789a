"""kvbm.kernels.block_checksums: the batch of seeded XXH3-64 sums equals python-xxhash's, row by row, through the
compiled loop and through the one-row-at-a-time fallback, for any row selection, width and seed."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import xxhash

from disk_faults import rng  # noqa: F401  (rng is a fixture)

from kvbm.kernels import block_checksums
from kvbm.kernels.block_checksums import checksums

# XXH3 takes a different code path for each of these lengths (empty, 1-3, 4-8, 9-16, 17-128, 129-240, long)
LENGTHS = [0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 1024, 1025, 4095]


@pytest.fixture(params=["compiled", "fallback"])
def path(request, monkeypatch) -> str:
    if request.param == "compiled":
        assert block_checksums._library_hash() is not None, "this xxhash build exports its seeded XXH3-64"
    else:
        monkeypatch.setattr(block_checksums, "_library_hash", lambda: None)
    return request.param


def random_rows(rng, n: int, width: int) -> np.ndarray:
    return rng.integers(1, 256, (n, width), dtype=np.uint8)


def random_seeds(rng, n: int) -> np.ndarray:
    """Seeds over the whole uint64 range, the top bit set in about half of them."""
    return rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)


def reference(rows: np.ndarray, nbytes: int, seeds, index) -> list[int]:
    return [xxhash.xxh3_64_intdigest(rows[r, :nbytes].tobytes(), seed=int(s)) for r, s in zip(index, seeds)]


@pytest.mark.parametrize("nbytes", LENGTHS)
def test_every_length_matches_python_xxhash(path, rng, nbytes):
    rows = random_rows(rng, 5, 4096)
    seeds = random_seeds(rng, 5)
    got = checksums(rows, nbytes, seeds)
    assert got.dtype == np.uint64 and got.shape == (5,)
    assert got.tolist() == reference(rows, nbytes, seeds, range(5))


@pytest.mark.parametrize("count", [0, 1, 2, 37])
def test_row_counts_and_seeds_with_the_top_bit(path, rng, count):
    rows = random_rows(rng, count, 3840 + 256)
    seeds = random_seeds(rng, count)
    seeds[: count // 2] |= np.uint64(1 << 63)
    if count:
        seeds[0] = 2**64 - 1
    got = checksums(rows, 3840, seeds)  # the padding after 3840 bytes is not hashed
    assert got.tolist() == reference(rows, 3840, seeds, range(count))
    rows[:, 3840:] ^= 0xFF
    assert checksums(rows, 3840, seeds).tolist() == got.tolist()


def test_rows_picked_from_a_flat_buffer_by_index(path, rng):
    """Rows of a flat buffer, picked in any order, repeated, under python-int seeds: nothing is copied first."""
    slot = 4096
    flat = random_rows(rng, 1, 40 * slot).reshape(-1)
    rows = flat.reshape(-1, slot)
    index = [int(i) for i in rng.permutation(40)[:17]] + [3, 3]
    seeds = [int(s) for s in random_seeds(rng, len(index))]
    assert checksums(rows, 3000, seeds, index).tolist() == reference(rows, 3000, seeds, index)
    assert checksums(rows, 3000, np.asarray(seeds, dtype=np.uint64), np.asarray(index)).tolist() == \
        reference(rows, 3000, seeds, index)


@pytest.mark.parametrize("view", ["every_third", "reversed", "column_offset", "fortran_column", "read_only"])
def test_strided_row_views(path, rng, view):
    base = random_rows(rng, 30, 2048)
    rows = {"every_third": base[1::3], "reversed": base[::-1], "column_offset": base[:, 7:],
            "fortran_column": np.asfortranarray(base)[:, :1],
            "read_only": np.frombuffer(base.tobytes(), dtype=np.uint8).reshape(30, 2048)}[view]
    nbytes = rows.shape[1] - 5 if rows.shape[1] > 5 else rows.shape[1]
    seeds = random_seeds(rng, rows.shape[0])
    index = rng.permutation(rows.shape[0])
    assert checksums(rows, nbytes, seeds[index], index).tolist() == reference(rows, nbytes, seeds[index], index)
    assert checksums(rows, nbytes, seeds).tolist() == reference(rows, nbytes, seeds, range(rows.shape[0]))


def test_a_changed_byte_or_seed_changes_the_sum(path, rng):
    rows = random_rows(rng, 4, 1000)
    seeds = random_seeds(rng, 4)
    before = checksums(rows, 1000, seeds)
    rows[2, int(rng.integers(0, 1000))] ^= 0x01
    seeds[3] ^= np.uint64(1)
    after = checksums(rows, 1000, seeds)
    assert (before != after).tolist() == [False, False, True, True]


def test_bad_arguments_are_refused(rng):
    rows = random_rows(rng, 4, 64)
    seeds = random_seeds(rng, 4)
    with pytest.raises(ValueError, match="nbytes"):
        checksums(rows, 65, seeds)
    with pytest.raises(ValueError, match="nbytes"):
        checksums(rows, -1, seeds)
    with pytest.raises(ValueError, match="contiguous"):
        checksums(rows[:, ::2], 16, seeds)
    with pytest.raises(ValueError, match="2-D uint8"):
        checksums(rows.view(np.uint16), 16, seeds)
    with pytest.raises(ValueError, match="2-D uint8"):
        checksums(rows[0], 16, seeds[:1])
    with pytest.raises(ValueError, match="seeds"):
        checksums(rows, 16, seeds[:3])
    for index in ([0, 4], [-1, 0]):
        with pytest.raises(ValueError, match="out of range"):
            checksums(rows, 16, seeds[:2], index)


def test_a_library_without_the_symbol_falls_back_and_logs_it_at_debug(monkeypatch, caplog):
    monkeypatch.setattr(block_checksums, "_SYMBOLS", ("XXH3_no_such_entry_point",))
    find = block_checksums._library_hash.__wrapped__
    with caplog.at_level(logging.DEBUG, logger=block_checksums.__name__):
        assert find() is None
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "one block at a time" in caplog.records[0].getMessage()
