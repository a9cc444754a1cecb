"""`mlflow server` on a free loopback port, for a look at a store through MLflow's own UI and
REST API (the README's screenshots and the test that reads a sweep back through HTTP)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until_healthy(url: str, server: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while server.poll() is None and time.monotonic() < deadline:
        with (
            contextlib.suppress(urllib.error.URLError, ConnectionError),
            urllib.request.urlopen(f"{url}/health", timeout=5) as response,
        ):
            if response.status == 200:
                return True
        time.sleep(0.5)
    return False


def _stop(server: subprocess.Popen) -> None:
    """The server and the workers it started (its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@contextlib.contextmanager
def mlflow_server(
    backend_uri: str,
    folder: Path,
    timeout_s: float = 180,
    app_name: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """Serve ``backend_uri`` with the `mlflow` beside this Python; yields its base URL and stops
    it whatever happens. ``folder`` receives `server.log` (and is the server's working folder,
    where it would put artifacts of new runs). ``app_name`` (`basic-auth`) and ``env`` (added
    to this process's environment) serve it as a deployment would."""
    url = f"http://127.0.0.1:{_free_port()}"
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        *("server", "--backend-store-uri", backend_uri, "--workers", "1"),
        *("--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]),
        *(("--app-name", app_name) if app_name else ()),
    ]
    log_path = folder / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            command,
            cwd=folder,
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            if not _wait_until_healthy(url, server, timeout_s):
                raise RuntimeError(f"mlflow server did not start:\n{log_path.read_text()[-3000:]}")
            yield url
        finally:
            _stop(server)
