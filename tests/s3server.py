"""A real S3-protocol server for the tests: moto's standalone server (`python -m moto.server`, from
PyPI) in its own process on 127.0.0.1. qdeep talks to it as to AWS or MinIO, through the standard
AWS environment variables (AWS_ENDPOINT_URL, keys, region), which `configure` sets in pytest_configure,
before any Ray starts, so every Ray worker of the session inherits them as it would a user's shell.
The server itself starts on first use (`S3Server.start`) and stops when the session ends."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def configure(self) -> None:
        """The environment a user of an S3-compatible server sets; any real AWS settings are left unused."""
        os.environ.update({"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "qdeep-test",
                           "AWS_SECRET_ACCESS_KEY": "qdeep-test", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            os.environ.pop(key, None)

    def start(self, timeout: float = 60.0) -> str:
        if self.proc is None:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + timeout
            while True:
                try:
                    urllib.request.urlopen(self.endpoint, timeout=2).close()
                    break
                except OSError:
                    if self.proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"moto's S3 server did not start on {self.endpoint}") from None
                    time.sleep(0.1)
        return self.endpoint

    def new_bucket(self) -> str:
        """A fresh empty bucket: its s3:// URI."""
        import boto3

        self.start()
        name = f"qdeep-{uuid.uuid4().hex[:12]}"
        boto3.client("s3").create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
