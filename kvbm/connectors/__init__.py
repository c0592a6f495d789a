"""What every engine connector shares: the scheduler-side request tracking over the leader's index
(`leader.ConnectorLeader`), the worker-side execution of step plans (`worker.ConnectorWorker`), the messages
between them (`messages`), the workers' registration (`registration`), the timing of prefill steps
(`forward_timer` on the workers, `prefill` on the scheduler side) and the process's metrics (`process_metrics`). The
engine packages only adapt calls."""

import os
from collections.abc import Mapping
from typing import Any

from kvbm.config import KvbmConfig

__all__ = ["kvbm_config_from"]


def kvbm_config_from(extra_config: Mapping[str, Any]) -> KvbmConfig:
    """``KvbmConfig`` from the environment, with ``DYN_KVBM_*`` entries of a connector's extra config on top."""
    overrides = {k: str(v) for k, v in extra_config.items() if k.startswith("DYN_KVBM_")}
    return KvbmConfig.from_env({**os.environ, **overrides})
