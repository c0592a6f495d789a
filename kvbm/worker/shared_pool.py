"""One host pool for ranks that hold identical KV: MLA's latent cache is the same on every tensor-parallel rank.

The group's writer rank creates the pool as a sealed memfd (`kvbm.worker.replica_group.sealed_memfd`: no name in
/dev/shm or elsewhere, freed with the last process mapping it), maps it, then hands the descriptor to the group's
other ranks (`DescriptorServer`, same user only). A reader checks the pool's size and seals before mapping it.
Each rank registers its own mapping for DMA (`PinnedHostBuffer` with ``shared_fd``).

Who writes what is the caller's rule (`kvbm.connectors.worker`): the writer stores into the pool, every rank loads
from it. A reader that cannot attach (the writer is on another host, the name is taken, the writer failed) keeps
its own pool and stores its own copy, which is always correct, only larger.
"""
from __future__ import annotations

import os
import struct

from kvbm.worker.replica_group import (
    DescriptorServer,
    ReplicaGroup,
    ShareError,
    receive_descriptors,
    sealed_memfd,
    sealed_size_error,
)

__all__ = ["SharedHostPool"]

_TIER = "pool"
_MAGIC = b"kvbm-shared-pool"
_HEADER = struct.Struct("<16sQ")  # magic, pool bytes


class SharedHostPool:
    """The descriptor of a group's pool of ``nbytes``: `create` (writer) or `attach` (reader); `close` it once
    mapped (the writer's stops handing it out)."""

    def __init__(self, fd: int, nbytes: int, group: ReplicaGroup) -> None:
        self.fd, self.nbytes, self.group = fd, nbytes, group
        self._server: DescriptorServer | None = None

    @property
    def served(self) -> int:
        """Readers the pool was handed to."""
        return 0 if self._server is None else self._server.served

    @classmethod
    def create(cls, group: ReplicaGroup, nbytes: int) -> SharedHostPool:
        """A new sealed memfd of ``nbytes`` in whole pages (not yet handed out: see `serve`)."""
        return cls(sealed_memfd(group.name, nbytes), nbytes, group)

    def serve(self) -> None:
        """Hand the pool to the group's readers from a background thread, until all attached or ``timeout_s``
        passed. Raises `ShareError` if the name is taken (the readers then keep their own pools)."""
        self._server = DescriptorServer(self.group, _TIER, _HEADER.pack(_MAGIC, self.nbytes), [self.fd])
        self._server.start()

    @classmethod
    def attach(cls, group: ReplicaGroup, nbytes: int) -> SharedHostPool:
        """Receive the writer's pool of ``nbytes``, checked; raises `ShareError` saying why not."""
        message, (fd,) = receive_descriptors(group, _TIER, _HEADER.size, 1)
        magic, size = _HEADER.unpack(message)
        why = ("bad greeting" if magic != _MAGIC else f"pool of {size} bytes, this rank needs {nbytes}"
               if size != nbytes else sealed_size_error(fd, nbytes))
        if why is not None:
            os.close(fd)
            raise ShareError(f"the writer rank's pool does not fit: {why}")
        return cls(fd, nbytes, group)

    def close(self) -> None:
        """Stop handing the pool out and close this process's descriptor (mappings stay valid); idempotent."""
        if self._server is not None:
            self._server.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
