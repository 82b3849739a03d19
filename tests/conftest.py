"""Shared fixtures. One loopback Ray cluster per test session (each start costs ~1.7 GB and seconds),
and the run directories several test files start from, each built once per session into a
tmp_path_factory folder: tests only read them; a test that writes there works on a copy
(tests.helpers.copy_run)."""
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


@pytest.fixture(scope="session")
def synth_run(tmp_path_factory):
    """(root, dataset): tests.helpers.tiny_synth's default dataset in root/{synth,prepare,shards}."""
    from tests.helpers import tiny_synth

    root = tmp_path_factory.mktemp("synth_run")
    return root, tiny_synth(root)


@pytest.fixture(scope="session")
def step1_run(tmp_path_factory):
    """A run directory with prepare, a finished step 1 and a random embedding cache
    (tests.test_train_sicsrec.make_run)."""
    from tests.test_train_sicsrec import make_run

    return make_run(tmp_path_factory.mktemp("step1_run"))
