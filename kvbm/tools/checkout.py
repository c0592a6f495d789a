"""Which commit of this repository a benchmark ran: what its result files record."""
from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["checkout_commit"]


def checkout_commit(root: Path) -> str | None:
    """The commit checked out at ``root`` (short hash, "+dirty" when tracked files differ from it), or, for a copy
    of the checkout run on another machine, the commit named in its ``.kvbm_commit`` file (see
    bench/gpu_session.sh); None outside a git checkout."""
    stamp = Path(root) / ".kvbm_commit"
    if stamp.is_file():
        return stamp.read_text().strip() or None
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")
