import pytest

from trsr.config import fingerprint, load
from trsr.experiment import ExperimentConfig
from trsr.errors import ConfigError

RECIPE = """
run_dir: runs/x
seed: 7
prepare:
  source: {format: mind, path: data/mind}
  protocol: {min_history: 5}
"""


def write(tmp_path, text=RECIPE):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_yaml_recipe_with_dotted_overrides(tmp_path):
    config = load(ExperimentConfig, write(tmp_path), ["prepare.protocol.max_history=30", "seed=9"])
    assert config.seed == 9
    assert config.prepare.protocol.min_history == 5
    assert config.prepare.protocol.max_history == 30
    assert config.prepare.source.format == "mind"
    assert config.prepare.source.news == "news.tsv"  # default kept


def test_override_switches_source_format_and_validates_it(tmp_path):
    config = load(ExperimentConfig, write(tmp_path), ["prepare.source.format=recbole"])
    assert config.prepare.source.format == "recbole"
    with pytest.raises(ConfigError, match="prepare.source"):
        load(ExperimentConfig, write(tmp_path), ["prepare.source.format=nope"])


def test_unknown_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="prepare.protocol.min_histroy"):
        load(ExperimentConfig, write(tmp_path), ["prepare.protocol.min_histroy=3"])


def test_a_renamed_key_is_an_error_naming_the_new_key(tmp_path):
    with pytest.raises(ConfigError, match=r"summarize: .*'block_size' was renamed to 'items_per_block'"):
        load(ExperimentConfig, write(tmp_path), ["summarize.block_size=4"])
    with pytest.raises(ConfigError, match=r"score.engine: .*'block_size' was renamed to 'kv_block_size'"):
        load(ExperimentConfig, write(tmp_path), ["score.engine.block_size=32"])
    config = load(ExperimentConfig, write(tmp_path), ["summarize.items_per_block=4", "score.engine.kv_block_size=32"])
    assert (config.summarize.items_per_block, config.score.engine.kv_block_size) == (4, 32)


def test_bad_values_and_files_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="min_history"):
        load(ExperimentConfig, write(tmp_path), ["prepare.protocol.min_history=abc"])
    with pytest.raises(ConfigError, match="not found"):
        load(ExperimentConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load(ExperimentConfig, write(tmp_path), ["seed"])
    with pytest.raises(ConfigError, match="run_dir"):
        load(ExperimentConfig, write(tmp_path, "prepare: {source: {format: mind, path: x}}\n"))


def test_fingerprint_changes_with_config_only():
    a = load(ExperimentConfig, None, ["run_dir=r", "prepare.source.format=mind", "prepare.source.path=p"])
    b = load(ExperimentConfig, None, ["run_dir=r", "prepare.source.format=mind", "prepare.source.path=p"])
    c = load(ExperimentConfig, None, ["run_dir=r", "prepare.source.format=mind", "prepare.source.path=q"])
    assert fingerprint(a.prepare) == fingerprint(b.prepare)
    assert fingerprint(a.prepare) != fingerprint(c.prepare)


def test_shipped_recipes_validate():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        load(ExperimentConfig, recipe)


def test_one_domain_words_both_prompts():
    """summarize.domain and score.prompt.domain are one setting: the one given is used
    for both, and two different ones are an error (they once disagreed in a recipe)."""
    base = ["run_dir=runs/x", "prepare.source.format=mind", "prepare.source.path=data/mind"]
    only_summarizer = load(ExperimentConfig, None, [*base, "summarize.domain=shopping"])
    assert only_summarizer.score.prompt.domain == "shopping"
    only_recommender = load(ExperimentConfig, None, [*base, "score.prompt.domain=generic"])
    assert only_recommender.summarize.domain == "generic"
    assert load(ExperimentConfig, None, base).score.prompt.domain == "news"
    with pytest.raises(ConfigError, match="summarize.domain=shopping and score.prompt.domain=news disagree"):
        load(ExperimentConfig, None, [*base, "summarize.domain=shopping", "score.prompt.domain=news"])
