"""Real services for integration tests: a Ray cluster and an MLflow server on 127.0.0.1.

CI starts both once (`.ci/run` exports RAY_ADDRESS_FOR_TESTS and MLFLOW_URI_FOR_TESTS); run
locally without them, the fixtures start their own and stop them at the end of the session.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """An `mlflow server` process with a SQLite backend; can be stopped and restarted on its port."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root, self.port = root, port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90) -> None:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.root}/mlflow.db",
            "--artifacts-destination",
            str(self.root / "artifacts"),
        ]
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(command, stdout=log, stderr=log, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer on {self.uri}; see {self.root / 'server.log'}")

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server's workers live in its process group
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process = None


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URI of a running MLflow server shared by the session (do not stop it: see `own_mlflow_server`)."""
    if os.environ.get("MLFLOW_URI_FOR_TESTS"):
        yield os.environ["MLFLOW_URI_FOR_TESTS"]
        return
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server.uri
    server.stop()


@pytest.fixture
def own_mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A private server a test may stop and restart (outage tests)."""
    server = MlflowServer(tmp_path / "mlflow")
    server.root.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """Address of a running Ray cluster: CI's, or a local head started for this session."""
    if os.environ.get("RAY_ADDRESS_FOR_TESTS"):
        yield os.environ["RAY_ADDRESS_FOR_TESTS"]
        return
    port = free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    command = [
        ray_cli,
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    # Ray 2.60 turns token auth on for `ray start` once ~/.ray/auth_token exists (any local ray.init()
    # writes it), and `ray status` then fails for want of the token: keep this throwaway head token-free
    # unless RAY_AUTH_MODE says otherwise (drivers in token mode join token-free clusters too).
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    # --block keeps the head's processes in this process group, so the session stops exactly this
    # cluster (`ray stop` would stop every Ray cluster on the machine).
    head = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while subprocess.run([ray_cli, "status", "--address", address], capture_output=True, env=env).returncode != 0:
        if time.monotonic() > deadline or head.poll() is not None:
            os.killpg(head.pid, signal.SIGKILL)
            raise RuntimeError(f"ray head did not start on {address}")
        time.sleep(1)
    yield address
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
