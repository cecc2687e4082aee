"""Scoring: shared-prefix p(yes) against plain forward passes, list building, the Ray job."""

import math

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from trsr.schema import SCORES, conform
from trsr.llm.engine import EngineConfig
from trsr.recommend.config import ScoreConfig
from trsr.llm.tokenizer import encode_prompt
from trsr.recommend.prompt import SUMMARY_HEADER
from trsr.recommend.lists import PROMPT_LISTS, AttachItems
from trsr.recommend.score import ScoreStage, p_yes
from trsr.schema import SCORES_WITH_DIAGNOSTICS


def item(n, words=5):
    return [
        {"name": "category", "value": f"topic{n % 3}"},
        {"name": "title", "value": " ".join(f"w{n}x{k}" for k in range(words))},
    ]


def lists_table(rows):
    return pa.Table.from_pylist(rows, schema=PROMPT_LISTS)


def one_list(list_id, summary, status, history, candidates, labels):
    return dict(
        list_id=list_id,
        split="test",
        user_id=list_id.split(":")[1],
        summary=summary,
        summary_status=status,
        history=[item(n) for n in history],
        candidates=[f"N{n}" for n in candidates],
        candidate_attributes=[item(n) for n in candidates],
        labels=labels,
    )


def config(tiny_model, **prompt):
    return ScoreConfig(
        engine=EngineConfig(model=tiny_model, dtype="float32", max_model_len=256, batch_size=4),
        prompt={"max_length": 256, **prompt},
    )


class CountingEngine:
    """The engine, counting yes_no_logprobs calls and keeping the requests."""

    def __init__(self, engine):
        self.engine = engine
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def yes_no_logprobs(self, requests, yes="Yes", no="No"):
        self.calls.append(list(requests))
        return self.engine.yes_no_logprobs(requests, yes, no)


def test_shared_prefix_scores_equal_independent_full_prompts(tiny_model, hf_engine):
    import torch

    engine = CountingEngine(hf_engine)
    stage = ScoreStage(config(tiny_model), engine=engine)
    batch = lists_table(
        [
            one_list("test:u1", "Likes football and cooking.", "ok", [1, 2, 3, 4], [10, 11, 12, 13], [0, 1, 0, 0]),
            one_list("test:u2", None, "missing", [5, 6], [20, 21, 22], [0, 0, 1]),
            one_list("test:u3", "Reads politics.", "ok", [], [30, 31], [1, 0]),
        ]
    )
    out = stage(batch)
    assert out.schema.equals(SCORES_WITH_DIAGNOSTICS)
    assert len(engine.calls) == 1 and len(engine.calls[0]) == 3  # one request per list
    assert out.num_rows == 9
    assert out.column("candidate").to_pylist() == ["N10", "N11", "N12", "N13", "N20", "N21", "N22", "N30", "N31"]
    assert out.column("label").to_pylist() == [0, 1, 0, 0, 0, 0, 1, 1, 0]
    assert set(out.column("method").to_pylist()) == {"llm-trsr-hierarchical"}

    tokenizer, model = hf_engine.tokenizer, hf_engine.model
    yes_id, no_id = hf_engine.yes_no_token_ids("Yes", "No")
    rows = out.to_pylist()
    k = 0
    for prefix, suffixes in engine.calls[0]:
        for suffix in suffixes:
            ids = encode_prompt(tokenizer, prefix + suffix)
            assert ids == hf_engine.encode(prefix + suffix)
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            logprobs = logits.log_softmax(-1)
            ly, ln = float(logprobs[yes_id]), float(logprobs[no_id])
            row = rows[k]
            assert row["logp_yes"] == pytest.approx(ly, abs=1e-4)
            assert row["logp_no"] == pytest.approx(ln, abs=1e-4)
            # eq. 3: softmax over the two answer logits, the yes part
            expected = float(torch.softmax(logits[[yes_id, no_id]], -1)[0])
            assert row["score"] == pytest.approx(expected, abs=1e-5)
            assert 0.0 < row["score"] < 1.0
            assert row["prompt_tokens"] == len(ids) <= 256 - stage.builder.reserve
            k += 1
    assert k == 9
    # The user without a summary is scored with an empty summary line.
    prefix_u2 = engine.calls[0][1][0]
    assert SUMMARY_HEADER + "\n\n\n" in prefix_u2
    # The SCORES schema holds for the written columns.
    scores = conform(out, SCORES, "stage output")
    assert scores.schema.equals(SCORES)


