"""Block and sequence hashes: checked against xxh3-64 computed here from the scheme's definition, byte by byte."""
from __future__ import annotations

import random
import struct

import numpy as np
import pytest
import xxhash

from kvbm.hashing import block_hash, salt_hash, sequence_hashes


def ref_block(tokens: list[int], seed: int) -> int:
    """Block hash from the definition: little-endian u32 token bytes, xxh3-64 seeded by the salt hash."""
    return xxhash.xxh3_64_intdigest(b"".join(struct.pack("<I", t) for t in tokens), seed=seed)


def ref_sequence(tokens: list[int], block_size: int, seed: int) -> list[int]:
    """Sequence hashes from the definition: first = block hash, then hash(parent u64 LE || block u64 LE)."""
    out: list[int] = []
    for i in range(len(tokens) // block_size):
        bh = ref_block(tokens[i * block_size : (i + 1) * block_size], seed)
        out.append(bh if not out else xxhash.xxh3_64_intdigest(struct.pack("<Q", out[-1]) + struct.pack("<Q", bh), seed=seed))
    return out


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


def test_xxh3_anchor() -> None:
    """XXH3-64 of empty input with seed 0 is the published 0x2D06800538D394C2: the hash in use is xxh3-64."""
    assert block_hash([], 0) == 0x2D06800538D394C2


def test_salt_hash_is_hash_of_compact_json() -> None:
    assert salt_hash(None, None) == xxhash.xxh3_64_intdigest(b"{}", seed=0)
    assert salt_hash("s1", None) == xxhash.xxh3_64_intdigest(b'{"salt":"s1"}', seed=0)
    assert salt_hash(None, "lora-a") == xxhash.xxh3_64_intdigest(b'{"lora_name":"lora-a"}', seed=0)
    assert salt_hash("s1", "lora-a") == xxhash.xxh3_64_intdigest(b'{"salt":"s1","lora_name":"lora-a"}', seed=0)
    # Non-ASCII as raw UTF-8, quotes and backslashes escaped as JSON does.
    assert salt_hash('é"\\', None) == xxhash.xxh3_64_intdigest('{"salt":"é\\"\\\\"}'.encode(), seed=0)
    assert salt_hash("", "") == salt_hash(None, None)


def test_salt_and_lora_separate_caches() -> None:
    values = {salt_hash(s, l) for s in (None, "a", "b") for l in (None, "a", "b")}
    assert len(values) == 9
    assert salt_hash("a", None) != salt_hash(None, "a")


def test_block_hash_fixed_vectors(rng: random.Random) -> None:
    for size in (1, 16, 64):
        tokens = [rng.randrange(2**32) for _ in range(size)]
        seed = rng.randrange(2**64)
        assert block_hash(tokens, seed) == ref_block(tokens, seed)
    # Token id order and value both matter: extremes of the u32 range are encoded exactly.
    assert block_hash([0, 2**32 - 1], 7) == xxhash.xxh3_64_intdigest(b"\x00" * 4 + b"\xff" * 4, seed=7)
    assert block_hash([1, 2], 7) != block_hash([2, 1], 7)


def test_block_hash_accepts_arrays(rng: random.Random) -> None:
    tokens = [rng.randrange(2**31) for _ in range(32)]
    expected = ref_block(tokens, 99)
    assert block_hash(np.array(tokens, dtype=np.int64), 99) == expected
    assert block_hash(np.array(tokens, dtype=np.uint32), 99) == expected
    assert block_hash(tuple(tokens), 99) == expected
    assert block_hash(np.array(tokens, dtype=object), 99) == expected


def test_sequence_hashes_match_reference_and_chain(rng: random.Random) -> None:
    block_size = 16
    tokens = [rng.randrange(200_000) for _ in range(block_size * 7 + 5)]
    seed = salt_hash("cache-salt", "adapter")
    hashes = sequence_hashes(tokens, block_size, seed)
    assert hashes == ref_sequence(tokens, block_size, seed)
    assert len(hashes) == 7  # the trailing 5 tokens form a partial block: not hashed
    assert hashes[0] == block_hash(tokens[:block_size], seed)
    assert len(set(hashes)) == 7


def test_partial_block_excluded(rng: random.Random) -> None:
    tokens = [rng.randrange(50_000) for _ in range(40)]
    seed = rng.randrange(2**64)
    assert sequence_hashes(tokens[:31], 16, seed) == sequence_hashes(tokens[:16], 16, seed)
    assert sequence_hashes(tokens[:15], 16, seed) == []
    assert sequence_hashes([], 16, seed) == []


def test_prefix_property_and_divergence(rng: random.Random) -> None:
    """Equal prefixes give equal hashes; one changed token changes its block's hash and every later one."""
    tokens = [rng.randrange(50_000) for _ in range(8 * 10)]
    seed = salt_hash(None, None)
    full = sequence_hashes(tokens, 8, seed)
    assert sequence_hashes(tokens[:40], 8, seed) == full[:5]
    changed = list(tokens)
    changed[43] = (changed[43] + 1) % 50_000
    other = sequence_hashes(changed, 8, seed)
    assert other[:5] == full[:5]
    assert all(a != b for a, b in zip(other[5:], full[5:]))
    # A block that is identical but sits after a different prefix has a different sequence hash.
    swapped = tokens[8:16] + tokens[:8] + tokens[16:]
    assert sequence_hashes(swapped, 8, seed)[2:] != full[2:]


def test_salt_changes_every_hash(rng: random.Random) -> None:
    tokens = [rng.randrange(50_000) for _ in range(64)]
    a = sequence_hashes(tokens, 16, salt_hash("tenant-a", None))
    b = sequence_hashes(tokens, 16, salt_hash("tenant-b", None))
    c = sequence_hashes(tokens, 16, salt_hash(None, "lora-1"))
    assert all(x != y for x, y in zip(a, b))
    assert all(x != y for x, y in zip(a, c))


def test_incremental_hashing_with_parent(rng: random.Random) -> None:
    tokens = [rng.randrange(50_000) for _ in range(16 * 9)]
    seed = rng.randrange(2**64)
    whole = sequence_hashes(tokens, 16, seed)
    head = sequence_hashes(tokens[:48], 16, seed)
    tail = sequence_hashes(tokens[48:], 16, seed, parent_hash=head[-1])
    assert head + tail == whole


@pytest.mark.parametrize(
    "tokens, block_size, salt, exc, match",
    [
        ([1, -1], 2, 0, ValueError, r"\[0, 2\*\*32\), got -1 at index 1"),
        ([1, 2**32], 2, 0, ValueError, r"got 4294967296 at index 1"),
        ([1, 2**70], 2, 0, ValueError, r"got 1180591620717411303424 at index 1"),
        ([1.0, 2.0], 2, 0, TypeError, r"integers, got an array of dtype float64"),
        (np.array([True, False]), 2, 0, TypeError, r"dtype bool"),
        ([1, "2"], 2, 0, TypeError, r"integers"),
        ("abcd", 2, 0, TypeError, r"sequence of integer token ids, got str"),
        ([[1, 2], [3, 4]], 2, 0, ValueError, r"one-dimensional"),
        ([1, 2], 0, 0, ValueError, r"block_size must be a positive integer, got 0"),
        ([1, 2], -4, 0, ValueError, r"got -4"),
        ([1, 2], 2.0, 0, TypeError, r"block_size must be a positive integer, got float"),
        ([1, 2], 2, -1, ValueError, r"salt must be in \[0, 2\*\*64\)"),
        ([1, 2], 2, 2**64, ValueError, r"salt must be in"),
        ([1, 2], 2, "0", TypeError, r"salt must be an integer"),
    ],
)
def test_bad_input(tokens, block_size, salt, exc, match) -> None:
    with pytest.raises(exc, match=match):
        sequence_hashes(tokens, block_size, salt)


def test_bad_parent_and_salt_inputs() -> None:
    with pytest.raises(ValueError, match="parent_hash must be in"):
        sequence_hashes([1, 2], 2, 0, parent_hash=-5)
    with pytest.raises(TypeError, match="cache_salt must be a str or None, got int"):
        salt_hash(5, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="lora_name must be a str or None"):
        salt_hash(None, b"x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="valid Unicode"):
        salt_hash("\ud800", None)
    with pytest.raises(ValueError, match=r"got -3 at index 0"):
        block_hash([-3], 0)
