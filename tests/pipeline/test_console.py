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
    for argv in (["run", "--config", "x.yaml"], ["summarize", "--config", "x.yaml"], ["data", "stats", "runs/x"]):
        assert (parser.parse_args(argv).quiet, parser.parse_args(argv).verbose) == (False, False)
        assert parser.parse_args([*argv, "-q"]).quiet and parser.parse_args(["-q", *argv]).quiet
        assert parser.parse_args([*argv, "--verbose"]).verbose and parser.parse_args(["-v", *argv]).verbose
