"""The prepare stage end to end: synthetic MIND -> run folder (local and S3), CLI, real data."""

import json
import os

import pyarrow.compute as pc
import pytest

from trsr import storage
from trsr.cli import main
from trsr.config import load
from trsr.data.prepare import load_samples, prepare
from trsr.experiment import ExperimentConfig
from trsr.runs import RunFolder


def synthetic_experiment(run_dir, data_dir, *overrides):
    return load(
        ExperimentConfig,
        None,
        [
            f"run_dir={run_dir}",
            "prepare.source.format=mind",
            f"prepare.source.path={data_dir}",
            "prepare.synthetic.users=120",
            "prepare.synthetic.items=300",
            *overrides,
        ],
    )


def test_prepare_writes_every_output_and_accounts_for_every_user(tmp_path):
    experiment = synthetic_experiment(tmp_path / "run", tmp_path / "data")
    stats = prepare(experiment.prepare, experiment.context())
    run = RunFolder(experiment.run_dir)
    for path in [run.items(), run.sequences(), run.rejects("prepared"), run.prepared_stage.stats_path]:
        assert storage.exists(path), path
    convert = stats["accounting"]["convert"]
    protocol = stats["accounting"]["protocol"]
    assert convert["users_in"] == 120 == convert["users_out"] + convert["users_rejected"]
    assert protocol["users_in"] == sum(protocol["users_per_split"].values()) + sum(protocol["excluded"].values())
    rejects = storage.read_parquet(run.rejects("prepared"))
    assert rejects.num_rows == sum(n for reasons in stats["rejects"].values() for n in reasons.values())
    for split, negatives in (("train", 1), ("valid", 20), ("test", 20)):
        samples = load_samples(experiment.run_dir, split)
        lists = protocol["users_per_split"][split]
        assert samples.num_rows == lists * (negatives + 1)
        assert stats["table1"][f"positives_{split}"] == lists
        # The same lists, one row each, in list_id order, numbered within the split.
        rows = storage.read_parquet(run.lists(split)).to_pylist()
        assert [r["list_id"] for r in rows] == sorted(set(samples.column("list_id").to_pylist()))
        assert [r["list_index"] for r in rows] == list(range(lists))
        by_list = {}
        for sample in samples.sort_by([("list_id", "ascending"), ("position", "ascending")]).to_pylist():
            by_list.setdefault(sample["list_id"], []).append(sample)
        for row in rows:
            members = by_list[row["list_id"]]
            assert row["candidates"] == [m["candidate"] for m in members]
            assert row["labels"] == [m["label"] for m in members]
            assert row["history"] == members[0]["history"] and row["user_id"] == members[0]["user_id"]
    table1 = stats["table1"]
    assert table1["attributes"] == 3 and 10 <= table1["avg_history_length"] <= 25


def test_same_seed_same_samples_and_up_to_date_stage_is_skipped(tmp_path):
    first = synthetic_experiment(tmp_path / "a", tmp_path / "data")
    second = synthetic_experiment(tmp_path / "b", tmp_path / "data")
    other = synthetic_experiment(tmp_path / "c", tmp_path / "data", "seed=7")
    assert prepare(first.prepare, first.context())["skipped"] is False
    prepare(second.prepare, second.context())
    prepare(other.prepare, other.context())
    for split in ("train", "valid", "test"):
        a = load_samples(first.run_dir, split)
        assert a.equals(load_samples(second.run_dir, split))
    assert not load_samples(first.run_dir, "test").equals(load_samples(other.run_dir, "test"))
    assert prepare(first.prepare, first.context())["skipped"] is True
    changed = synthetic_experiment(tmp_path / "a", tmp_path / "data", "prepare.protocol.min_history=12")
    assert prepare(changed.prepare, changed.context())["skipped"] is False


