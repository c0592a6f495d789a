"""GPU <-> disk: blocks between a GPU cache (G1) and a `DiskKVCache` (G3).

Two ways, chosen when the path is built from ``Transfers.disk_io`` (``DYN_KVBM_DISK_IO``):

* POSIX (``posix``; ``auto`` without GPUDirect Storage): through a chunk of the shared pinned bounce pool. A write
  copies GPU -> chunk with the GPU -> host path (`GpuHostPath`, through ``Transfers.submit``), then writes the
  chunk's slots on a disk thread once the copy's event is done; a read reads the slots into the chunk on a disk
  thread (checksums verified), then copies the slots read intact chunk -> GPU, submitted from the polling thread.
* GDS (``gds``; ``auto`` when the cuFile probe finds the driver and nvidia-fs, and the cache's file registers with
  cuFile): a device staging chunk in the disk's layout (block-major, slot stride), gathered from / scattered into
  the GPU cache by the Triton copy on a side stream, and moved to / from the file by ``cuFileRead`` /
  ``cuFileWrite`` per run of consecutive slots on a disk thread. Slots written this way carry no checksum (their
  bytes never pass through host memory) and reads of them are not verified.

``gds`` fails loudly when GPUDirect Storage is unavailable (naming DYN_KVBM_DISK_IO); ``auto`` falls back to POSIX
and logs why once at INFO.
"""
from __future__ import annotations

import errno
import logging
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import gds
from ..block_transfer import BlockTransfer
from ..bounce import BouncePool, bounce_pool
from ..disk_cache import DiskKVCache
from ..medium import Medium, medium_of
from ..transfers import Transfers, register_path
from .host_disk import bounced_read_steps, bounced_write_steps, check_tags, start_transfer

__all__ = ["GpuDiskPath"]

log = logging.getLogger(__name__)


