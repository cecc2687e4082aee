"""The "Your own data" path of the README: the example files and the template recipe
(jobs/configs/generic.yaml) prepare without a reject, and the files are what their
generator writes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from trsr.config import load
from trsr.data.prepare import prepare
from trsr.experiment import ExperimentConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "own-data"


def test_the_example_files_are_what_their_generator_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("own_data_generate", EXAMPLE / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(out=tmp_path)
    for name in ("interactions.csv", "items.csv", "candidates.csv", "interactions-day2.csv"):
        assert (tmp_path / name).read_bytes() == (EXAMPLE / name).read_bytes(), name


def test_the_template_recipe_prepares_the_example_without_rejects(tmp_path):
    experiment = load(
        ExperimentConfig,
        ROOT / "jobs" / "configs" / "generic.yaml",
        [f"run_dir={tmp_path / 'run'}", f"prepare.source.path={EXAMPLE}"],
    )
    stats = prepare(experiment.prepare, experiment.context())
    accounting = stats["accounting"]
    assert accounting["convert"]["users_in"] == accounting["convert"]["users_out"] == 120
    assert accounting["convert"]["rows_rejected"] == 0 and accounting["convert"]["items_rejected"] == 0
    assert accounting["protocol"]["users_per_split"] == {"train": 84, "valid": 12, "test": 24}