def test_summary_used_only_when_status_ok(tiny_model, hf_engine):
    engine = CountingEngine(hf_engine)
    stage = ScoreStage(config(tiny_model), engine=engine)
    flagged = one_list("test:u1", "aaa aaa aaa aaa", "repetitive", [1, 2], [3, 4], [1, 0])
    missing = one_list("test:u1", None, "missing", [1, 2], [3, 4], [1, 0])
    ok = one_list("test:u1", "aaa aaa aaa aaa", "ok", [1, 2], [3, 4], [1, 0])
    scores = [stage(lists_table([row])).column("score").to_pylist() for row in (flagged, missing, ok)]
    assert scores[0] == scores[1]
    assert "aaa" not in engine.calls[0][0][0] and "aaa aaa" in engine.calls[2][0][0]


def test_tallrec_and_k0_stages(tiny_model, hf_engine):
    rows = [one_list("test:u1", "ignored summary", "unused", list(range(12)), [40, 41], [0, 1])]
    tallrec = ScoreStage(config(tiny_model, variant="tallrec"), engine=hf_engine)
    out = tallrec(lists_table(rows))
    assert out.column("method").to_pylist() == ["tallrec", "tallrec"]
    shown = out.column("history_items").to_pylist()[0]
    assert 0 < shown <= 12 and out.column("items_dropped").to_pylist()[0] == 12 - shown
    assert max(out.column("prompt_tokens").to_pylist()) <= 256 - tallrec.builder.reserve
    rows[0]["summary_status"] = "ok"
    k0 = ScoreStage(config(tiny_model, variant="summary_only"), engine=hf_engine)
    out = k0(lists_table(rows))
    assert out.column("history_items").to_pylist() == [0, 0]
    assert all(0 < s < 1 for s in out.column("score").to_pylist())


