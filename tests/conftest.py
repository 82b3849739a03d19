"""Shared fixtures. One loopback Ray cluster per test session (each start costs ~1.7 GB and seconds)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    from llm_labeling.run import start_local_ray

    # 3 CPUs: two 1-CPU actors and one spare, so actors never hold every CPU.
    start_local_ray(num_cpus=3, object_store_memory=100 * 1024 * 1024)
    yield ray
    ray.shutdown()
