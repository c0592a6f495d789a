"""kvbm: keeps the KV blocks an LLM engine computes (GPU -> pinned host -> disk) and brings them back on a prefix hit.

Layers, imports pointing downward only: connectors (`vllm_integration`, `trtllm_integration`) -> leader (`leader`,
`policies`: index and plans, no tensors) and worker (`worker`: the tiers' memory, executing plans) -> the transfer
library (`kvbm.kernels`: mediums, paths, kernels) -> layouts (`kvbm.layouts`). `kvbm.manager.BlockManager` joins a
leader and a worker in one process. Importing `kvbm` alone loads none of them.
"""

__version__ = "0.1.0"