def test_the_same_bytes_with_new_times_are_up_to_date_and_other_bytes_are_not(tmp_path):
    """The source's part of the fingerprint is its content: a copied, restored or synced
    folder (new modification times) keeps every stage up to date; other bytes of the
    same size and time do not."""
    experiment = synthetic_experiment(tmp_path / "run", tmp_path / "data")
    assert prepare(experiment.prepare, experiment.context())["skipped"] is False
    for path in (tmp_path / "data").iterdir():
        later = path.stat().st_mtime_ns + 3_600 * 10**9
        os.utime(path, ns=(later, later))
    assert prepare(experiment.prepare, experiment.context())["skipped"] is True

    behaviors = tmp_path / "data" / "behaviors.tsv"
    before = behaviors.stat()
    lines = behaviors.read_bytes().splitlines(keepends=True)
    lines[0], lines[1] = lines[1], lines[0]  # same size, same time, other content
    behaviors.write_bytes(b"".join(lines))
    os.utime(behaviors, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert behaviors.stat().st_size == before.st_size and behaviors.stat().st_mtime_ns == before.st_mtime_ns
    assert prepare(experiment.prepare, experiment.context())["skipped"] is False


@pytest.mark.integration
def test_prepare_reads_and_writes_s3(tmp_path, s3_bucket):
    local = synthetic_experiment(tmp_path / "run", tmp_path / "data")
    prepare(local.prepare, local.context())  # also generates the raw data locally
    # Upload the raw MIND files, then prepare from S3 into an S3 run folder.
    for name in ("behaviors.tsv", "news.tsv"):
        with storage.open_binary(f"{s3_bucket}/raw/{name}", "wb") as handle:
            handle.write((tmp_path / "data" / name).read_bytes())
    remote = load(
        ExperimentConfig,
        None,
        [f"run_dir={s3_bucket}/run", "prepare.source.format=mind", f"prepare.source.path={s3_bucket}/raw"],
    )
    stats = prepare(remote.prepare, remote.context())
    assert stats["accounting"]["convert"]["users_in"] == 120
    for split in ("train", "valid", "test"):
        assert load_samples(remote.run_dir, split).equals(load_samples(local.run_dir, split))
    assert prepare(remote.prepare, remote.context())["skipped"] is True


def test_cli_prepare_and_stats(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["data", "generate", "--output", str(data), "--users", "80", "--items", "200"]) == 0
    run_dir = tmp_path / "run"
    assert main(["data", "prepare", "mind", "--input", str(data), "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "# of positive samples in the test set" in out and "users: 80 in = 80 converted" in out
    assert main(["data", "stats", "--run-dir", str(run_dir)]) == 0
    assert "Avg. # of tokens corresponding to an item (whitespace)" in capsys.readouterr().out


def test_the_run_folder_holds_its_config_so_later_commands_take_run_dir_alone(tmp_path, capsys):
    """prepare with FORMAT/--input/--run-dir writes <run_dir>/config.yaml; then --run-dir
    alone is a whole config (--set applies on top), and --json prints only JSON on stdout."""
    data = tmp_path / "data"
    assert main(["data", "generate", "--output", str(data), "--users", "60", "--items", "150"]) == 0
    run_dir = tmp_path / "run"
    assert main(["data", "prepare", "mind", "--input", str(data), "--run-dir", str(run_dir), "--seed", "7"]) == 0
    assert (run_dir / "config.yaml").exists()
    capsys.readouterr()
    assert main(["plan", "--run-dir", str(run_dir), "--cluster", "1x0:8", "--json"]) == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out)  # stdout is the JSON alone
    assert plan["cluster"] and [stage["name"] for stage in plan["stages"]][0].startswith("summarize")
    assert main(["data", "stats", "--run-dir", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 7  # the seed given to prepare, kept
    # --set on top of the stored config; a key that does not exist is refused with its name.
    assert main(["plan", "--run-dir", str(run_dir), "--cluster", "1x0:8", "--set", "summarize.engine.nope=1"]) == 2
    assert "nope" in capsys.readouterr().err
    # A folder without a config: the error says what to give.
    assert main(["summarize", "--run-dir", str(tmp_path / "elsewhere")]) == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and "--config" in err


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["data", "prepare", "mind", "--input", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "behaviors.tsv" in err and "not found" in err
    assert main(["data", "prepare", "mind"]) == 2
    assert "--input" in capsys.readouterr().err
    assert main(["data", "stats", "--run-dir", str(tmp_path / "empty")]) == 2
    assert "trsr data prepare" in capsys.readouterr().err
    assert main(["data", "prepare", "--config", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.shared_data
def test_amazon_games_protocol(shared_data, tmp_path):
    experiment = load(
        ExperimentConfig,
        None,
        [
            f"run_dir={tmp_path / 'games'}",
            "prepare.source.format=recbole",
            f"prepare.source.path={shared_data / 'amazon-games-6k'}",
            "prepare.protocol.users={train: 6285, valid: 1000, test: 1000}",
        ],
    )
    stats = prepare(experiment.prepare, experiment.context())
    assert sum(stats["accounting"]["protocol"]["users_per_split"].values()) == 8285
    test = load_samples(experiment.run_dir, "test")
    assert test.num_rows == 1000 * 21
    for row in test.filter(pc.equal(test.column("label"), 0)).to_pylist():
        assert row["candidate"] not in row["history"]
    again = load(ExperimentConfig, None, [f"run_dir={tmp_path / 'again'}", *[
        "prepare.source.format=recbole",
        f"prepare.source.path={shared_data / 'amazon-games-6k'}",
        "prepare.protocol.users={train: 6285, valid: 1000, test: 1000}",
    ]])
    prepare(again.prepare, again.context())
    assert load_samples(again.run_dir, "test").equals(test)


def test_interactions_matching_no_item_id_fail_with_the_ids_side_by_side(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    lines = ["user_id,item_id,timestamp"]
    for user in range(30):
        lines += [f"u{user},{786022000 + (user + k) % 40},{1000 + k}" for k in range(12)]
    (data / "interactions.csv").write_text("\n".join(lines) + "\n")
    # The catalogue writes its ids with a leading zero: nothing matches.
    (data / "items.csv").write_text("item_id,title\n" + "".join(f"0{786022000 + k},Item {k}\n" for k in range(40)))
    code = main(["data", "prepare", "generic", "--input", str(data), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "split(s) empty" in err and "0 of 360 interaction item ids matched" in err
    assert "786022000" in err and "0786022000" in err
    assert not RunFolder(str(tmp_path / "run")).prepared_stage.is_complete("anything")
