"""A file-backed pool of fixed-size, 4 KiB-aligned block slots (the G3 disk tier's storage).

`DiskBlockFile` preallocates one file of ``num_slots`` slots, opens it with O_DIRECT (so the page cache neither
doubles the memory use nor hides the disk's speed) and moves batches of slots between the file and host buffers
with ``os.preadv`` / ``os.pwritev``. Runs of consecutive slot ids become one call (vectored over the scattered
buffer blocks, split at ``max_io_bytes``); the calls of a batch run on a small thread pool (the ``os`` calls release
the GIL), each thread taking the batch's next request until none is left (one task per thread, not per request:
small requests cost less Python), so several requests are in flight at once. A caller's per-request hook
(``on_read``: verify what was just read; ``before_write``: checksum what is about to be written) runs on the thread
of the request, so that work proceeds in parallel with the other requests' I/O instead of after the whole batch.

I/O errors are data, not exceptions: every batch returns a `SlotIOResult` that says, per slot, whether the bytes
were moved, and carries the ``OSError`` of each failed slot (disk full, EIO, a short read of a truncated file, a
deleted file, a closed descriptor). A slot reported as read is byte-exact; the destination bytes of a failed slot
are unspecified and must not be used. Misuse (bad slot ids, a too small or misaligned buffer, a closed file) raises.
No policy lives here: which block goes to which slot is the manager's business.

The file is opened once and never reopened by name: unnamed (O_TMPFILE) where the filesystem allows, so nothing is
left behind even by ``kill -9``; else created with O_EXCL | O_NOFOLLOW under ``kvbm-g3-<pid>-<random>.blocks``,
checked with fstat and locked (flock) for its lifetime, and files of that pattern whose owner is gone are
reclaimed when the next file is made. O_DIRECT is set on the same descriptor with fcntl. A world-writable
directory without the sticky bit is refused.

A file another process created and writes is read through `DiskBlockFile.adopt` (a disk tier shared by ranks
holding identical KV): a read-only descriptor received from its writer, never a name; it reads and never writes,
and the slots a truncation lost are the writer's to mark, in the ``lost`` flags both processes map.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import operator
import os
import secrets
import shutil
import stat
import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

ALIGNMENT = 4096
"""Byte alignment of slot sizes, file offsets and buffer addresses (O_DIRECT needs the device's logical block size)."""

FILE_PREFIX, FILE_SUFFIX = "kvbm-g3-", ".blocks"
"""Names of named cache files: ``kvbm-g3-<owner pid>-<random>.blocks`` (unnamed O_TMPFILE files have none)."""
O_TMPFILE = getattr(os, "O_TMPFILE", 0)

_ZEROFILL_CHUNK = 8 << 20
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
#: A per-request hook: called on the request's thread with the (slot id, buffer block) pairs of the request.
SlotHook = Callable[[list[tuple[int, int]]], None]


def align_up(nbytes: int, alignment: int = ALIGNMENT) -> int:
    """Round ``nbytes`` up to a multiple of ``alignment`` (slot sizes and offsets must be block aligned)."""
    return -(-nbytes // alignment) * alignment


@dataclass
class SlotIOResult:
    """Per-slot outcome of one `DiskBlockFile.read_slots` / `write_slots` batch.

    ``slots`` are the slot ids in the order the caller passed them; ``errors`` maps each failed slot id to the
    ``OSError`` that failed it. A slot absent from ``errors`` was moved completely and exactly.
    """

    slots: list[int]
    errors: dict[int, OSError] = field(default_factory=dict)

    @property
    def ok(self) -> list[bool]:
        """Success flag per slot, aligned with ``slots``."""
        return [s not in self.errors for s in self.slots]

    @property
    def failed_slots(self) -> list[int]:
        """Slot ids that failed, in the caller's order."""
        return [s for s in self.slots if s in self.errors]

    @property
    def all_ok(self) -> bool:
        """True when every slot of the batch was moved."""
        return not self.errors


def _release(fd: int, dir_fd: int, name: str | None, remove: bool) -> None:
    """Unlink the file's name if it still is our file (``remove``), then close the descriptors (which drops the
    file's lock: a reclaimer never finds it unlocked under its name); tolerates what is already gone."""
    if remove and name is not None and fd >= 0:
        try:
            mine, there = os.fstat(fd), os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
                os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass
    for d in (fd, dir_fd):
        if d >= 0:
            try:
                os.close(d)
            except OSError:
                pass


def _check_directory(dir_fd: int, directory: str) -> None:
    """Refuse a directory that anyone may write to without the sticky bit: another user could then remove or
    replace the cache's file."""
    st = os.fstat(dir_fd)
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise PermissionError(
            errno.EACCES,
            f"disk cache directory {directory!r} is world-writable without the sticky bit (mode "
            f"{stat.S_IMODE(st.st_mode):o}): any user could replace the cache's file; use a private directory "
            f"(chmod o-w) or set the sticky bit (chmod +t)",
        )


def _create(dir_fd: int, directory: str) -> tuple[int, str | None]:
    """Create the file in the directory, opened once and never reopened by name: unnamed (O_TMPFILE) where the
    filesystem supports it, else under a new name with O_EXCL | O_NOFOLLOW, locked (flock) for its lifetime and
    checked to be the regular file just made. Returns (descriptor, name or None)."""
    flags = os.O_RDWR | os.O_CLOEXEC
    try:
        if O_TMPFILE:
            try:
                return os.open(".", flags | O_TMPFILE, 0o600, dir_fd=dir_fd), None
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                    raise
                logger.debug("no O_TMPFILE in %s (%s): the disk cache file gets a name", directory, e.strerror)
        for _ in range(100):
            name = f"{FILE_PREFIX}{os.getpid()}-{secrets.token_hex(6)}{FILE_SUFFIX}"
            try:
                fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
            except FileExistsError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                mine, there = os.fstat(fd), os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if (not stat.S_ISREG(mine.st_mode) or mine.st_nlink != 1 or mine.st_uid != os.geteuid()
                        or (mine.st_dev, mine.st_ino) != (there.st_dev, there.st_ino)):
                    raise PermissionError(errno.EACCES, f"{name} was replaced while it was being created")
            except BaseException:
                os.close(fd)
                raise
            return fd, name
        raise FileExistsError(errno.EEXIST, "no free file name after 100 tries")
    except OSError as e:
        raise type(e)(e.errno, f"cannot create a disk cache file in {directory!r}: {e.strerror}") from e


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reclaim_stale_files(dir_fd: int, directory: str) -> list[str]:
    """Delete the cache files a crashed process left in the directory: ``kvbm-g3-*`` regular files of this user
    whose lock can be taken (a live owner holds it) and whose owner pid, when the name carries one, is not a live
    process. Returns the names removed."""
    removed = []
    for name in os.listdir(dir_fd):
        if not (name.startswith(FILE_PREFIX) and name.endswith(FILE_SUFFIX)):
            continue
        owner = name[len(FILE_PREFIX):].split("-", 1)[0]
        if owner.isdigit() and int(owner) != os.getpid() and _process_alive(int(owner)):
            continue
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            continue  # gone, a symlink, or not ours to open
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its owner is alive
            there = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(name, dir_fd=dir_fd)
                removed.append(name)
                logger.warning("removed stale disk cache file %s of a process that is gone (%d bytes)",
                               os.path.join(directory, name), st.st_size)
        except OSError as e:
            logger.debug("cannot reclaim %s: %s", name, e)
        finally:
            os.close(fd)
    return removed


def _check_count(name: str, value: object) -> int:
    """Return ``value`` as a positive int, or raise TypeError/ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return int(value)


def _run_buffers(mv: memoryview, run: list[tuple[int, int]], slot_bytes: int) -> list[memoryview]:
    """The buffer pieces of a run of (slot, buffer block) pairs: one piece per stretch of adjacent buffer blocks."""
    bufs: list[memoryview] = []
    first = prev = run[0][1]
    for _, b in run[1:]:
        if b != prev + 1:
            bufs.append(mv[first * slot_bytes : (prev + 1) * slot_bytes])
            first = b
        prev = b
    bufs.append(mv[first * slot_bytes : (prev + 1) * slot_bytes])
    return bufs


def _call_hook(hook: SlotHook, run: list[tuple[int, int]], what: str) -> dict[int, OSError] | None:
    """Run a caller's per-request hook; if it raises, every slot of the request fails with the reason."""
    try:
        hook(run)
    except Exception as e:  # noqa: BLE001 - the caller's failure becomes the slots' outcome, not the batch's
        err = OSError(errno.EIO, f"{what} hook failed: {e!r}")
        return {s: err for s, _ in run}
    return None


def _remaining(bufs: list[memoryview], done: int) -> list[memoryview]:
    """Drop the first ``done`` bytes from a list of buffers (to resume a short transfer)."""
    out = []
    for b in bufs:
        if done >= len(b):
            done -= len(b)
            continue
        out.append(b[done:] if done else b)
        done = 0
    return out


def slots_per_request(slot_bytes: int, max_io_bytes: int) -> int:
    """The most slots one request moves: ``max_io_bytes`` of them, within the system's iovec limit, at least one.
    Raises ValueError unless both sizes are at least 1."""
    if slot_bytes < 1 or max_io_bytes < 1:
        raise ValueError(f"slot_bytes and max_io_bytes must be >= 1, got {slot_bytes}, {max_io_bytes}")
    return max(1, min(_IOV_MAX, max_io_bytes // slot_bytes))


def plan_requests(pairs: Iterable[tuple[int, int]], per_request: int) -> list[list[tuple[int, int]]]:
    """(slot, buffer block) pairs as the requests that move them: sorted by slot, runs of consecutive slots joined
    into one request of at most ``per_request`` slots. Raises ValueError for ``per_request`` below 1."""
    if per_request < 1:
        raise ValueError(f"per_request must be >= 1, got {per_request}")
    requests: list[list[tuple[int, int]]] = []
    for s, b in sorted(pairs):
        last = requests[-1] if requests else None
        if last and last[-1][0] == s - 1 and len(last) < per_request:
            last.append((s, b))
        else:
            requests.append([(s, b)])
    return requests


class DiskBlockFile:
    """A preallocated file of ``num_slots`` slots of ``slot_bytes`` (rounded up to 4 KiB) on one disk.

    Args:
        directory: existing, writable directory; the file gets a unique name inside it.
        num_slots: number of block slots.
        slot_bytes: bytes per slot; rounded up to a multiple of 4096, which is then ``self.slot_bytes`` and the
            stride of slots both in the file and in the host buffers passed to read/write.
        use_o_direct: open with O_DIRECT (False mirrors ``DYN_KVBM_DISK_DISABLE_O_DIRECT``). When True, buffers
            must be 4 KiB aligned even if the filesystem refused O_DIRECT and the file fell back to buffered I/O,
            so a caller behaves the same on every filesystem.
        zerofill_fallback: where ``posix_fallocate`` is unsupported, allocate by writing zeros (mirrors
            ``DYN_KVBM_DISK_ZEROFILL_FALLBACK``); otherwise such a filesystem is an error.
        io_threads: threads that issue requests of one batch in parallel (the most requests in flight per batch).
        max_io_bytes: largest single request; longer runs of consecutive slots are split into requests this big
            (several mid-sized requests keep the device's queue full and let per-request hooks overlap the I/O).

        lost: the per-slot flags of slots lost to a truncation (a uint8 array of ``num_slots``, e.g. in memory
            other processes map: `kvbm.kernels.slot_table`); zeroed flags of its own when None.

    Attributes: ``path``, ``num_slots``, ``slot_bytes`` (aligned), ``requested_slot_bytes``, ``file_bytes``,
    ``o_direct`` (whether the file really is open with O_DIRECT), ``preallocated_by`` ("fallocate"/"zerofill"),
    ``read_only`` (an adopted file: see `adopt`).

    Raises FileNotFoundError / NotADirectoryError / PermissionError for a bad directory, OSError(ENOSPC) when the
    file does not fit, OSError(EOPNOTSUPP) when it cannot be preallocated and zero-filling is not allowed.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        num_slots: int,
        slot_bytes: int,
        *,
        use_o_direct: bool = True,
        zerofill_fallback: bool = False,
        io_threads: int = 16,
        max_io_bytes: int = 4 << 20,
        lost: np.ndarray | None = None,
    ) -> None:
        self._setup(num_slots, slot_bytes, use_o_direct, io_threads, max_io_bytes, lost, read_only=False)
        directory = os.fspath(directory)
        if not os.path.exists(directory):
            raise FileNotFoundError(f"disk cache directory {directory!r} does not exist")
        if not os.path.isdir(directory):
            raise NotADirectoryError(f"disk cache path {directory!r} is not a directory")
        self.directory = directory
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fd, name = -1, None
        try:
            _check_directory(dir_fd, directory)
            reclaim_stale_files(dir_fd, directory)
            fd, name = _create(dir_fd, directory)
            #: The file's name in ``directory``, or None for an unnamed (O_TMPFILE) file.
            self.name = name
            self.path = os.path.join(directory, name) if name else f"/proc/self/fd/{fd}"
            self.preallocated_by = self._preallocate(fd, directory, zerofill_fallback)
            self.o_direct = self._set_direct(fd, use_o_direct)
        except BaseException:
            _release(fd, dir_fd, name, True)
            raise
        self._named = name is not None
        self._start(fd, dir_fd, name)
        logger.info(
            "disk block file in %s (%s): %d slots x %d B (%d B), O_DIRECT %s, preallocated by %s",
            directory, name or "unnamed, O_TMPFILE", self.num_slots, self.slot_bytes, self.file_bytes,
            "on" if self.o_direct else "off", self.preallocated_by,
        )

    @classmethod
    def adopt(cls, fd: int, directory: str | os.PathLike, num_slots: int, slot_bytes: int, *,
              use_o_direct: bool = True, io_threads: int = 16, max_io_bytes: int = 4 << 20,
              lost: np.ndarray | None = None) -> "DiskBlockFile":
        """A reader of the file another process created and writes, from ``fd``: a read-only descriptor of it
        (owned from now on: `close` closes it, never removes the file), a regular file of this user holding
        ``num_slots`` slots of ``slot_bytes``; ``directory`` is where the writer made it (for messages). ``lost``:
        the writer's per-slot flags of slots lost to a truncation (this reader only reads them). Raises
        ValueError, closing ``fd``, when the descriptor is not such a file."""
        self = cls.__new__(cls)
        try:
            self._setup(num_slots, slot_bytes, use_o_direct, io_threads, max_io_bytes, lost, read_only=True)
            st = os.fstat(fd)
            access = fcntl.fcntl(fd, fcntl.F_GETFL)
            why = ("not a regular file" if not stat.S_ISREG(st.st_mode) else
                   f"owned by uid {st.st_uid}" if st.st_uid != os.geteuid() else
                   f"{st.st_size} bytes, not {self.file_bytes}" if st.st_size != self.file_bytes else
                   "not opened read-only" if access & os.O_ACCMODE != os.O_RDONLY else None)
            if why is not None:
                raise ValueError(f"the disk cache file handed over is {why}")
        except BaseException:
            os.close(fd)
            raise
        self.directory = os.fspath(directory)
        self.name, self.path = None, f"/proc/self/fd/{fd}"
        self.preallocated_by = "its writer"
        self.o_direct = bool(access & os.O_DIRECT)
        self._named = st.st_nlink > 0  # an unnamed (O_TMPFILE) file has no name to lose
        self._start(fd, -1, None)
        return self

    def _setup(self, num_slots: int, slot_bytes: int, use_o_direct: bool, io_threads: int, max_io_bytes: int,
               lost: np.ndarray | None, read_only: bool) -> None:
        """The sizes and flags both ways of opening a file share (checked)."""
        self.num_slots = _check_count("num_slots", num_slots)
        self.requested_slot_bytes = _check_count("slot_bytes", slot_bytes)
        self.slot_bytes = align_up(self.requested_slot_bytes)
        self._io_threads = _check_count("io_threads", io_threads)
        max_io_bytes = _check_count("max_io_bytes", max_io_bytes)
        self.file_bytes = self.num_slots * self.slot_bytes
        self.read_only = read_only
        self._require_alignment = bool(use_o_direct)
        self._slots_per_request = slots_per_request(self.slot_bytes, max_io_bytes)
        if lost is not None and (lost.dtype != np.uint8 or lost.shape != (self.num_slots,)):
            raise ValueError(f"lost must be a uint8 array of {self.num_slots} flags, got {lost.dtype} {lost.shape}")
        #: 1 = contents lost to a truncation, until rewritten
        self._lost = np.zeros(self.num_slots, dtype=np.uint8) if lost is None else lost
        # A truncation check (file size seen, slots marked lost) is one step against the clearing of slots that a
        # concurrent batch has just rewritten: else a size seen before that batch's writes re-marks them lost.
        self._lost_lock = threading.Lock()
        self._deleted_logged = False

    def _start(self, fd: int, dir_fd: int, name: str | None) -> None:
        """Own the open file (released with `close` or when collected) and start the I/O threads."""
        self._fd = fd
        self._finalizer = weakref.finalize(self, _release, fd, dir_fd, name, True)
        self._pool = ThreadPoolExecutor(max_workers=self._io_threads, thread_name_prefix="kvbm-disk")

    def _preallocate(self, fd: int, directory: str, zerofill_fallback: bool) -> str:
        """Reserve the file's blocks so later writes cannot run out of space; return how it was done."""
        try:
            try:
                os.posix_fallocate(fd, 0, self.file_bytes)
                return "fallocate"
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                if not zerofill_fallback:
                    raise OSError(
                        e.errno,
                        f"posix_fallocate is not supported in {directory!r} ({e.strerror}); set "
                        "DYN_KVBM_DISK_ZEROFILL_FALLBACK=true to preallocate by writing zeros instead",
                    ) from e
            zeros = memoryview(bytes(min(_ZEROFILL_CHUNK, self.file_bytes)))  # allocation only, never data
            offset = 0
            while offset < self.file_bytes:
                offset += os.pwrite(fd, zeros[: self.file_bytes - offset], offset)
            os.fsync(fd)
            return "zerofill"
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            free = shutil.disk_usage(directory).free
            raise OSError(
                errno.ENOSPC, f"disk cache needs {self.file_bytes} bytes in {directory!r} but only {free} are free"
            ) from e

    def _set_direct(self, fd: int, use_o_direct: bool) -> bool:
        """Turn O_DIRECT on for the open descriptor when asked and the filesystem allows it."""
        if not use_o_direct:
            return False
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
            return True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            logger.warning(
                "filesystem of %s refuses O_DIRECT (%s): disk cache falls back to buffered I/O through the "
                "page cache", self.directory, e.strerror,
            )
            return False

    # ---------------------------------------------------------------- public I/O

    def write_slots(
        self, slots: Sequence[int], src: object, buf_blocks: Optional[Sequence[int]] = None, *,
        before_write: SlotHook | None = None,
    ) -> SlotIOResult:
        """Write host buffer blocks into file slots; return the per-slot outcome (never raises for I/O errors).

        ``src`` is any C-contiguous buffer (mmap, bytearray, numpy array) holding blocks of ``self.slot_bytes``;
        ``slots[i]`` receives buffer block ``buf_blocks[i]`` (default ``i``). Slot ids must be distinct.
        ``before_write``, if given, is called on the thread of each request, just before it is issued, with the
        request's (slot, buffer block) pairs (e.g. to checksum them); if it raises, the request's slots fail.
        Raises ValueError on an adopted (read-only) file.
        """
        self._check_writable()
        return self._transfer(slots, src, buf_blocks, reading=False, hook=before_write)

    def read_slots(
        self, slots: Sequence[int], dst: object, buf_blocks: Optional[Sequence[int]] = None, *,
        on_read: SlotHook | None = None,
    ) -> SlotIOResult:
        """Read file slots into host buffer blocks; return the per-slot outcome (never raises for I/O errors).

        ``dst`` is a writable C-contiguous buffer; slot ``slots[i]`` lands in buffer block ``buf_blocks[i]``
        (default ``i``). Slot ids and buffer blocks must each be distinct. A slot that could not be read whole
        (error, or the file ends inside it) is reported failed; its destination bytes are then unspecified.
        ``on_read``, if given, is called on the thread of each request with the (slot, buffer block) pairs it read
        whole (e.g. to verify them while other requests are in flight); if it raises, those slots fail.
        """
        return self._transfer(slots, dst, buf_blocks, reading=True, hook=on_read)

    def _check_writable(self) -> None:
        if self.read_only:
            raise ValueError(f"{self.path!r} is another process's file, adopted to be read only")

    def precheck(self, slots: Sequence[int], reading: bool) -> dict[int, OSError]:
        """For I/O done outside this object (cuFile): the errors `read_slots` / `write_slots` would report before
        moving a byte (the file deleted; slots lost to a truncation, for reads), by slot id."""
        self._check_open()
        try:
            self._check_file()
        except OSError as e:
            return {int(s): e for s in slots}
        if not reading:
            return {}
        return {int(s): OSError(errno.ENODATA, f"slot {s} of {self.path!r} was lost when the file was truncated "
                                "underneath; rewrite it first") for s in slots if self._lost[s]}

    def mark_written(self, slots: Sequence[int]) -> None:
        """For I/O done outside this object (cuFile): ``slots`` were written completely. Raises ValueError on an
        adopted (read-only) file."""
        self._check_writable()
        with self._lost_lock:
            for s in slots:
                self._lost[s] = 0

    # ---------------------------------------------------------------- lifecycle

    def deleted(self) -> bool:
        """Whether the file's name was removed underneath (an unnamed file has none to lose)."""
        return not self.closed and self._named and os.fstat(self._fd).st_nlink == 0

    def fileno(self) -> int:
        """The open descriptor (for fsync or fadvise by a caller)."""
        self._check_open()
        return self._fd

    @property
    def io_threads(self) -> int:
        """The most I/O requests of this file in flight at once (its I/O threads, shared by concurrent batches)."""
        return self._io_threads

    @property
    def full_batch_slots(self) -> int:
        """Consecutive slots a batch needs to keep every I/O thread busy with a full-size request."""
        return self._io_threads * self._slots_per_request

    @property
    def closed(self) -> bool:
        """True after `close`."""
        return not self._finalizer.alive

    def close(self, remove: bool = True) -> None:
        """Wait for in-flight requests, close the file and (by default) delete it. Safe to call twice."""
        if not self._finalizer.alive:
            return
        self._pool.shutdown(wait=True)
        _, dir_fd, name, _ = self._finalizer.detach()[2]
        if not remove and name is None and dir_fd >= 0:  # keep an unnamed file of ours: give it a name
            name = f"{FILE_PREFIX}{os.getpid()}-{secrets.token_hex(6)}{FILE_SUFFIX}"
            try:
                os.link(f"/proc/self/fd/{self._fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
                self.name, self.path = name, os.path.join(self.directory, name)
            except OSError as e:
                logger.warning("cannot keep the unnamed disk cache file in %s: %s", self.directory, e)
        _release(self._fd, dir_fd, name, remove)

    def __enter__(self) -> "DiskBlockFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("O_DIRECT" if self.o_direct else "buffered")
        return f"DiskBlockFile({self.path!r}, num_slots={self.num_slots}, slot_bytes={self.slot_bytes}, {state})"

    # ---------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise ValueError(f"I/O on closed DiskBlockFile {self.path!r}")

    def _byte_view(self, buf: object, writable: bool, nblocks: int) -> memoryview:
        """Validate a host buffer and return it as a flat byte view."""
        role = "dst" if writable else "src"
        try:
            mv = memoryview(buf)
        except TypeError:
            raise TypeError(
                f"{role} must support the buffer protocol (mmap, bytearray, numpy array), got {type(buf).__name__}"
            ) from None
        if not mv.c_contiguous:
            raise ValueError(f"{role} must be C-contiguous")
        mv = mv.cast("B")
        if writable and mv.readonly:
            raise TypeError(f"{role} must be writable, got a read-only {type(buf).__name__}")
        need = nblocks * self.slot_bytes
        if mv.nbytes < need:
            raise ValueError(
                f"{role} holds {mv.nbytes} bytes but {nblocks} blocks of {self.slot_bytes} bytes need {need}"
            )
        if self._require_alignment:
            address = np.frombuffer(mv, dtype=np.uint8).ctypes.data
            if address % ALIGNMENT:
                raise ValueError(
                    f"{role} starts at address {address:#x}, not {ALIGNMENT}-byte aligned as O_DIRECT requires "
                    "(allocate host buffers with mmap)"
                )
        return mv

    def _check_ids(self, slots: Sequence[int], buf_blocks: Optional[Sequence[int]], reading: bool):
        """Validate slot ids and buffer block indices; return them as int lists."""
        try:
            slot_list = [operator.index(s) for s in slots]
        except TypeError:
            raise TypeError(f"slots must be a sequence of ints, got {slots!r}") from None
        for s in slot_list:
            if not 0 <= s < self.num_slots:
                raise ValueError(f"slot id {s} is out of range [0, {self.num_slots})")
        if len(set(slot_list)) != len(slot_list):
            raise ValueError(f"slot ids in one batch must be distinct, got {slot_list}")
        if buf_blocks is None:
            return slot_list, list(range(len(slot_list)))
        try:
            block_list = [operator.index(b) for b in buf_blocks]
        except TypeError:
            raise TypeError(f"buf_blocks must be a sequence of ints, got {buf_blocks!r}") from None
        if len(block_list) != len(slot_list):
            raise ValueError(f"buf_blocks has {len(block_list)} entries but slots has {len(slot_list)}")
        if any(b < 0 for b in block_list):
            raise ValueError(f"buffer block indices must be >= 0, got {block_list}")
        if reading and len(set(block_list)) != len(block_list):
            raise ValueError(f"destination buffer blocks of one read must be distinct, got {block_list}")
        return slot_list, block_list

    def _transfer(
        self, slots: Sequence[int], buf: object, buf_blocks: Optional[Sequence[int]], reading: bool,
        hook: SlotHook | None = None,
    ) -> SlotIOResult:
        """Validate, plan the batch into requests of consecutive slots, run them, collect per-slot errors."""
        self._check_open()
        slot_list, block_list = self._check_ids(slots, buf_blocks, reading)
        result = SlotIOResult(slot_list)
        if not slot_list:
            return result
        mv = self._byte_view(buf, reading, max(block_list) + 1)
        try:
            self._check_file()
        except OSError as e:
            result.errors = {s: e for s in slot_list}
            return result
        if reading:
            for s in slot_list:
                if self._lost[s]:
                    result.errors[s] = OSError(
                        errno.ENODATA,
                        f"slot {s} of {self.path!r} was lost when the file was truncated underneath; rewrite it first",
                    )
        pending = [(s, b) for s, b in zip(slot_list, block_list) if s not in result.errors]
        requests = plan_requests(pending, self._slots_per_request)
        if len(requests) <= 1:
            outcomes = [self._run_request(reading, mv, r, hook) for r in requests]
        else:
            queue = deque(requests)

            def drain() -> list[dict[int, OSError]]:  # one worker: requests of the batch until none is left
                done = []
                while True:
                    try:
                        run = queue.popleft()
                    except IndexError:
                        return done
                    done.append(self._run_request(reading, mv, run, hook))

            workers = [self._pool.submit(drain) for _ in range(min(self._io_threads, len(requests)))]
            outcomes = [errors for w in workers for errors in w.result()]
        for errors in outcomes:
            result.errors.update(errors)
        if not reading:
            with self._lost_lock:
                for s, _ in pending:
                    if s not in result.errors:
                        self._lost[s] = 0
        return result

    def _check_file(self) -> None:
        """Before a batch: fail it if the file was deleted; mark slots lost if it was truncated underneath.

        A slot past a truncation point would otherwise read back as zeros once a later write re-extends the
        file over the hole; it stays lost (reads fail) until it is written again.
        """
        with self._lost_lock:
            st = os.fstat(self._fd)
            if st.st_nlink == 0 and self._named:
                if not self._deleted_logged:
                    self._deleted_logged = True
                    logger.warning("disk cache file %s was deleted: its blocks are lost and every read and write "
                                   "of it fails", self.path)
                raise OSError(errno.ENOENT, f"disk cache file {self.path!r} was deleted")
            # a reader only reads the flags: its reads past the end fail, and the writer marks the lost slots before its
            # writes extend the file again
            if st.st_size < self.file_bytes and not self.read_only:
                first = st.st_size // self.slot_bytes
                if not self._lost[first:].all():
                    logger.warning(
                        "disk cache file %s was truncated to %d bytes underneath: slots %d.. are lost",
                        self.path, st.st_size, first,
                    )
                    self._lost[first:] = 1

    def _run_request(self, reading: bool, mv: memoryview, run: list[tuple[int, int]],
                     hook: SlotHook | None) -> dict[int, OSError]:
        """Move one run of consecutive slots in one call (buffer blocks that are adjacent too become one buffer);
        on failure retry slot by slot to find the bad ones. ``hook`` runs before a write, after a read (on the
        slots read whole)."""
        if hook is not None and not reading:
            failed = _call_hook(hook, run, "before_write")
            if failed is not None:
                return failed
        errors: dict[int, OSError] = {}
        try:
            self._move_all(reading, _run_buffers(mv, run, self.slot_bytes), run[0][0] * self.slot_bytes)
        except OSError as e:
            if len(run) == 1:
                errors = {run[0][0]: e}
            else:
                for s, b in run:
                    try:
                        self._move_all(reading, _run_buffers(mv, [(s, b)], self.slot_bytes), s * self.slot_bytes)
                    except OSError as e1:
                        errors[s] = e1
        if hook is not None and reading:
            done = [(s, b) for s, b in run if s not in errors]
            if done:
                errors.update(_call_hook(hook, done, "on_read") or {})
        return errors

    def _move_all(self, reading: bool, bufs: list[memoryview], offset: int) -> None:
        """Read or write ``bufs`` at ``offset`` completely; raise OSError on an error, end of file or no progress."""
        total = sum(len(b) for b in bufs)
        done = 0
        while done < total:
            if reading:
                n = os.preadv(self._fd, _remaining(bufs, done), offset + done)
                # A regular file reads short only at its end: check instead of retrying at an unaligned offset.
                if done + n < total and os.fstat(self._fd).st_size < offset + total:
                    raise OSError(
                        errno.ENODATA,
                        f"short read: file {self.path!r} ends inside the requested range [{offset}, "
                        f"{offset + total}) (file truncated?)",
                    )
            else:
                n = os.pwritev(self._fd, _remaining(bufs, done), offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"{'read' if reading else 'write'} at byte {offset + done} of "
                              f"{self.path!r} made no progress")
            done += n
