"""Block manager configuration from the ``DYN_KVBM_*`` environment variables, validated at start-up.

Use: ``cfg = KvbmConfig.from_env()`` (or ``from_env(mapping)`` in tests), then, once the engine's KV layout is
known, ``host_blocks, disk_blocks = cfg.resolve_num_blocks(bytes_per_block)`` and ``cfg.check_fits(bytes_per_block)``
before allocating anything, so a cache that cannot fit fails with a clear message instead of an OOM kill or a
half-written disk. ``host_enabled`` / ``disk_enabled`` / ``disk_only`` say which tiers exist (disk-only mode moves
blocks G1 -> G3 directly). Every error names the variable, the bad value and what is expected.

Cost-aware hits (`kvbm.policies.cost`): a tier's prefix hit is reported only where loading it is expected to be faster
than recomputing it. ``*_LOAD_GB_PER_S`` (load bandwidth, GB/s), ``*_LOAD_LATENCY_MS`` (fixed time per load) and
``PREFILL_TOKENS_PER_S`` (the engine's prefill rate) are the cold-start values, replaced by online estimates once
loads (and, where the connector times them, prefill-dominated forward steps: vLLM) are measured; ``COST_PROBE_SECS``
is how often a tier whose hits are dropped is loaded anyway (one batch) to re-measure it, 0 never;
``DISABLE_COST_AWARE_HITS`` reports every hit. The tiers are G2 (``HOST_*``), G3 (``DISK_*``) and the shared G4
tier (``G4_*``: reads of another instance's G2 found through the directory).

Layer-wise onboarding: a prefix hit held entirely in G2 is loaded while the forward that uses it runs, one group of
layers at a time (1, 2, 4, ... layers, up to ``ONBOARD_LAYERS_PER_GROUP``), each layer's attention waiting only for
its own group; where the cost rule's estimates say the step's forward outlasts the load, groups keep doubling past
that size (`kvbm.worker.layerwise.layer_groups`), unless ``DISABLE_COST_LAYER_GROUPS``;
``DISABLE_LAYERWISE_ONBOARD`` loads every hit before the request is scheduled instead (as hits from G3 always are).
``ONBOARD_LATER_GROUPS_IN_FORWARD`` (off by default) enqueues only the first group before the forward and the others
at its first layer wait, where their host time overlaps a GPU-bound forward's first layer.

Stores: ``LAYERWISE_STORE`` (on by default) starts a step's stores into host memory per group of layers as the
forward saves them (`kvbm.worker.layerwise_stores`); off, they start after the forward. ``MAX_STORE_BACKLOG_MS``
(`kvbm.policies.store_backlog`) bounds the writes queued by stores from the engine into the first tier, at that
tier's measured write rate; blocks beyond it are not stored (0: no bound); blocks the cost rule would not load
back from that tier take one batch, only while nothing is queued.

Disaggregated prefill -> decode (`kvbm.connectors.pd`): ``PD_PIN_TIMEOUT_SECS`` is how long a prefill instance
keeps a finished request's blocks for a decode instance that has not read them, ``PD_LOAD_TIMEOUT_SECS`` how long
a decode instance waits for another instance's blocks (their stores to finish, then each read) before recomputing.

Workers (`kvbm.connectors.registration`): ``LEADER_WORKER_INIT_TIMEOUT_SECS`` is how long the scheduler side waits
for every worker rank to register (vLLM: the start-up handshake or a rank's first report; TensorRT-LLM: the worker's
KV cache registration) before it is an error naming the missing ranks; until then nothing is matched or stored.

Shared G4 tier (`kvbm.connectors.directory`): ``G4_ETCD_ENDPOINT`` (an etcd client URL, empty: off) makes every
instance export its G2, publish the blocks it holds to etcd and load prefix blocks other instances hold;
``G4_LEASE_SECS`` is the etcd lease after which a dead instance's entries vanish.

Sizes: ``*_CACHE_GB`` are in GB of 1e9 bytes (floats allowed); a ``*_OVERRIDE_NUM_BLOCKS`` variable, when set,
wins over the GB size of its tier. An empty variable counts as unset. Unknown ``DYN_KVBM_*`` names are logged as
a warning (a typo must not silently drop a setting), not rejected, since other KVBM deployments set variables this
implementation has no use for.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

__all__ = ["KvbmConfig", "KvbmConfigError", "available_host_memory", "metrics_host_from_env", "GB", "MAX_GB",
           "DISK_IO_CHOICES"]

log = logging.getLogger(__name__)

GB = 10**9
#: Largest accepted ``*_CACHE_GB`` (an exabyte): larger values are typos, and 1e300 GB would overflow the block count.
MAX_GB = 1e9

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class KvbmConfigError(ValueError):
    """A DYN_KVBM_* setting is malformed, out of range, or does not fit this machine."""


def _env_name(field_name: str) -> str:
    return "DYN_KVBM_" + field_name.upper()


def _bad(field_name: str, value: object, expected: str) -> KvbmConfigError:
    return KvbmConfigError(f"{_env_name(field_name)}={value!r} is invalid: expected {expected}")


def _parse_bool(name: str, text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise _bad(name, text, "a boolean: one of true/false, 1/0, yes/no, on/off")


def _parse_int(name: str, text: str) -> int:
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise _bad(name, text, "an integer") from None


def _parse_float(name: str, text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise _bad(name, text, "a number of GB (1 GB = 1e9 bytes), e.g. 4 or 0.5") from None


def _parse_number(name: str, text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise _bad(name, text, _FLOAT_RANGES[name][3]) from None


def _parse_path(name: str, text: str) -> Path:
    return Path(text.strip())


@dataclass(frozen=True)
class KvbmConfig:
    """Validated block manager settings; one field per ``DYN_KVBM_<FIELD NAME IN CAPITALS>`` variable."""

    cpu_cache_gb: float | None = None
    disk_cache_gb: float | None = None
    cpu_cache_override_num_blocks: int | None = None
    disk_cache_override_num_blocks: int | None = None
    disk_cache_dir: Path = field(default_factory=lambda: Path("/tmp"))
    disable_disk_offload_filter: bool = False
    disk_zerofill_fallback: bool = False
    disk_disable_o_direct: bool = False
    disk_io: str = "auto"
    metrics: bool = False
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 6880
    leader_worker_init_timeout_secs: int = 1800
    max_transfer_batch_size: int = 16
    max_concurrent_transfers: int = 4
    host_offload_prefix_min_priority: int = 0
    disable_cost_aware_hits: bool = False
    host_load_gb_per_s: float = 20.0
    disk_load_gb_per_s: float = 1.5
    host_load_latency_ms: float = 0.05
    disk_load_latency_ms: float = 0.2
    g4_load_gb_per_s: float = 2.5
    g4_load_latency_ms: float = 1.5
    prefill_tokens_per_s: float = 10_000.0
    cost_probe_secs: float = 60.0
    max_store_backlog_ms: float = 100.0
    disable_layerwise_onboard: bool = False
    disable_cost_layer_groups: bool = False
    layerwise_store: bool = True
    onboard_layers_per_group: int = 4
    onboard_later_groups_in_forward: bool = False
    pd_pin_timeout_secs: float = 120.0
    pd_load_timeout_secs: float = 30.0
    g4_etcd_endpoint: str = ""
    g4_lease_secs: float = 10.0

    def __post_init__(self) -> None:
        """Check types and ranges, so a config built directly is held to the same rules as one from the env."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "disk_io":
                if value not in DISK_IO_CHOICES:
                    raise _bad(f.name, value, f"one of {', '.join(DISK_IO_CHOICES)}")
            elif f.name == "metrics_host":
                if not _valid_host(value):
                    raise _bad(f.name, value, _HOST_EXPECTED)
            elif f.name == "g4_etcd_endpoint":
                if not isinstance(value, str) or (value and not re.fullmatch(r"https?://[^/\s]+/?", value)):
                    raise _bad(f.name, value, "empty (off) or an etcd client URL such as http://127.0.0.1:2379")
            elif f.name == "disk_cache_dir":
                if not isinstance(value, (str, os.PathLike)) or not str(value):
                    raise _bad(f.name, value, "a directory path")
                object.__setattr__(self, f.name, Path(value))
            elif f.name in _BOOL_FIELDS:
                if not isinstance(value, bool):
                    raise _bad(f.name, value, "a boolean")
            elif f.name in _FLOAT_RANGES:
                lo, hi, lo_open, what = _FLOAT_RANGES[f.name]
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise _bad(f.name, value, what)
                if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
                    raise _bad(f.name, value, what)
                object.__setattr__(self, f.name, float(value))
            elif f.name.endswith("_gb"):
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise _bad(f.name, value, "a number of GB")
                if not math.isfinite(value) or not 0 <= value <= MAX_GB:
                    raise _bad(f.name, value, f"a finite, non-negative number of GB, at most {MAX_GB:g}")
                object.__setattr__(self, f.name, float(value))
            else:
                if value is None and f.name.endswith("_num_blocks"):
                    continue
                lo, hi, what = _INT_RANGES[f.name]
                if isinstance(value, bool) or not isinstance(value, int):
                    raise _bad(f.name, value, f"an integer ({what})")
                if value < lo or (hi is not None and value > hi):
                    raise _bad(f.name, value, what)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KvbmConfig:
        """Read and validate every applicable ``DYN_KVBM_*`` variable from ``env`` (default: ``os.environ``)."""
        env = os.environ if env is None else env
        known = {_env_name(f.name): f.name for f in dataclasses.fields(cls)}
        for key in sorted(env):
            if key.startswith("DYN_KVBM_") and key not in known:
                log.warning("%s is set but not used by kvbm; check the name for a typo", key)
        kwargs: dict[str, object] = {}
        for env_key, name in known.items():
            raw = env.get(env_key)
            if raw is None or not raw.strip():
                continue
            kwargs[name] = _PARSERS[name](name, raw)
        return cls(**kwargs)

    @property
    def host_enabled(self) -> bool:
        """True when a G2 host pool is configured (a positive override, or else a positive GB size)."""
        return _tier_configured(self.cpu_cache_override_num_blocks, self.cpu_cache_gb)

    @property
    def disk_enabled(self) -> bool:
        """True when a G3 disk pool is configured (a positive override, or else a positive GB size)."""
        return _tier_configured(self.disk_cache_override_num_blocks, self.disk_cache_gb)

    @property
    def disk_only(self) -> bool:
        """True when the disk tier is set and the host tier is not: blocks then go G1 -> G3 directly."""
        return self.disk_enabled and not self.host_enabled

    def resolve_num_blocks(self, bytes_per_block: int, *, disk_bytes_per_block: int | None = None) -> tuple[int, int]:
        """Number of blocks of the host and disk pools: the override when set, else floor(GB * 1e9 / block bytes).

        ``disk_bytes_per_block`` is the size of one block's slot on disk when it differs (e.g. padded to the 4 KiB
        alignment O_DIRECT needs); it defaults to ``bytes_per_block``. A tier that is not configured has 0 blocks;
        a GB size too small to hold a single block is an error, not a silently disabled tier.
        """
        host_bpb = _check_block_bytes("bytes_per_block", bytes_per_block)
        disk_bpb = host_bpb if disk_bytes_per_block is None else _check_block_bytes(
            "disk_bytes_per_block", disk_bytes_per_block
        )
        host = _tier_blocks("cpu_cache", self.cpu_cache_override_num_blocks, self.cpu_cache_gb, host_bpb)
        disk = _tier_blocks("disk_cache", self.disk_cache_override_num_blocks, self.disk_cache_gb, disk_bpb)
        return host, disk

    def bounce_chunks(self) -> int:
        """Chunks of the pinned bounce buffer that disk I/O goes through, one batch each: one per transfer in
        flight, plus one for the G2 -> G3 cascade."""
        return self.max_concurrent_transfers + 1

    def bounce_blocks(self) -> int:
        """Blocks of the pinned bounce buffer (``bounce_chunks`` x ``max_transfer_batch_size``)."""
        return self.bounce_chunks() * self.max_transfer_batch_size

    def check_fits(self, bytes_per_block: int, *, disk_bytes_per_block: int | None = None) -> None:
        """Raise KvbmConfigError if the host pool (with the disk tier's pinned bounce buffer) exceeds available
        memory, or the disk pool's directory is missing, not writable, or lacks the free space for the disk pool."""
        host, disk = self.resolve_num_blocks(bytes_per_block, disk_bytes_per_block=disk_bytes_per_block)
        disk_bpb = bytes_per_block if disk_bytes_per_block is None else disk_bytes_per_block
        bounce = self.bounce_blocks() * disk_bpb if disk else 0
        if host or bounce:
            need = host * bytes_per_block + bounce
            avail = available_host_memory()
            if need > avail:
                what = (f"{_size_source(self, 'cpu_cache')} gives {host} blocks of {bytes_per_block} bytes"
                        if host else "no host cache")
                raise KvbmConfigError(
                    f"host cache does not fit in memory: {what}, plus {bounce / GB:.3f} GB of pinned disk bounce "
                    f"buffer ((DYN_KVBM_MAX_CONCURRENT_TRANSFERS + 1) x DYN_KVBM_MAX_TRANSFER_BATCH_SIZE blocks) = "
                    f"{need / GB:.3f} GB, but only {avail / GB:.3f} GB of memory is available (MemAvailable, capped "
                    "by the cgroup limit); lower DYN_KVBM_CPU_CACHE_GB"
                )
        if disk:
            directory = self.disk_cache_dir
            if not directory.is_dir():
                raise KvbmConfigError(
                    f"DYN_KVBM_DISK_CACHE_DIR={str(directory)!r} is not an existing directory; create it first"
                )
            try:
                with tempfile.TemporaryFile(dir=directory, prefix=".kvbm-write-probe-"):
                    pass
            except OSError as exc:
                raise KvbmConfigError(
                    f"DYN_KVBM_DISK_CACHE_DIR={str(directory)!r} is not writable: {exc.strerror or exc}"
                ) from exc
            need = disk * disk_bpb
            free = shutil.disk_usage(directory).free
            if need > free:
                raise KvbmConfigError(
                    f"disk cache does not fit on disk: {_size_source(self, 'disk_cache')} gives {disk} blocks of "
                    f"{disk_bpb} bytes = {need / GB:.3f} GB, but {str(directory)!r} has only {free / GB:.3f} GB "
                    "free; lower DYN_KVBM_DISK_CACHE_GB or point DYN_KVBM_DISK_CACHE_DIR elsewhere"
                )


