"""The tiny pipeline run that the pipeline and production tests share."""

import pytest

from .tiny_run import tiny_experiment


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_model, ray_local):
    """The whole pipeline, both variants, once per session: test_pipeline checks it, and
    test_production scores with the adapter it trained (training is the same command
    there, and costs CI minutes for nothing new)."""
    from trsr.pipeline import run_pipeline

    tmp_path = tmp_path_factory.mktemp("pipeline")
    experiment = tiny_experiment(tmp_path, tiny_model)
    results = run_pipeline(experiment)
    return experiment, results
