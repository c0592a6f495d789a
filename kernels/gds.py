"""Start-up probes that choose the disk tier's I/O path: GPUDirect Storage (cuFile), or O_DIRECT POSIX I/O.

GDS is only worth using when the cuFile driver opens *and* the nvidia-fs kernel module is loaded; without
nvidia-fs, cuFile runs in compatibility mode (POSIX I/O inside the library through its own bounce buffers), which
gains nothing over our O_DIRECT path through pinned host buffers. The probes never raise: every failure becomes a
reason string that the caller logs.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

PATH_GDS = "cufile-gds"
PATH_COMPAT = "cufile-compat"
PATH_POSIX = "posix-o-direct"

PROC_MODULES = "/proc/modules"
SYS_MODULE_NVIDIA_FS = "/sys/module/nvidia_fs"


@dataclass(frozen=True)
class GdsProbe:
    """What the probe found: ``path`` is one of PATH_GDS, PATH_COMPAT, PATH_POSIX; ``available`` is True only for
    PATH_GDS (compatibility mode is treated as not worth using, so the disk tier then uses POSIX O_DIRECT I/O);
    ``reason`` says why, for the start-up log."""

    available: bool
    path: str
    reason: str


def _first_line(exc: BaseException) -> str:
    """A one-line description of an exception for a reason string."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def nvidia_fs_loaded() -> tuple[bool, str]:
    """Whether the nvidia-fs kernel module (needed for true GDS) is loaded, and how that was decided."""
    try:
        with open(PROC_MODULES) as f:
            loaded = any(line.split(" ", 1)[0] == "nvidia_fs" for line in f)
        return loaded, f"{PROC_MODULES} {'lists' if loaded else 'does not list'} nvidia_fs"
    except OSError as e:
        loaded = os.path.isdir(SYS_MODULE_NVIDIA_FS)
        return loaded, (
            f"{PROC_MODULES} unreadable ({e.strerror}); {SYS_MODULE_NVIDIA_FS} "
            f"{'exists' if loaded else 'is absent'}"
        )


def probe_gds() -> GdsProbe:
    """Decide whether the disk tier can use GPUDirect Storage through ``cuda.bindings.cufile``; never raises."""
    posix = "disk tier uses O_DIRECT POSIX I/O through pinned host buffers"
    try:
        cufile = importlib.import_module("cuda.bindings.cufile")
    except Exception as e:  # ImportError, or a broken CUDA install failing at import
        return GdsProbe(False, PATH_POSIX, f"cuda.bindings.cufile not importable ({_first_line(e)}); {posix}")
    try:
        cufile.driver_open()
    except Exception as e:  # library missing (RuntimeError) or cuFileError from the driver
        return GdsProbe(False, PATH_POSIX, f"cuFileDriverOpen failed ({_first_line(e)}); {posix}")
    try:
        loaded, how = nvidia_fs_loaded()
    finally:
        try:
            cufile.driver_close()
        except Exception as e:
            logger.debug("cuFileDriverClose after the probe failed: %s", e)
    if loaded:
        return GdsProbe(True, PATH_GDS, f"cuFileDriverOpen succeeded and {how}: GPUDirect Storage is available")
    return GdsProbe(
        False,
        PATH_COMPAT,
        f"cuFileDriverOpen succeeded but {how}: cuFile would run in compatibility mode, so the {posix}",
    )


@functools.lru_cache(maxsize=1)
def nixl_posix_available() -> bool:
    """Whether NIXL is installed and its POSIX (DRAM <-> FILE) backend can be created here; never raises.

    Cached: creating an agent costs seconds the first time (the import pulls in torch).
    """
    try:
        from nixl._api import nixl_agent, nixl_agent_config

        agent = nixl_agent(
            f"kvbm-probe-{os.getpid()}", nixl_agent_config(enable_prog_thread=False, backends=[])
        )
        agent.create_backend("POSIX", {})
        ok = "FILE_SEG" in agent.backend_mems.get("POSIX", [])
        if not ok:
            logger.info("NIXL POSIX backend lacks FILE memory: %s", agent.backend_mems.get("POSIX"))
        return ok
    except Exception as e:
        logger.info("NIXL POSIX backend unavailable: %s", _first_line(e))
        return False


def load_cufile():
    """The ``cuda.bindings.cufile`` module (ImportError when it is missing)."""
    return importlib.import_module("cuda.bindings.cufile")


def register_file(cufile, fd: int) -> tuple[int, object]:
    """Register the open descriptor ``fd`` with cuFile; return ``(handle, descr)`` (keep ``descr`` alive with the
    handle). Raises what ``handle_register`` raises: cuFileError 5027 (HANDLE_NOT_REGISTERED) on filesystems
    without GPUDirect Storage support."""
    descr = cufile.Descr()
    descr.type = cufile.FileHandleType.OPAQUE_FD
    descr.handle.fd = fd
    descr.fs_ops = 0
    return cufile.handle_register(descr.ptr), descr


def describe_error(exc: BaseException) -> str:
    """A one-line description of a cuFile (or other) exception for a per-block failure reason."""
    return _first_line(exc)
