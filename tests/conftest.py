import os
import socket
import subprocess
import sys
import time

import pytest


def pytest_configure(config):
    # Every tensor in the suite is tiny: intra-op threads only contend on small machines (7x slower
    # steps were measured with 2 threads on the shared 2-core CI machine). Subprocesses set their own.
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """A test that needs the Ray cluster (directly or through a fixture) is slow: `make test` skips it."""
    for item in items:
        if "ray_address" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray cluster for the whole test session (start-up costs seconds), on 127.0.0.1 only."""
    import ray

    from pipeline.ray_cluster import stay_on_loopback

    stay_on_loopback()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """A real S3-protocol server (moto in server mode) on 127.0.0.1, for the whole session.

    `env` holds the standard variables a user sets (credentials, region, endpoint): give them to a
    subprocess, or `monkeypatch.setenv` them; `bucket()` makes a fresh bucket and returns its name."""

    def __init__(self, port: int):
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }
        self.storage_options = {
            "key": "testing",
            "secret": "testing-secret",
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        }
        self._buckets = 0

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing-secret",
            region_name="us-east-1",
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def bucket(self, prefix: str = "b") -> str:
        self._buckets += 1
        name = f"{prefix}-{self._buckets}-{os.getpid()}"
        self.client().create_bucket(Bucket=name)
        return name

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.storage_options)


@pytest.fixture(scope="session")
def s3_server():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.2)
    try:
        yield S3Server(port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
