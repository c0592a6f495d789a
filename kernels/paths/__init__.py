"""The built-in transfer paths, one module per medium pair; importing this package registers them.

| source -> destination | module | how |
|---|---|---|
| GPU <-> host, GPU -> GPU | `gpu_host` | staged gather/scatter + DMA, whole-block DMA, or zero-copy (`TransferEngine`) |
| host -> host | `host_host` | `copy_blocks` (numba on the CPU), synchronous |
| host <-> disk | `host_disk` | O_DIRECT reads and writes on the disk threads |
| GPU <-> disk | `gpu_disk` | cuFile (GPUDirect Storage), or a pinned bounce buffer and the host <-> disk path |
| remote -> host, remote -> GPU | `remote` | NIXL READ (UCX) into pinned landing chunks, xxh3-checked, then on |
"""
from . import gpu_disk, gpu_host, host_disk, host_host, remote  # noqa: F401  (each registers its paths)