#: G3 I/O path: "auto" (GPUDirect Storage where the cuFile probe allows it, else POSIX), "gds" (cuFile, failing
#: start-up where it cannot run), "posix" (O_DIRECT through pinned bounce buffers).
DISK_IO_CHOICES = ("auto", "gds", "posix")


def _parse_choice(name: str, text: str) -> str:
    value = text.strip().lower()
    if value not in DISK_IO_CHOICES:
        raise _bad(name, text, f"one of {', '.join(DISK_IO_CHOICES)}")
    return value


_BOOL_FIELDS = frozenset(
    {"disable_disk_offload_filter", "disk_zerofill_fallback", "disk_disable_o_direct", "metrics",
     "disable_cost_aware_hits", "disable_layerwise_onboard", "disable_cost_layer_groups", "layerwise_store",
     "onboard_later_groups_in_forward"}
)

# Cold-start values of the cost-aware hit rule (`kvbm.policies.cost`), chosen for an 8B model (Llama-3-8B:
# 128 KiB of KV per token, 2 MiB per 16-token block) on one H100/H200:
# - G2 20 GB/s: the PCIe ceiling measured H2D on H200 is ~55 GB/s for large copies; a block is many per-layer
#   chunks, so a load reaches well under it. Even at 20 GB/s a G2 block loads ~15x faster than it recomputes.
# - G3 1.5 GB/s: just under the 1.6-2.3 GB/s measured from disk on H200 through the bounce path.
# - prefill 10k tokens/s: the low end for an 8B model at long prompts (~16 GFLOP per token plus attention).
#   Erring low makes recompute look slow, so before any measurement hits are reported as they are without the
#   rule; measured loads then correct the estimate. With these values G3 breaks even at 1.31 GB/s for 8B.
# - latency 0.05 ms (a host copy's launch and sync) and 0.2 ms (an NVMe read through the disk threads) per load.
# - G4 2.5 GB/s + 1.5 ms: another instance's G2 read over NIXL/UCX with the seal checks, measured on H100
#   (bench/results/remote_h100: 16 blocks of 2 MiB in 14.7 ms, 256 in 213.5 ms, a fit of 0.83 ms per block and
#   1.5 ms per load; both instances on one machine: between hosts the network sets the rate).
# field -> (minimum, maximum, minimum excluded, what is expected)
_FLOAT_RANGES: dict[str, tuple[float, float, bool, str]] = {
    "host_load_gb_per_s": (0.0, 1e4, True, "a positive, finite load bandwidth in GB/s (1e9 bytes/s), at most 1e4"),
    "disk_load_gb_per_s": (0.0, 1e4, True, "a positive, finite load bandwidth in GB/s (1e9 bytes/s), at most 1e4"),
    "host_load_latency_ms": (0.0, 1e6, False, "a non-negative, finite latency per load in milliseconds, at most 1e6"),
    "disk_load_latency_ms": (0.0, 1e6, False, "a non-negative, finite latency per load in milliseconds, at most 1e6"),
    "g4_load_gb_per_s": (0.0, 1e4, True, "a positive, finite load bandwidth in GB/s (1e9 bytes/s), at most 1e4"),
    "g4_load_latency_ms": (0.0, 1e6, False, "a non-negative, finite latency per load in milliseconds, at most 1e6"),
    "prefill_tokens_per_s": (0.0, 1e9, True, "a positive, finite prefill rate in tokens per second, at most 1e9"),
    "cost_probe_secs": (0.0, 1e9, False, "a non-negative, finite number of seconds (0: never probe), at most 1e9"),
    "max_store_backlog_ms": (0.0, 1e9, False, "a non-negative, finite number of milliseconds (0: no limit), at most "
                             "1e9"),
    "pd_pin_timeout_secs": (0.0, 1e6, True, "a positive, finite number of seconds, at most 1e6"),
    "pd_load_timeout_secs": (0.0, 1e6, True, "a positive, finite number of seconds, at most 1e6"),
    "g4_lease_secs": (1.0, 1e6, False, "a finite number of seconds in 1..1e6"),
}

