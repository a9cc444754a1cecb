"""moto's S3 server on 127.0.0.1 for the benchmarks that measure against a real S3 API
(P13, P14, P15), as tests/test_pool_s3.py runs it. Not a benchmark: run.py runs only bench_*."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import IO, Any

#: AWS settings of the machine that would send an ``s3://`` URI elsewhere than the server.
AWS_PROFILE_VARIABLES = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_moto(port: int, log: int | IO[bytes] = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """The server, once it accepts connections; its request log (one line per request) to
    ``log``."""
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("moto server did not start")


def loopback_filesystem(port: int) -> Any:
    """A pyarrow S3 filesystem on the server at ``port``, allowed to create buckets."""
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}",
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        allow_bucket_creation=True,
    )


def point_aws_at(port: int) -> None:
    """Every ``s3://`` URI, in this process and in the Ray workers it starts, at the loopback
    server (the standard AWS variables, as tests/test_pool_s3.py sets them)."""
    for name in AWS_PROFILE_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