def test_p_yes_is_stable():
    assert p_yes(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    assert p_yes(-1000.0, 0.0) == pytest.approx(0.0, abs=1e-300)
    assert p_yes(0.0, -1000.0) == 1.0
    assert p_yes(-2.0, -2.0) == 0.5


def lists_rows(with_summary: bool):
    from trsr.schema import LISTS

    rows = [
        dict(list_id="test:u1", split="test", user_id="u1", list_index=0, history=["i1", "i2", "i3"],
             candidates=["i4", "i5", "i6"], labels=[0, 1, 0]),
        dict(list_id="test:u2", split="test", user_id="u2", list_index=1, history=["i2"],
             candidates=["i7", "i1"], labels=[1, 0]),
    ]
    table = pa.Table.from_pylist(rows, schema=LISTS)
    if with_summary:
        table = table.append_column("summary", pa.array(["likes things", None])).append_column(
            "status", pa.array(["ok", "missing"])
        )
    return table


def catalogue():
    from trsr.data.catalogue import Catalogue

    return Catalogue.from_mapping({f"i{n}": item(n) for n in range(1, 9)})


def test_attach_items_gives_the_prompt_its_texts():
    rows = AttachItems(catalogue(), history_items=2, uses_summary=True)(lists_rows(True))
    assert rows.schema.equals(PROMPT_LISTS)
    first, second = rows.to_pylist()
    assert first["candidates"] == ["i4", "i5", "i6"] and first["labels"] == [0, 1, 0]
    assert first["candidate_attributes"] == [item(4), item(5), item(6)]
    assert first["history"] == [item(2), item(3)]  # the 2 most recent, oldest first
    assert (first["summary"], first["summary_status"]) == ("likes things", "ok")
    assert (second["summary"], second["summary_status"]) == (None, "missing")
    tallrec = AttachItems(catalogue(), history_items=None, uses_summary=False)(lists_rows(False))
    assert tallrec.column("summary_status").to_pylist() == ["unused", "unused"]
    assert len(tallrec.to_pylist()[0]["history"]) == 3
    from trsr.data.catalogue import Catalogue

    small = Catalogue.from_mapping({f"i{n}": item(n) for n in range(1, 4)})
    with pytest.raises(KeyError, match="'i4' is not in the catalogue"):
        AttachItems(small, history_items=None, uses_summary=False)(lists_rows(False))


# ------------------------------------------------------------------- Ray Data job


@pytest.mark.integration
def test_score_job_scores_every_test_list(tmp_path, tiny_model, ray_local):
    from trsr.config import load
    from trsr.data.prepare import load_samples, prepare
    from trsr.experiment import ExperimentConfig
    from trsr.recommend.score import read_scores, score
    from trsr.schema import SUMMARIES
    from trsr import storage

    overrides = [
        f"run_dir={tmp_path / 'run'}",
        "prepare.source.format=mind",
        f"prepare.source.path={tmp_path / 'data'}",
        "prepare.synthetic.users=40",
        "prepare.synthetic.items=200",
        "prepare.synthetic.min_history=4",
        "prepare.synthetic.max_history=12",
        "prepare.protocol.min_history=4",
        "prepare.protocol.max_history=12",
        f"score.engine.model={tiny_model}",
        "score.engine.max_model_len=1024",
        "score.engine.dtype=float32",
        "score.prompt.max_length=1024",
        "score.users_per_batch=2",
        "prepare.protocol.users={train: 0.6, valid: 0.2, test: 0.2}",
        "runner.max_failed_share=0.2",
        "train.enabled=false",  # the base (tiny) model scores
    ]
    experiment = load(ExperimentConfig, None, [*overrides, "score.prompt.max_missing_summary_share=0.5"])
    prepare(experiment.prepare, experiment.context())
    run_dir = str(tmp_path / "run")
    samples = load_samples(run_dir, "test")
    users = sorted(set(samples.column("user_id").to_pylist()))
    assert len(users) >= 6
    # Summaries: every list, all test users summarized but one ("missing"), one of them
    # flagged by the summarizer ("empty"); written where `trsr summarize` writes them.
    # One list is poisoned: a candidate the catalogue does not know.
    from trsr.runs import RunFolder

    run = RunFolder(run_dir)
    lists = pa.concat_tables([storage.read_parquet(run.lists(s)) for s in ("test", "valid", "train")])
    rows = []
    echo_user = sorted(set(storage.read_parquet(run.lists("train")).column("user_id").to_pylist()))[0]
    for n, row in enumerate(lists.to_pylist()):
        status = "missing" if row["user_id"] == users[0] else ("empty" if row["user_id"] == users[1] else "ok")
        status = "echo" if row["user_id"] == echo_user else status  # a training user
        if row["user_id"] == users[2]:
            row["candidates"] = ["N-unknown"] + row["candidates"][1:]
        rows.append(
            dict(row, mode="hierarchical", summary=None if status == "missing" else f"User likes topic {n}.",
                 intermediates=[], items=4, blocks=1, tokens_in=0, tokens_out=0, calls=1, retries=0,
                 shortened_blocks=0, trimmed=0, status=status, model="x", template_hash="h", seed=0)
        )
    folder = run.summaries("hierarchical")
    storage.write_parquet(pa.Table.from_pylist(rows, schema=SUMMARIES), folder.join("part-0.parquet"))
    folder.finish("made-by-hand", {})

    # Two of the test lists have no usable summary: above the default share the stage
    # stops before it starts, with the counts by status.
    from trsr.errors import DataError

    n_test = len(users)
    with pytest.raises(DataError, match=rf"2 of {n_test} lists .* no usable hierarchical summary \(empty 1, missing 1\).*max_missing_summary_share=0.1"):
        strict = load(ExperimentConfig, None, overrides)
        score(strict.score, strict.context(), "test", trained=strict.train.enabled)
    assert not run.scores("llm-trsr-hierarchical", "test").data_files()

    stats = score(experiment.score, experiment.context(), "test", trained=experiment.train.enabled)["test"]
    table = read_scores(run_dir, "llm-trsr-hierarchical", "test")
    assert table.schema.equals(SCORES)
    poisoned = f"test:{users[2]}"
    everything = sorted(set(samples.column("list_id").to_pylist()))
    lists = [lid for lid in everything if lid != poisoned]
    assert sorted(set(table.column("list_id").to_pylist())) == lists
    samples = samples.filter(pc.not_equal(samples.column("list_id"), poisoned))
    assert table.num_rows == samples.num_rows == 21 * len(lists)
    expected = sorted(zip(samples.column("list_id").to_pylist(), samples.column("candidate").to_pylist()))
    assert sorted(zip(table.column("list_id").to_pylist(), table.column("candidate").to_pylist())) == expected
    assert pc.all(pc.and_(pc.greater(table.column("score"), 0), pc.less(table.column("score"), 1))).as_py()
    positives = table.filter(pc.equal(table.column("label"), 1))
    assert sorted(positives.column("list_id").to_pylist()) == lists  # one positive per list
    assert stats["lists"] == len(lists) and stats["lists_in_split"] == len(everything)
    assert stats["lists_without_summary"] == 2  # one missing, one flagged "empty"
    assert stats["summary_status"] == {"empty": 1, "missing": 1, "ok": len(users) - 3}
    assert stats["skipped"] is False and stats["rows_computed"] == len(everything)
    assert stats["candidates"] == table.num_rows
    # The scores remember the prepared data they ranked (the report leaves out stale ones).
    assert run.scores("llm-trsr-hierarchical", "test").details()["prepared"] == run.prepared_fingerprint()
    # The poisoned list went to the rejects with its reason; the others were scored.
    assert stats["rows_failed"] == stats["rejects"] == 1
    rejects = storage.read_parquet(run.scores("llm-trsr-hierarchical", "test").rejects)
    assert rejects.column("raw").to_pylist() == [poisoned] and rejects.column("user_id").to_pylist() == [users[2]]
    assert "'N-unknown' is not in the catalogue" in rejects.column("reason")[0].as_py()
    # Up to date: a second call skips.
    assert score(experiment.score, experiment.context(), "test", trained=experiment.train.enabled)["test"]["skipped"] is True

    # missing_summary=reject: the two lists without a usable summary are not scored;
    # they are in the rejects with their status, beside the poisoned list.
    rejecting = load(
        ExperimentConfig, None,
        [*overrides, "score.prompt.max_missing_summary_share=0.5", "score.prompt.missing_summary=reject", "score.method=rejecting"],
    )
    stats = score(rejecting.score, rejecting.context(), "test", trained=rejecting.train.enabled)["test"]
    table = read_scores(run_dir, "rejecting", "test")
    no_summary = {f"test:{users[0]}", f"test:{users[1]}"}
    assert sorted(set(table.column("list_id").to_pylist())) == sorted(set(lists) - no_summary)
    assert stats["summary_status"] == {"ok": len(users) - 3} and stats["lists_without_summary"] == 0
    assert stats["rows_declined"] == 2 and stats["rows_failed"] == 1 and stats["rejects"] == 3
    assert stats["rows_computed"] == len(everything) - 2 and stats["rows_in"] == len(everything)
    rejects = storage.read_parquet(run.scores("rejecting", "test").rejects).sort_by("raw")
    reasons = dict(zip(rejects.column("raw").to_pylist(), rejects.column("reason").to_pylist()))
    assert set(reasons) == no_summary | {poisoned}
    assert "status missing" in reasons[f"test:{users[0]}"] and "status empty" in reasons[f"test:{users[1]}"]

    # Training takes the same policy: its texts stage declines the training list whose
    # summary is an echo (and under prompt_without builds it with an empty summary).
    from trsr.recommend.sft import texts_job
    from trsr.runner import run_stage

    texts = run_stage(texts_job(rejecting.train, rejecting.score, rejecting.context().run, tiny_model), rejecting.runner)
    train_lists = storage.read_parquet(run.lists("train")).num_rows
    assert texts["rows_in"] == train_lists and texts["rows_declined"] == 1 and texts["rows_failed"] == 0
    assert texts["lists"] == train_lists - 1 and texts["summary_status"] == {"ok": train_lists - 1}
    rejects = storage.read_parquet(run.training_texts("rejecting").rejects)
    assert rejects.column("raw").to_pylist() == [f"train:{echo_user}"]
    assert "status echo" in rejects.column("reason")[0].as_py()
