"""Shared disk-fault helpers for the tests: a real 1 MiB tmpfs to run out of space on, a filler that fills it, and a
per-test seeded random generator."""
from __future__ import annotations

import errno
import os
import subprocess

import numpy as np
import pytest


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(abs(hash(request.node.name)) % (2**32))


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 1 MiB tmpfs, mounted for the test, to run out of space for real."""
    if os.geteuid() != 0:
        pytest.skip("mounting a 1 MiB tmpfs for the ENOSPC test needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill_filesystem(directory) -> str:
    """Write a filler file until the filesystem is full; return its path."""
    path = os.path.join(directory, "filler")
    chunk = os.urandom(4096)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return path


def _raw_fd(path) -> int:
    """A buffered read-write descriptor on ``path`` (a name, or /proc/self/fd/N of an unnamed file)."""
    return os.open(path, os.O_RDWR)


def flip_byte(path, offset: int) -> None:
    """Invert the bits of the byte at ``offset`` of the file, behind the owner's back."""
    fd = _raw_fd(path)
    try:
        (b,) = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([b ^ 0xFF]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_ranges(path, a: int, b: int, length: int) -> None:
    """Exchange the ``length`` bytes at offsets ``a`` and ``b`` of the file."""
    fd = _raw_fd(path)
    try:
        da, db = os.pread(fd, length, a), os.pread(fd, length, b)
        os.pwrite(fd, db, a)
        os.pwrite(fd, da, b)
        os.fsync(fd)
    finally:
        os.close(fd)


def punch_hole(path, offset: int, length: int) -> None:
    """Deallocate ``length`` bytes at ``offset`` (they read back as zeros; the size is kept); skips the test where
    the filesystem cannot punch holes."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    fd = _raw_fd(path)
    try:
        if libc.fallocate(fd, 0x01 | 0x02, offset, length) != 0:  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
            err = ctypes.get_errno()
            pytest.skip(f"cannot punch a hole here: {os.strerror(err)}")
    finally:
        os.close(fd)