_INT63, _INT31 = 2**63 - 1, 2**31 - 1

# field -> (minimum, maximum or None, what is expected)
_INT_RANGES: dict[str, tuple[int, int | None, str]] = {
    "cpu_cache_override_num_blocks": (0, _INT63, "a non-negative number of blocks, at most 2**63-1"),
    "disk_cache_override_num_blocks": (0, _INT63, "a non-negative number of blocks, at most 2**63-1"),
    "metrics_port": (1, 65535, "a TCP port in 1..65535"),
    "leader_worker_init_timeout_secs": (1, 10**9, "a positive number of seconds, at most 1e9"),
    "max_transfer_batch_size": (1, _INT31, "a positive number of blocks per batch, at most 2**31-1"),
    "max_concurrent_transfers": (1, _INT31, "a positive number of transfers, at most 2**31-1"),
    "host_offload_prefix_min_priority": (0, 100, "a priority in 0..100"),
    "onboard_layers_per_group": (1, _INT31, "a positive number of layers per layer-wise onboard step"),
}

_PARSERS: dict[str, Callable[[str, str], object]] = {
    "cpu_cache_gb": _parse_float,
    "disk_cache_gb": _parse_float,
    "disk_cache_dir": _parse_path,
    "disk_io": _parse_choice,
    "metrics_host": lambda name, text: text.strip(),
    "g4_etcd_endpoint": lambda name, text: text.strip(),
    **{name: _parse_bool for name in _BOOL_FIELDS},
    **{name: _parse_int for name in _INT_RANGES},
    **{name: _parse_number for name in _FLOAT_RANGES},
}


