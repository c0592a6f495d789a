"""`kvbm.tools.checkout.checkout_commit`: what a benchmark records as the commit it ran."""
from __future__ import annotations

import subprocess
from pathlib import Path

from kvbm.tools.checkout import checkout_commit


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def test_commit_of_a_checkout_dirty_and_stamped(tmp_path: Path) -> None:
    assert checkout_commit(tmp_path) is None  # not a checkout
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = _git(tmp_path, "rev-parse", "--short", "HEAD")
    assert checkout_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("two")
    assert checkout_commit(tmp_path) == head + "+dirty"
    (tmp_path / ".kvbm_commit").write_text("abc1234\n")  # a copy run elsewhere names its commit
    assert checkout_commit(tmp_path) == "abc1234"
