"""DYN_KVBM_* parsing, validation and the fit checks of KvbmConfig."""
from __future__ import annotations

import errno
import logging
import os
import random
import tempfile
from pathlib import Path

import pytest

from kvbm.config import KvbmConfig, KvbmConfigError, available_host_memory


def test_defaults_from_empty_env() -> None:
    cfg = KvbmConfig.from_env({})
    assert cfg == KvbmConfig()
    assert cfg.cpu_cache_gb is None and cfg.disk_cache_gb is None
    assert cfg.disk_cache_dir == Path("/tmp")
    assert (cfg.metrics, cfg.metrics_port) == (False, 6880)
    assert cfg.leader_worker_init_timeout_secs == 1800
    assert (cfg.max_transfer_batch_size, cfg.max_concurrent_transfers) == (16, 4)
    assert cfg.host_offload_prefix_min_priority == 0
    assert not (cfg.disable_disk_offload_filter or cfg.disk_zerofill_fallback or cfg.disk_disable_o_direct)
    assert not cfg.host_enabled and not cfg.disk_enabled and not cfg.disk_only


def test_every_variable_parsed(tmp_path: Path) -> None:
    env = {
        "DYN_KVBM_CPU_CACHE_GB": "4.5",
        "DYN_KVBM_DISK_CACHE_GB": " 100 ",
        "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "1000",
        "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "2000",
        "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path),
        "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true",
        "DYN_KVBM_DISK_ZEROFILL_FALLBACK": "1",
        "DYN_KVBM_DISK_DISABLE_O_DIRECT": "YES",
        "DYN_KVBM_METRICS": "True",
        "DYN_KVBM_METRICS_PORT": "9100",
        "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "60",
        "DYN_KVBM_MAX_TRANSFER_BATCH_SIZE": "32",
        "DYN_KVBM_MAX_CONCURRENT_TRANSFERS": "8",
        "DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY": "35",
        "PATH": "/usr/bin",  # unrelated variables are ignored
    }
    cfg = KvbmConfig.from_env(env)
    assert cfg == KvbmConfig(
        cpu_cache_gb=4.5, disk_cache_gb=100.0, cpu_cache_override_num_blocks=1000,
        disk_cache_override_num_blocks=2000, disk_cache_dir=tmp_path, disable_disk_offload_filter=True,
        disk_zerofill_fallback=True, disk_disable_o_direct=True, metrics=True, metrics_port=9100,
        leader_worker_init_timeout_secs=60, max_transfer_batch_size=32, max_concurrent_transfers=8,
        host_offload_prefix_min_priority=35,
    )
    assert isinstance(cfg.disk_cache_dir, Path)


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("1", True), ("ON", True), ("yes", True),
    ("false", False), ("0", False), ("Off", False), ("no", False),
])
def test_booleans(text: str, expected: bool) -> None:
    assert KvbmConfig.from_env({"DYN_KVBM_METRICS": text}).metrics is expected


def test_empty_value_counts_as_unset() -> None:
    cfg = KvbmConfig.from_env({"DYN_KVBM_CPU_CACHE_GB": "", "DYN_KVBM_METRICS_PORT": "  "})
    assert cfg.cpu_cache_gb is None and cfg.metrics_port == 6880


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_MAX_CONCURRENT_TRANSFERS", "3")
    assert KvbmConfig.from_env().max_concurrent_transfers == 3


