import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers (store_factory, fake_datasets)


def pytest_configure(config):
    # Every tensor in the suite is tiny: intra-op threads only contend on small machines (7x slower
    # steps were measured with 2 threads on the shared 2-core CI machine). Subprocesses set their own.
    import torch
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray cluster for the whole test session (start-up costs seconds)."""
    import ray
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
