"""What `trsr run` prints around its stages: the plan first, then [i/N] per stage."""

from trsr.pipeline import Stages


def test_plan_line_then_numbered_stages(capsys):
    stages = Stages(["prepare", "summarize", "train a", "score a", "train b", "score b", "evaluate"])
    results: dict = {}
    stages.run("prepare", lambda: {"rows": 3}, lambda r: f"prepared {r['rows']} rows", results)
    stages.run("summarize", lambda: {"skipped": True}, lambda r: "", results)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "7 stages: prepare, summarize, train x2, score x2, evaluate"
    assert out[1] == "[1/7] prepare: running"
    assert out[2] == "prepared 3 rows"
    assert out[3].startswith("[1/7] prepare: done in ")
    assert out[4] == "[2/7] summarize: running"
    assert out[5].startswith("[2/7] summarize: up to date, skipped in ")
    assert results == {"prepare": {"rows": 3}, "summarize": {"skipped": True}}


def test_quiet_and_verbose_are_accepted_before_and_after_every_command():
    from trsr.cli_parser import build_parser

    parser = build_parser()
    for argv in (["run", "--config", "x.yaml"], ["summarize", "--config", "x.yaml"], ["data", "stats", "--run-dir", "runs/x"]):
        assert (parser.parse_args(argv).quiet, parser.parse_args(argv).verbose) == (False, False)
        assert parser.parse_args([*argv, "-q"]).quiet and parser.parse_args(["-q", *argv]).quiet
        assert parser.parse_args([*argv, "--verbose"]).verbose and parser.parse_args(["-v", *argv]).verbose


def test_every_command_help_has_reads_writes_example_and_takes_run_dir_and_json():
    import argparse

    from trsr.cli_parser import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    leaves = {}
    for name, command in commands.items():
        if name == "data":
            sub = next(a for a in command._actions if isinstance(a, argparse._SubParsersAction)).choices
            leaves.update({f"data {n}": c for n, c in sub.items()})
        else:
            leaves[name] = command
    assert len(leaves) == 10
    for name, command in leaves.items():
        text = command.format_help()
        for label in ("Reads:", "Writes:", "Example:", "--json", "--quiet", "--verbose"):
            assert label in text, (name, label)
        assert f"trsr {name}" in text.split("Example:")[1], name  # the example runs this command
        if name != "data generate":  # writes a dataset, not a run folder
            assert "--run-dir" in text, name
