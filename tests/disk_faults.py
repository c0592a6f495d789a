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
