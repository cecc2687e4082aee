"""The generating and finishing batch stages of summarization: plain classes over
Arrow batches (no Ray inside).

Each row is one ranking list's user and its summarization state
(`trsr.summarize.state.STATE`, made by `trsr.summarize.render.RenderBlocks`), carried
from step to step. `SummarizeStage` runs one or more hierarchical levels or recurrent
steps for a whole batch of users with one batched engine call per level/step.
`Finalize` turns the state into SUMMARIES rows. A job hands these classes to the stage
runner (trsr.runner); a unit test calls them directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from trsr.schema import LISTS, SUMMARIES
from trsr.domains import DOMAIN_WORDS
from trsr.summarize.checks import UNGROUNDED, check_generation, instruction_grams, trim_to_sentence
from trsr.summarize.config import SummarizeConfig
from trsr.summarize.prompts import PromptSet
from trsr.summarize.segment import blocks_of
from trsr.summarize.state import HIERARCHICAL, MISSING, MODES, OK, PROMPT_TOO_LONG, RECURRENT, STATE, UNCHANGED

# Part of every summaries folder's fingerprint: raise it when a code change alters what
# the summarizer writes for the same settings and history, so that earlier summaries are
# recomputed instead of mixed with new ones (an --update then summarizes everyone again).
# 2: a node still flagged after its retry is left out of its merge / does not replace a
# clean recurrent summary.
BEHAVIOUR = 2


def steps_needed(mode: str, max_blocks: int, fan_in: int | None) -> int:
    """Levels (hierarchical) or steps (recurrent) for a history of `max_blocks` blocks.

    Hierarchical: level 0 summarizes blocks, each later level merges groups of
    `fan_in` nodes (None = all at once, the paper's single merge) until one is left.
    """
    if max_blocks <= 0:
        return 0
    if mode == RECURRENT:
        return max_blocks
    if max_blocks == 1:
        return 1
    if not fan_in or fan_in >= max_blocks:
        return 2
    levels, nodes = 1, max_blocks
    while nodes > 1:
        nodes = math.ceil(nodes / fan_in)
        levels += 1
    return levels


class Finalize:
    """Summarization state -> SUMMARIES rows (the last node is the user's summary)."""

    def __init__(self, mode: str, model: str, template_hash: str, seed: int):
        self.mode, self.model, self.template_hash, self.seed = mode, model, template_hash, seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        nodes = batch.column("nodes").to_pylist()
        problems = batch.column("node_problems").to_pylist()
        statuses = batch.column("status").to_pylist()
        summaries = [
            None if status in (MISSING, PROMPT_TOO_LONG) or not node else node[0]
            for node, status in zip(nodes, statuses)
        ]
        # The status describes the final summary: a clean final summary after a flagged
        # intermediate is usable (the intermediate's problem stays in `intermediates`).
        statuses = [
            status if status != OK or not problem else (problem[0] or OK)
            for status, problem in zip(statuses, problems)
        ]
        columns = {name: batch.column(name) for name in LISTS.names}
        columns.update(
            mode=pa.array([self.mode] * n, pa.string()),
            summary=pa.array(summaries, pa.string()),
            status=pa.array(statuses, pa.string()),
            intermediates=batch.column("intermediates"),
            items=batch.column("items"),
            first_position=batch.column("first_position"),
            last_position=pc.subtract(pc.add(batch.column("first_position"), batch.column("items")), 1).cast(pa.int32()),
            blocks=batch.column("block_count"),
            tokens_in=batch.column("tokens_in"),
            tokens_out=batch.column("tokens_out"),
            calls=batch.column("calls"),
            retries=batch.column("retries"),
            shortened_blocks=batch.column("shortened_blocks"),
            trimmed=batch.column("trimmed"),
            flagged_steps=batch.column("flagged_steps"),
            model=pa.array([self.model] * n, pa.string()),
            template_hash=pa.array([self.template_hash] * n, pa.string()),
            seed=pa.array([self.seed] * n, pa.int64()),
            refresh=batch.column("refresh"),
        )
        return pa.Table.from_pydict(columns, schema=SUMMARIES)


def retry_reminder(max_new_tokens: int, problem: str | None = None, items: str = "items") -> str:
    words = max(10, int(max_new_tokens * 0.5))
    if problem == UNGROUNDED:
        return f"\n\nAnswer in plain sentences, at most {words} words, using only what the {items} above show."
    return f"\n\nAnswer in plain sentences, at most {words} words, describing the user."


def _reused(row: dict, step: int, index: int) -> dict | None:
    for node in row.get("reuse") or ():
        if node["step"] == step and node["index"] == index:
            return node
    return None


@dataclass
class _Job:
    row: int  # index of the user in the batch
    slot: int  # position of the output in the user's next node list
    prompt: str
    source: str  # what the prompt inserted into its template (for the grounding check)


class SummarizeStage:
    """Runs levels/steps `steps` of `mode` for a batch of users, batched across users.

    One instance holds one engine. A job either maps one stage per level/step
    (`execution: per_step`) or one stage that carries a batch through every step
    (`execution: fused`); both give identical results.
    """

    def __init__(
        self, config: SummarizeConfig, mode: str, steps: list[int], seed: int = 0, engine=None
    ):
        if mode not in MODES:
            raise ValueError(f"unknown summarization mode {mode!r}; one of {MODES}")
        self.config = config
        self.mode = mode
        self.steps = list(steps)
        self.seed = seed
        self.prompts: PromptSet = config.prompts()
        self.instructions = instruction_grams(self.prompts.block, self.prompts.merge, self.prompts.update)
        if engine is None:
            from trsr.llm.factory import build_engine

            engine = build_engine(config.engine)
        self.engine = engine

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for step in self.steps:
            if self.mode == HIERARCHICAL:
                self._hierarchical_level(rows, step)
            else:
                self._recurrent_step(rows, step)
        return pa.Table.from_pylist(rows, schema=STATE)

    # -- hierarchical --------------------------------------------------------------
    def _hierarchical_level(self, rows: list[dict], level: int) -> None:
        jobs: list[_Job] = []
        next_nodes: dict[int, list[tuple | None]] = {}  # (text, problem) per node
        fan_in = self.config.fan_in
        for r, row in enumerate(rows):
            if row["status"] in (PROMPT_TOO_LONG, MISSING) or row["refresh"] == UNCHANGED:
                continue
            if level == 0:
                next_nodes[r] = [None] * len(row["blocks"])
                for k, block in enumerate(row["blocks"]):
                    jobs.append(_Job(r, k, self.prompts.block_prompt(block), block))
                continue
            nodes = row["nodes"]
            if len(nodes) <= 1:
                continue  # this user's tree is complete
            problems = row["node_problems"]
            groups = blocks_of(range(len(nodes)), fan_in if fan_in else len(nodes))
            next_nodes[r] = [None] * len(groups)
            for g, group in enumerate(groups):
                # A flagged node (empty, echo, ungrounded, ...) is left out of its merge
                # when the group has a clean one: one bad block summary does not spoil
                # the user's summary (its problem stays in `intermediates`).
                used = [i for i in group if problems[i] is None] or list(group)
                if len(used) == 1:
                    # A lone node moves up unchanged, with its problem.
                    next_nodes[r][g] = (nodes[used[0]], problems[used[0]])
                else:
                    texts = [nodes[i] for i in used]
                    jobs.append(_Job(r, g, self.prompts.merge_prompt(texts), "\n".join(texts)))
        self._run(rows, jobs, next_nodes, level)

    # -- recurrent -----------------------------------------------------------------
    def _recurrent_step(self, rows: list[dict], step: int) -> None:
        jobs: list[_Job] = []
        next_nodes: dict[int, list[tuple | None]] = {}  # (text, problem) per node
        earlier: dict[int, tuple] = {}  # the summary so far, kept if the update is flagged
        for r, row in enumerate(rows):
            if row["status"] in (PROMPT_TOO_LONG, MISSING) or row["refresh"] == UNCHANGED or step >= len(row["blocks"]):
                continue  # finished early: its summary stays as it is
            block = row["blocks"][step]
            if step == 0:
                prompt, source = self.prompts.block_prompt(block), block
            else:
                prompt = self.prompts.update_prompt(row["nodes"][0], block)
                source = row["nodes"][0] + "\n" + block
                earlier[r] = (row["nodes"][0], row["node_problems"][0])
            next_nodes[r] = [None]
            jobs.append(_Job(r, 0, prompt, source))
        self._run(rows, jobs, next_nodes, step)
        # A flagged update does not replace a clean summary: the user keeps the summary
        # so far (that block's items are then not in it; the flagged text stays in
        # `intermediates`). Applied to reused steps of an --update alike.
        for r, (text, problem) in earlier.items():
            if problem is None and rows[r]["node_problems"][0] is not None:
                rows[r]["nodes"], rows[r]["node_problems"] = [text], [None]

    # -- shared --------------------------------------------------------------------
    def _run(self, rows, jobs: list[_Job], next_nodes: dict[int, list], step: int) -> None:
        """Generate the jobs' summaries into their (text, problem) slots of next_nodes,
        then make next_nodes each user's nodes and node_problems."""
        taken = [_reused(rows[job.row], step, job.slot) for job in jobs]
        for job, node in zip(jobs, taken):
            if node is not None:  # an --update: the earlier run's summary of unchanged blocks
                next_nodes[job.row][job.slot] = (node["text"], node["problem"])
                rows[job.row]["intermediates"].append(dict(node))
        jobs = [job for job, node in zip(jobs, taken) if node is None]
        if jobs:
            outputs = self._generate_checked([job.prompt for job in jobs], [job.source for job in jobs])
            for job, (text, tokens_in, tokens_out, retried, trimmed, problem) in zip(jobs, outputs):
                row = rows[job.row]
                row["trimmed"] += int(trimmed)
                next_nodes[job.row][job.slot] = (text, problem)
                row["tokens_in"] += tokens_in
                row["tokens_out"] += tokens_out
                row["calls"] += 1 + int(retried)
                row["retries"] += int(retried)
                row["intermediates"].append({"step": step, "index": job.slot, "text": text, "problem": problem})
                row["flagged_steps"] += int(problem is not None)
        for r, nodes in next_nodes.items():
            rows[r]["nodes"] = [text for text, _ in nodes]
            rows[r]["node_problems"] = [problem for _, problem in nodes]

    def _generate_checked(self, prompts: list[str], sources: list[str]) -> list[tuple[str, int, int, bool, bool, str | None]]:
        """Generate; retry flagged outputs once; return (text, tokens in, tokens out,
        retried, trimmed, problem) per prompt."""
        from trsr.llm.chat import user_message

        generation_config = self.config.generation

        def check(generation, source: str) -> str | None:
            return check_generation(
                generation.text, self.instructions, generation.finish_reason, source, generation_config.min_shared_words
            )

        messages = [user_message(p) for p in prompts]
        first = self._generate(messages, generation_config.params(self.seed))
        chosen = list(first)
        tokens = [(g.prompt_tokens, g.output_tokens) for g in first]
        problems = [check(g, source) for g, source in zip(first, sources)]
        retry_index = [i for i, problem in enumerate(problems) if problem]
        if retry_index:
            # The retry samples and adds a reminder: most flagged outputs of small
            # models ran past the token limit or looped (a length reminder); an
            # ungrounded one is reminded to keep to the items.
            items = DOMAIN_WORDS[self.config.domain]["items"]
            second = self._generate(
                [
                    user_message(prompts[i] + retry_reminder(generation_config.max_new_tokens, problems[i], items))
                    for i in retry_index
                ],
                generation_config.retry_params(self.seed),
            )
            for i, generation in zip(retry_index, second):
                chosen[i] = generation
                tokens[i] = (tokens[i][0] + generation.prompt_tokens, tokens[i][1] + generation.output_tokens)
                problems[i] = check(generation, sources[i])
        out = []
        for i, generation in enumerate(chosen):
            text = generation.text.strip()
            trimmed = generation.finish_reason == "length"
            if trimmed:
                text = trim_to_sentence(text)
            out.append((text, tokens[i][0], tokens[i][1], i in retry_index, trimmed, problems[i]))
        return out

    def _generate(self, messages, params):
        batch_size = self.config.engine.batch_size
        out = []
        for start in range(0, len(messages), batch_size):
            out.extend(self.engine.generate(messages[start : start + batch_size], params))
        return out