@pytest.mark.parametrize("key, value, match", [
    ("DYN_KVBM_CPU_CACHE_GB", "-1", r"DYN_KVBM_CPU_CACHE_GB=-1.0 is invalid: expected a finite, non-negative"),
    ("DYN_KVBM_CPU_CACHE_GB", "four", r"DYN_KVBM_CPU_CACHE_GB='four' is invalid: expected a number of GB"),
    ("DYN_KVBM_DISK_CACHE_GB", "nan", r"DYN_KVBM_DISK_CACHE_GB=nan is invalid: expected a finite"),
    ("DYN_KVBM_DISK_CACHE_GB", "inf", r"DYN_KVBM_DISK_CACHE_GB=inf is invalid"),
    ("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "-5", r"OVERRIDE_NUM_BLOCKS=-5 is invalid: expected a non-negative"),
    ("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", "1.5", r"OVERRIDE_NUM_BLOCKS='1.5' is invalid: expected an integer"),
    ("DYN_KVBM_METRICS", "maybe", r"DYN_KVBM_METRICS='maybe' is invalid: expected a boolean: one of true/false"),
    ("DYN_KVBM_DISK_DISABLE_O_DIRECT", "2", r"DYN_KVBM_DISK_DISABLE_O_DIRECT='2' is invalid: expected a boolean"),
    ("DYN_KVBM_METRICS_PORT", "70000", r"DYN_KVBM_METRICS_PORT=70000 is invalid: expected a TCP port in 1..65535"),
    ("DYN_KVBM_METRICS_PORT", "0", r"DYN_KVBM_METRICS_PORT=0 is invalid: expected a TCP port"),
    ("DYN_KVBM_METRICS_PORT", "http", r"DYN_KVBM_METRICS_PORT='http' is invalid: expected an integer"),
    ("DYN_KVBM_MAX_TRANSFER_BATCH_SIZE", "0", r"DYN_KVBM_MAX_TRANSFER_BATCH_SIZE=0 is invalid: expected a positive"),
    ("DYN_KVBM_MAX_CONCURRENT_TRANSFERS", "-2", r"DYN_KVBM_MAX_CONCURRENT_TRANSFERS=-2 is invalid: expected a positive"),
    ("DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS", "0", r"TIMEOUT_SECS=0 is invalid: expected a positive number of seconds"),
    ("DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY", "101", r"MIN_PRIORITY=101 is invalid: expected a priority in 0..100"),
])
def test_bad_values_name_variable_value_and_expectation(key: str, value: str, match: str) -> None:
    with pytest.raises(KvbmConfigError, match=match):
        KvbmConfig.from_env({key: value})


def test_direct_construction_is_validated() -> None:
    with pytest.raises(KvbmConfigError, match=r"DYN_KVBM_MAX_TRANSFER_BATCH_SIZE=0"):
        KvbmConfig(max_transfer_batch_size=0)
    with pytest.raises(KvbmConfigError, match=r"DYN_KVBM_METRICS=1 is invalid: expected a boolean"):
        KvbmConfig(metrics=1)  # type: ignore[arg-type]
    with pytest.raises(KvbmConfigError, match=r"DYN_KVBM_METRICS_PORT=True is invalid: expected an integer"):
        KvbmConfig(metrics_port=True)
    with pytest.raises(KvbmConfigError, match=r"DYN_KVBM_DISK_CACHE_DIR=''"):
        KvbmConfig(disk_cache_dir="")
    assert KvbmConfig(disk_cache_dir="/var/tmp").disk_cache_dir == Path("/var/tmp")


def test_unknown_variable_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kvbm.config"):
        cfg = KvbmConfig.from_env({"DYN_KVBM_CPU_CACHE_GBS": "4"})
    assert cfg.cpu_cache_gb is None
    assert "DYN_KVBM_CPU_CACHE_GBS is set but not used" in caplog.text


def test_tier_modes() -> None:
    assert KvbmConfig(cpu_cache_gb=1).host_enabled
    assert not KvbmConfig(cpu_cache_gb=0).host_enabled
    both = KvbmConfig(cpu_cache_gb=1, disk_cache_gb=2)
    assert both.disk_enabled and not both.disk_only
    disk_only = KvbmConfig(disk_cache_gb=2)
    assert disk_only.disk_only and not disk_only.host_enabled
    assert KvbmConfig(disk_cache_override_num_blocks=10).disk_only
    # An override of 0 disables the tier even when a GB size is set.
    assert not KvbmConfig(cpu_cache_gb=4, cpu_cache_override_num_blocks=0).host_enabled


def test_resolve_num_blocks_gb_and_override() -> None:
    rng = random.Random(5)
    for _ in range(50):
        bpb = rng.randrange(1, 10**7)
        gb = round(rng.uniform(0.01, 50), 3)
        host, disk = KvbmConfig(cpu_cache_gb=gb, disk_cache_gb=2 * gb).resolve_num_blocks(bpb)
        assert host == round(gb * 1e9) // bpb
        assert disk == round(2 * gb * 1e9) // bpb
    cfg = KvbmConfig(cpu_cache_gb=1.0, disk_cache_gb=10.0, cpu_cache_override_num_blocks=7)
    assert cfg.resolve_num_blocks(1_000_000) == (7, 10_000)
    # GB are 1e9 bytes, not GiB.
    assert KvbmConfig(cpu_cache_gb=1).resolve_num_blocks(1000) == (1_000_000, 0)
    # The disk may use padded slots.
    assert KvbmConfig(disk_cache_gb=1).resolve_num_blocks(3000, disk_bytes_per_block=4096) == (0, 10**9 // 4096)


def test_resolve_num_blocks_errors() -> None:
    with pytest.raises(KvbmConfigError, match=r"DYN_KVBM_CPU_CACHE_GB=1e-06 is too small: .* single block of 2000000"):
        KvbmConfig(cpu_cache_gb=1e-6).resolve_num_blocks(2_000_000)
    with pytest.raises(ValueError, match="bytes_per_block must be a positive integer number of bytes, got 0"):
        KvbmConfig().resolve_num_blocks(0)
    with pytest.raises(TypeError, match="bytes_per_block must be a positive integer"):
        KvbmConfig().resolve_num_blocks(4096.0)  # type: ignore[arg-type]


def test_available_host_memory_is_plausible() -> None:
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    avail = available_host_memory()
    assert 0 < avail <= total


def test_check_fits_passes_for_small_caches(tmp_path: Path) -> None:
    KvbmConfig(cpu_cache_override_num_blocks=4, disk_cache_override_num_blocks=4,
               disk_cache_dir=tmp_path).check_fits(4096)
    assert list(tmp_path.iterdir()) == []  # the write probe leaves nothing behind


def test_check_fits_host_too_large() -> None:
    cfg = KvbmConfig(cpu_cache_gb=10**7)  # 10 PB
    with pytest.raises(KvbmConfigError, match=r"host cache does not fit in memory: DYN_KVBM_CPU_CACHE_GB=10000000.0 "
                                              r"gives .* GB of memory is available"):
        cfg.check_fits(10**6)


def test_check_fits_counts_the_disk_bounce_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kvbm.config as config_module

    cfg = KvbmConfig(cpu_cache_override_num_blocks=10, disk_cache_override_num_blocks=4, disk_cache_dir=tmp_path,
                     max_transfer_batch_size=8, max_concurrent_transfers=3)
    assert cfg.bounce_chunks() == 4 and cfg.bounce_blocks() == 32
    monkeypatch.setattr(config_module, "available_host_memory", lambda: (10 + 32) * 4096)
    cfg.check_fits(4096)  # G2 and the bounce buffer fit exactly
    monkeypatch.setattr(config_module, "available_host_memory", lambda: (10 + 32) * 4096 - 1)
    with pytest.raises(KvbmConfigError, match=r"plus 0.000 GB of pinned disk bounce buffer"):
        cfg.check_fits(4096)
    disk_only = KvbmConfig(disk_cache_override_num_blocks=4, disk_cache_dir=tmp_path)
    monkeypatch.setattr(config_module, "available_host_memory", lambda: 4096)
    with pytest.raises(KvbmConfigError, match=r"no host cache, plus"):
        disk_only.check_fits(4096)


def test_check_fits_disk_too_large(tmp_path: Path) -> None:
    cfg = KvbmConfig(disk_cache_override_num_blocks=10**12, disk_cache_dir=tmp_path)
    with pytest.raises(KvbmConfigError, match=r"disk cache does not fit on disk: "
                                              r"DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS=1000000000000 gives"):
        cfg.check_fits(10**6)


def test_check_fits_missing_directory(tmp_path: Path) -> None:
    cfg = KvbmConfig(disk_cache_gb=0.001, disk_cache_dir=tmp_path / "nope")
    with pytest.raises(KvbmConfigError, match=r"DYN_KVBM_DISK_CACHE_DIR='.*nope' is not an existing directory"):
        cfg.check_fits(4096)


def test_check_fits_unwritable_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o500)
    if os.geteuid() == 0:
        # root writes through permission bits; make the probe meet what a read-only mount would answer.
        def read_only(*args: object, **kwargs: object) -> None:
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    cfg = KvbmConfig(disk_cache_override_num_blocks=1, disk_cache_dir=target)
    try:
        with pytest.raises(KvbmConfigError, match=r"DYN_KVBM_DISK_CACHE_DIR='.*ro' is not writable: "):
            cfg.check_fits(4096)
    finally:
        target.chmod(0o700)


@pytest.mark.parametrize("key, value, match", [
    ("DYN_KVBM_CPU_CACHE_GB", "1e300", r"DYN_KVBM_CPU_CACHE_GB=1e\+300 is invalid: expected a finite, non-negative "
                                       r"number of GB, at most 1e\+09"),
    ("DYN_KVBM_DISK_CACHE_GB", "2e9", r"DYN_KVBM_DISK_CACHE_GB=2000000000.0 is invalid"),
    ("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", str(2**64), r"OVERRIDE_NUM_BLOCKS=18446744073709551616 is invalid: "
                                                          r"expected a non-negative number of blocks, at most"),
    ("DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS", "1" + "0" * 30, r"TIMEOUT_SECS=10+ is invalid: expected a positive"),
    ("DYN_KVBM_MAX_TRANSFER_BATCH_SIZE", str(2**40), r"BATCH_SIZE=1099511627776 is invalid"),
    ("DYN_KVBM_METRICS_HOST", "not a host", r"DYN_KVBM_METRICS_HOST='not a host' is invalid: expected an IP address"),
    ("DYN_KVBM_METRICS_HOST", "-bad-.example", r"DYN_KVBM_METRICS_HOST='-bad-.example' is invalid"),
])
def test_huge_or_malformed_values_are_config_errors(key: str, value: str, match: str) -> None:
    with pytest.raises(KvbmConfigError, match=match):
        KvbmConfig.from_env({key: value})


@pytest.mark.parametrize("seed", range(3))
def test_any_value_is_accepted_or_a_config_error(seed: int) -> None:
    """Random text in every variable: from_env, resolve_num_blocks and check_fits raise nothing but KvbmConfigError,
    and every error names the variable it is about."""
    rng = random.Random(seed)
    pieces = ["1e300", "1e308", "-0", "0x10", "inf", "nan", "9" * 40, "1.5", "", " ", "true", "3", "0.000001",
              "1_000", "１", "127.0.0.1", "::1", "0.0.0.0", "a" * 300, "host-1.local", "4e9"]
    fields = [f"DYN_KVBM_{name.upper()}" for name in KvbmConfig.__dataclass_fields__ if name != "disk_cache_dir"]
    for _ in range(200):
        key = rng.choice(fields)
        value = rng.choice(pieces)
        try:
            cfg = KvbmConfig.from_env({key: value})
        except KvbmConfigError as e:
            assert f"{key}=" in str(e) and "expected" in str(e), (key, value, e)
            continue
        try:
            cfg.resolve_num_blocks(4096)
            cfg.check_fits(4096)
        except KvbmConfigError as e:
            assert "DYN_KVBM_" in str(e), (key, value, e)


def test_metrics_host_default_and_setting() -> None:
    assert KvbmConfig.from_env({}).metrics_host == "127.0.0.1"
    for host in ("0.0.0.0", "10.1.2.3", "::", "kvbm-0.pods.local"):
        assert KvbmConfig.from_env({"DYN_KVBM_METRICS_HOST": f" {host} "}).metrics_host == host
    with pytest.raises(KvbmConfigError, match=r"DYN_KVBM_METRICS_HOST=''"):
        KvbmConfig(metrics_host="")