_HOST_EXPECTED = ("an IP address or host name to serve metrics on: 127.0.0.1 (this machine only), or 0.0.0.0 or the "
                  "pod IP for a Prometheus server elsewhere")
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _valid_host(value: object) -> bool:
    if not isinstance(value, str) or not value or len(value) > 253:
        return False
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return _HOSTNAME.fullmatch(value) is not None


def metrics_host_from_env(env: Mapping[str, str] | None = None) -> str:
    """``DYN_KVBM_METRICS_HOST`` validated, or the default 127.0.0.1 when unset or empty."""
    env = os.environ if env is None else env
    raw = env.get(_env_name("metrics_host"), "").strip()
    if not raw:
        return KvbmConfig.metrics_host
    if not _valid_host(raw):
        raise _bad("metrics_host", raw, _HOST_EXPECTED)
    return raw


def _tier_configured(override: int | None, gb: float | None) -> bool:
    if override is not None:
        return override > 0
    return gb is not None and gb > 0


def _check_block_bytes(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive integer number of bytes, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer number of bytes, got {value}")
    return value


def _tier_blocks(prefix: str, override: int | None, gb: float | None, bpb: int) -> int:
    if override is not None:
        return override
    if not gb:
        return 0
    blocks = round(gb * GB) // bpb
    if blocks == 0:
        raise KvbmConfigError(
            f"{_env_name(prefix + '_gb')}={gb!r} is too small: it does not hold a single block of {bpb} bytes "
            f"(expected at least {bpb / GB:.9g} GB, or 0 to disable the tier)"
        )
    return blocks


def _size_source(cfg: KvbmConfig, prefix: str) -> str:
    override = getattr(cfg, prefix + "_override_num_blocks")
    if override is not None:
        return f"{_env_name(prefix + '_override_num_blocks')}={override}"
    return f"{_env_name(prefix + '_gb')}={getattr(cfg, prefix + '_gb')!r}"


def _read_int_file(path: str) -> int | None:
    """An integer from a one-line kernel file, or None when absent or 'max' (no limit)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_headroom() -> int | None:
    """Bytes the process's memory cgroup may still grow by (v2, then v1), or None when unlimited or unknown."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit = _read_int_file(limit_file)
        usage = _read_int_file(usage_file)
        # cgroup v1 writes "no limit" as a number near 2**63.
        if limit is not None and usage is not None and limit < 2**60:
            return max(0, limit - usage)
    return None


def available_host_memory() -> int:
    """Bytes of memory available for new allocations: MemAvailable of /proc/meminfo (else free pages from
    sysconf), capped by the headroom of the memory cgroup (containers see the host's MemAvailable)."""
    avail: int | None = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
                    break
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    headroom = _cgroup_headroom()
    return avail if headroom is None else min(avail, headroom)
