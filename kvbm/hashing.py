"""Block and sequence hashes of token blocks, compatible with Dynamo KVBM's scheme.

A request's tokens are cut into blocks of ``block_size`` tokens; only full blocks get hashes. Three 64-bit values
(xxh3-64 from the ``xxhash`` package) identify them:

- salt hash: xxh3-64, seed 0, of the compact JSON object ``{"salt": cache_salt, "lora_name": lora_name}`` with
  absent (None or empty) fields left out, so a plain request hashes ``{}``. Requests with different salts or
  LoRA adapters never share blocks.
- block hash: xxh3-64 of the block's token ids as little-endian u32 bytes, seeded by the salt hash.
- sequence hash: for the first block its block hash; after that xxh3-64 of the parent's sequence hash and the
  block hash (two little-endian u64), seeded by the salt hash. It names the whole prefix up to that block and is
  the key of every tier's pool and of the registry.
- group salt (hybrid models only): each KV cache group hashes its blocks with the request's salt hash mixed with the
  group's index and a text naming its cache spec (`group_salt`), so groups never share keys.

Typical use by the manager: ``salt = salt_hash(req.cache_salt, req.lora_name)`` once per request, then
``sequence_hashes(prompt_tokens, block_size, salt)`` for the prefix lookup, and, as the request grows,
``sequence_hashes(new_tokens, block_size, salt, parent_hash=last_seq_hash)`` for the newly completed blocks only
(``new_tokens`` starting at a block boundary).
"""
from __future__ import annotations

import array
import json
import struct
import sys
from typing import Sequence

import numpy as np
import xxhash

__all__ = ["salt_hash", "group_salt", "block_hash", "sequence_hashes", "U64_MAX", "U32_MAX"]

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1

_PAIR = struct.Struct("<QQ")
_NATIVE_U32 = sys.byteorder == "little" and array.array("I").itemsize == 4  # an array("I") is little-endian u32


def _check_u64(name: str, value: object) -> int:
    """Return ``value`` if it is an int in [0, 2**64); raise a TypeError/ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer hash in [0, 2**64), got {type(value).__name__} {value!r}")
    value = int(value)
    if not 0 <= value <= U64_MAX:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


def _token_bytes(tokens: Sequence[int]) -> bytes:
    """Token ids as contiguous little-endian u32 bytes, after checking they are integers in [0, 2**32)."""
    if isinstance(tokens, (str, bytes, bytearray)):
        raise TypeError(f"tokens must be a sequence of integer token ids, got {type(tokens).__name__}")
    if isinstance(tokens, (list, tuple)):
        # Fast path (for lists, an array's conversion takes half struct's time at 32k tokens, a third of numpy's):
        # both reject non-integers and ids outside [0, 2**32); on any error the checks below find the offending
        # entry for the message.
        try:
            if _NATIVE_U32:
                return array.array("I", tokens).tobytes()
            return struct.pack(f"<{len(tokens)}I", *tokens)
        except (struct.error, TypeError, OverflowError):
            pass
    try:
        arr = np.asarray(tokens)
    except (ValueError, TypeError) as exc:  # ragged nesting and the like
        raise TypeError(f"tokens must be a flat sequence of integer token ids: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return b""
    if arr.dtype.kind == "O":
        # Python ints too large for int64, or mixed objects: check one by one for a precise message.
        values = arr.tolist()
        for i, t in enumerate(values):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise TypeError(f"tokens must be integers, got {type(t).__name__} {t!r} at index {i}")
            if not 0 <= t <= U32_MAX:
                raise ValueError(f"token ids must be in [0, 2**32), got {t} at index {i}")
        return np.asarray(values, dtype="<u4").tobytes()
    if arr.dtype.kind not in "iu":
        raise TypeError(f"tokens must be integers, got an array of dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > U32_MAX:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token ids must be in [0, 2**32), got {bad} at index {int(np.flatnonzero(arr == bad)[0])}")
    return arr.astype("<u4", copy=False).tobytes()


def salt_hash(cache_salt: str | None = None, lora_name: str | None = None) -> int:
    """Hash of a request's cache salt and LoRA name: the seed of all its block hashes.

    Empty strings count as absent, so ``salt_hash("", None) == salt_hash(None, None)``.
    """
    payload: dict[str, str] = {}
    for key, value in (("salt", cache_salt), ("lora_name", lora_name)):
        if value is None:
            continue
        if not isinstance(value, str):
            name = "cache_salt" if key == "salt" else key
            raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
        if value:
            payload[key] = value
    # Compact JSON, non-ASCII written as UTF-8 (not \u escapes), keys in the order salt, lora_name.
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"cache_salt and lora_name must be valid Unicode text: {exc}") from exc
    return xxhash.xxh3_64_intdigest(data, seed=0)


def group_salt(salt: int, group: int, spec_key: str) -> int:
    """The salt of one KV cache group of a hybrid model: xxh3-64, seeded by ``salt``, of the group index (a
    little-endian u32) followed by ``spec_key`` (UTF-8), so two groups, or two specs, never share a block hash."""
    salt = _check_u64("salt", salt)
    if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group <= U32_MAX:
        raise ValueError(f"group must be an int in [0, 2**32), got {group!r}")
    if not isinstance(spec_key, str) or not spec_key:
        raise ValueError(f"spec_key must be a non-empty str, got {spec_key!r}")
    return xxhash.xxh3_64_intdigest(struct.pack("<I", group) + spec_key.encode("utf-8"), seed=salt)


def block_hash(tokens: Sequence[int], salt: int) -> int:
    """Hash of one block's token ids (any length; callers pass full blocks), seeded by ``salt``."""
    salt = _check_u64("salt", salt)
    return xxhash.xxh3_64_intdigest(_token_bytes(tokens), seed=salt)


def sequence_hashes(
    tokens: Sequence[int], block_size: int, salt: int, *, parent_hash: int | None = None
) -> list[int]:
    """Sequence hashes of the full blocks of ``tokens`` (a trailing partial block is left out).

    ``parent_hash`` continues a sequence: ``tokens`` then start right after the block whose sequence hash it is,
    so hashing a prompt in pieces cut at block boundaries gives the same hashes as hashing it whole.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"block_size must be a positive integer, got {type(block_size).__name__} {block_size!r}")
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    block_size = int(block_size)
    salt = _check_u64("salt", salt)
    parent = None if parent_hash is None else _check_u64("parent_hash", parent_hash)

    data = memoryview(_token_bytes(tokens))
    step = 4 * block_size
    out: list[int] = []
    for start in range(0, len(data) - step + 1, step):
        bh = xxhash.xxh3_64_intdigest(data[start : start + step], seed=salt)
        parent = bh if parent is None else xxhash.xxh3_64_intdigest(_PAIR.pack(parent, bh), seed=salt)
        out.append(parent)
    return out