class GpuDiskPath:
    """Moves blocks between a GPU cache and a `DiskKVCache`, by cuFile or through a pinned bounce buffer.

    ``mode`` is "gds" or "posix"; ``reason`` says why. Raises RuntimeError (naming DYN_KVBM_DISK_IO) when
    ``disk_io`` is "gds" and the cuFile probe or driver fails."""

    name = "gpu-disk"

    def __init__(self, transfers: Transfers) -> None:
        self._transfers = transfers
        self._cufile: Any = None
        self._handles: dict[int, tuple[Any, Any, DiskKVCache]] = {}  # id(disk) -> (handle, descr, disk)
        self._posix_caches: dict[int, str] = {}  # id(disk) -> why it uses POSIX under "auto"
        self._registered_buffers: list[int] = []
        self._lock = threading.Lock()
        if transfers.disk_io == "posix":
            self.mode, self.reason = "posix", "DYN_KVBM_DISK_IO=posix"
        else:
            probe = gds.probe_gds()
            failure = None if probe.available else probe.reason
            if failure is None:
                try:
                    self._cufile = gds.load_cufile()
                    self._cufile.driver_open()
                except Exception as e:  # noqa: BLE001 - a broken driver is a reason to fall back (auto) or fail (gds)
                    self._cufile, failure = None, f"cuFileDriverOpen failed ({gds.describe_error(e)})"
            if failure is None:
                self.mode, self.reason = "gds", probe.reason
            elif transfers.disk_io == "gds":
                raise RuntimeError(f"DYN_KVBM_DISK_IO=gds but GPUDirect Storage cannot be used here: {failure}; "
                                   f"set DYN_KVBM_DISK_IO=auto or posix to use O_DIRECT POSIX I/O")
            else:
                self.mode, self.reason = "posix", failure
        log.info("G1 <-> G3 I/O path: %s (%s)", "cuFile (GPUDirect Storage)" if self.mode == "gds"
                 else "O_DIRECT POSIX through pinned bounce buffers", self.reason)

    # ------------------------------------------------------------------ cuFile

    def _handle(self, disk: DiskKVCache) -> Any:
        """The cuFile handle of ``disk``'s file (registered on first use), or None when it uses POSIX."""
        if self.mode != "gds":
            return None
        key = id(disk)
        with self._lock:
            if key in self._handles and self._handles[key][2] is disk:
                return self._handles[key][0]
            if key in self._posix_caches:
                return None
            try:
                handle, descr = gds.register_file(self._cufile, disk.file.fileno())
            except Exception as e:  # noqa: BLE001 - e.g. cuFileError 5027 on a filesystem without GDS support
                why = f"cuFileHandleRegister of {disk.file.path!r} failed ({gds.describe_error(e)})"
                if self._transfers.disk_io == "gds":
                    raise ValueError(f"DYN_KVBM_DISK_IO=gds but {why}; set DYN_KVBM_DISK_IO=auto or posix to use "
                                     f"O_DIRECT POSIX I/O") from e
                self._posix_caches[key] = why
                log.info("G1 <-> G3 I/O of %s: O_DIRECT POSIX through pinned bounce buffers (%s)", disk.name, why)
                return None
            self._handles[key] = (handle, descr, disk)
            return handle

    def _staging_pool(self, gpu: Any, disk: DiskKVCache) -> BouncePool:
        """Device staging chunks in the disk's layout, registered with cuFile once."""
        pool = bounce_pool(self._transfers, disk.geometry, disk.dtype, disk.slot_bytes, device=gpu.device)
        base = pool.storage.data_ptr()
        with self._lock:
            if base not in self._registered_buffers:
                self._registered_buffers.append(base)
                try:
                    self._cufile.buf_register(base, pool.storage.numel(), 0)
                except Exception as e:  # noqa: BLE001 - unregistered buffers still work, through cuFile's bounce
                    self._registered_buffers.remove(base)
                    log.debug("cuFileBufRegister of the staging buffer failed: %s", gds.describe_error(e))
        return pool

    def _stage(self, src: Any, dst: Any, src_ids: np.ndarray, dst_ids: np.ndarray) -> BlockTransfer:
        """GPU cache <-> device staging chunk: the GPU -> GPU path (the Triton copy on the shared side stream,
        after the caller's queued work)."""
        return self._transfers.submit(src, dst, src_ids, dst_ids)

    def _gds_io(self, handle: Any, disk: DiskKVCache, pool: BouncePool, reading: bool, slots: list[int],
                buf_blocks: list[int], tags: list[int] | None) -> dict[int, str]:
        """Disk thread: move ``slots`` to or from staging blocks ``buf_blocks`` with cuFile, one call per run of
        consecutive slots (retried slot by slot when it fails); return {position: reason}."""
        verb = "read" if reading else "write"
        errors = {k: f"disk {verb} failed: {e}" for k, e in
                  ((k, e) for k, s in enumerate(slots) for e in [disk.file.precheck([s], reading).get(s)] if e)}
        items = sorted((s, b, k) for k, (s, b) in enumerate(zip(slots, buf_blocks)) if k not in errors)
        runs: list[list[tuple[int, int, int]]] = []
        for item in items:
            if runs and runs[-1][-1][0] == item[0] - 1 and runs[-1][-1][1] == item[1] - 1:
                runs[-1].append(item)
            else:
                runs.append([item])
        for run in runs:
            try:
                self._cufile_move(handle, pool, reading, run)
            except Exception:  # noqa: BLE001 - find the bad slots one by one
                for item in run:
                    try:
                        self._cufile_move(handle, pool, reading, [item])
                    except Exception as e:  # noqa: BLE001
                        errors[item[2]] = (f"disk {verb} failed: cuFile {verb} of slot {item[0]}: "
                                           f"{gds.describe_error(e)}")
        if not reading:
            ok = [s for k, s in enumerate(slots) if k not in errors]
            disk.forget(ok)
            disk.forget([s for k, s in enumerate(slots) if k in errors], failed=True)
            disk.file.mark_written(ok)
        return errors

    def _cufile_move(self, handle: Any, pool: BouncePool, reading: bool, run: list[tuple[int, int, int]]) -> None:
        sb = pool.slot_bytes
        nbytes = len(run) * sb
        call = self._cufile.read if reading else self._cufile.write
        n = call(handle, pool.storage.data_ptr(), nbytes, run[0][0] * sb, run[0][1] * sb)
        if n != nbytes:
            code = -n if isinstance(n, int) and -4096 < n < 0 else (errno.ENODATA if reading else errno.EIO)
            raise OSError(code, f"cuFile {'read' if reading else 'write'} moved {n} of {nbytes} bytes")

    # ------------------------------------------------------------------ submit

    def _sides(self, src: Any, dst: Any) -> tuple[bool, DiskKVCache, Any]:
        """(reading from the disk?, the disk cache, the GPU cache); ValueError for caches this path cannot move."""
        reading = medium_of(src) is Medium.DISK
        disk, gpu = (src, dst) if reading else (dst, src)
        if not isinstance(disk, DiskKVCache) or medium_of(gpu) is not Medium.GPU:
            raise ValueError(f"{self.name} moves blocks between a GPU cache and a DiskKVCache, got "
                             f"{type(src).__name__} -> {type(dst).__name__}")
        return reading, disk, gpu

    def prepare(self, src: Any, dst: Any) -> None:
        """Build now what the copies between the GPU cache and the disk's pinned bounce buffers need (POSIX I/O:
        the bounce pool, and `Transfers.prepare` of the pool's cache, which builds the transfer engine and the
        pair's plans and kernels), so that the first store or load does not; under cuFile, the file's registration.
        Raises as `submit` does for caches this path cannot move."""
        reading, disk, gpu = self._sides(src, dst)
        if self._handle(disk) is not None:
            return
        pool = bounce_pool(self._transfers, disk.geometry, disk.dtype, disk.slot_bytes)
        if reading:
            self._transfers.prepare(pool.cache, gpu)
        else:
            self._transfers.prepare(gpu, pool.cache)

    def submit(self, src: Any, dst: Any, src_ids: np.ndarray, dst_ids: np.ndarray, *,
               tags: Sequence[int] | None = None) -> BlockTransfer:
        """Start the transfer (see `HostDiskPath.submit` for ``tags``); raises ValueError for caches this path
        cannot move, or (DYN_KVBM_DISK_IO=gds) a file cuFile refuses."""
        reading, disk, gpu = self._sides(src, dst)
        tag_list = check_tags(tags, src_ids.size)
        handle = self._handle(disk)
        t = self._transfers
        me: list = []
        if handle is None:
            pool = bounce_pool(t, disk.geometry, disk.dtype, disk.slot_bytes)
            if reading:
                steps = bounced_read_steps(t, disk, gpu, src_ids, dst_ids, tag_list, pool, me=me)
            else:
                steps = bounced_write_steps(t, gpu, disk, src_ids, dst_ids, tag_list, pool, me=me)
            return start_transfer(src_ids.size, "gpu-disk-posix", steps, pool, me)
        pool = self._staging_pool(gpu, disk)

        def io(slots: list[int], buf_blocks: list[int], tags_: list[int] | None) -> dict[int, str]:
            return self._gds_io(handle, disk, pool, reading, slots, buf_blocks, tags_)

        if reading:
            steps = bounced_read_steps(t, disk, gpu, src_ids, dst_ids, tag_list, pool, stage=self._stage, io=io,
                                       me=me)
        else:
            steps = bounced_write_steps(t, gpu, disk, src_ids, dst_ids, tag_list, pool, stage=self._stage, io=io,
                                        me=me)
        return start_transfer(src_ids.size, "gpu-disk-gds", steps, pool, me)

    def close(self) -> None:
        """Deregister the cuFile handles and buffers and close the driver (idempotent; the pools are shared
        resources)."""
        if self._cufile is None:
            return
        for handle, _, _ in self._handles.values():
            try:
                self._cufile.handle_deregister(handle)
            except Exception as e:  # noqa: BLE001
                log.debug("cuFileHandleDeregister failed: %s", gds.describe_error(e))
        for base in self._registered_buffers:
            try:
                self._cufile.buf_deregister(base)
            except Exception as e:  # noqa: BLE001
                log.debug("cuFileBufDeregister failed: %s", gds.describe_error(e))
        self._handles.clear()
        self._registered_buffers.clear()
        try:
            self._cufile.driver_close()
        except Exception as e:  # noqa: BLE001
            log.debug("cuFileDriverClose failed: %s", gds.describe_error(e))
        self._cufile = None


_PATH_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PATH_LOCK = threading.Lock()


def _shared_path(transfers: Transfers) -> GpuDiskPath:
    """One path object per `Transfers` for both directions: one cuFile driver session, one registration per file
    (``Transfers.path`` calls this under its own lock, so ``transfers.shared`` cannot be used here)."""
    with _PATH_LOCK:
        path = _PATH_OF.get(transfers)
        if path is None:
            path = _PATH_OF[transfers] = GpuDiskPath(transfers)
        return path


register_path(Medium.GPU, Medium.DISK, _shared_path)
register_path(Medium.DISK, Medium.GPU, _shared_path)
