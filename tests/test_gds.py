"""GDS / NIXL probes: a well-formed answer with a reason on this machine, and each branch of the decision.

The branch tests replace `cuda.bindings.cufile` with a stand-in module and point the module list at a temporary
file, because a machine with the nvidia-fs driver is not at hand; the real-module test runs as is.
"""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest

from kvbm.kernels import gds
from kvbm.kernels.gds import PATH_COMPAT, PATH_GDS, PATH_POSIX, GdsProbe, nixl_posix_available, probe_gds


def test_probe_on_this_machine_is_well_formed():
    probe = probe_gds()
    assert isinstance(probe, GdsProbe)
    assert probe.path in (PATH_GDS, PATH_COMPAT, PATH_POSIX)
    assert probe.available == (probe.path == PATH_GDS)
    assert isinstance(probe.reason, str) and len(probe.reason) > 20 and "\n" not in probe.reason
    if probe.path != PATH_GDS:
        assert "O_DIRECT POSIX" in probe.reason


def fake_cufile(open_error: Exception | None = None) -> types.ModuleType:
    """A stand-in for cuda.bindings.cufile that records driver open/close."""
    mod = types.ModuleType("cuda.bindings.cufile")
    mod.calls = []

    def driver_open():
        mod.calls.append("open")
        if open_error is not None:
            raise open_error

    mod.driver_open = driver_open
    mod.driver_close = lambda: mod.calls.append("close")
    return mod


@pytest.fixture
def modules_file(tmp_path, monkeypatch):
    path = tmp_path / "modules"
    monkeypatch.setattr(gds, "PROC_MODULES", str(path))
    return path


def test_driver_and_nvidia_fs_mean_gds(monkeypatch, modules_file):
    modules_file.write_text("nvidia 1 0 - Live 0x0\nnvidia_fs 2 0 - Live 0x0\n")
    cufile = fake_cufile()
    monkeypatch.setitem(sys.modules, "cuda.bindings.cufile", cufile)
    probe = probe_gds()
    assert probe == GdsProbe(True, PATH_GDS, probe.reason) and "lists nvidia_fs" in probe.reason
    assert cufile.calls == ["open", "close"]


def test_driver_without_nvidia_fs_is_compat_mode_and_not_used(monkeypatch, modules_file):
    modules_file.write_text("nvidia 1 0 - Live 0x0\nnvidia_fsx 2 0 - Live 0x0\n")
    cufile = fake_cufile()
    monkeypatch.setitem(sys.modules, "cuda.bindings.cufile", cufile)
    probe = probe_gds()
    assert not probe.available and probe.path == PATH_COMPAT
    assert "compatibility mode" in probe.reason and "O_DIRECT POSIX" in probe.reason
    assert cufile.calls == ["open", "close"]


def test_unreadable_module_list_falls_back_to_sysfs(monkeypatch, modules_file, tmp_path):
    monkeypatch.setattr(gds, "SYS_MODULE_NVIDIA_FS", str(tmp_path / "no_such_module"))
    monkeypatch.setitem(sys.modules, "cuda.bindings.cufile", fake_cufile())
    probe = probe_gds()  # modules_file was never written
    assert probe.path == PATH_COMPAT and "unreadable" in probe.reason


def test_driver_open_failure_means_posix(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings.cufile", fake_cufile(RuntimeError("no libcufile\nmore")))
    probe = probe_gds()
    assert probe == GdsProbe(False, PATH_POSIX, probe.reason)
    assert "cuFileDriverOpen failed (RuntimeError: no libcufile)" in probe.reason


def test_missing_cufile_module_means_posix(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings.cufile", None)  # makes the import fail
    probe = probe_gds()
    assert probe.path == PATH_POSIX and "not importable" in probe.reason


@pytest.mark.skipif(importlib.util.find_spec("nixl") is None, reason="nixl is not installed")
def test_nixl_posix_backend_is_creatable_without_gpu():
    assert nixl_posix_available() is True


def test_register_file_fills_an_opaque_fd_descriptor():
    """register_file sets the descriptor as cuFile wants it and returns the handle (with the real binding's
    Descr where it imports; its handle_register is replaced, since registering needs the GDS driver)."""
    real = pytest.importorskip("cuda.bindings.cufile")
    seen = []
    fake = types.SimpleNamespace(Descr=real.Descr, FileHandleType=real.FileHandleType,
                                 handle_register=lambda ptr: seen.append(ptr) or 42)
    handle, descr = gds.register_file(fake, 7)
    assert handle == 42 and seen == [descr.ptr]
    assert int(descr.type) == int(real.FileHandleType.OPAQUE_FD) and int(descr.handle.fd[0]) == 7


def test_register_file_passes_registration_errors_on():
    class Refused(Exception):
        pass

    def refuse(ptr):
        raise Refused("cuFile error 5027 (HANDLE_NOT_REGISTERED)")

    descr = types.SimpleNamespace(handle=types.SimpleNamespace(), ptr=1)
    fake = types.SimpleNamespace(Descr=lambda: descr, FileHandleType=types.SimpleNamespace(OPAQUE_FD=1),
                                 handle_register=refuse)
    with pytest.raises(Refused, match="5027"):
        gds.register_file(fake, 3)
    assert gds.describe_error(Refused("a\nb")) == "Refused: a"
