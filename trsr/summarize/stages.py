"""The batch stages of summarization: plain classes over Arrow batches (no Ray inside).

Each row is one ranking list's user and its summarization state (STATE), carried from
step to step: the list's columns, items, blocks (numbered item text per block), nodes
(summaries of the current level, or [the running summary]), intermediates (every
summary made so far with its level/step and index), tokens_in, tokens_out, calls,
retries, status.

`RenderBlocks` (CPU, tokenizer only) cuts each history into blocks and fits them to
the token budget. `SummarizeStage` runs one or more hierarchical levels or recurrent
steps for a whole batch of users with one batched engine call per level/step.
`Finalize` turns the state into SUMMARIES rows. A job hands these classes to the stage
runner (trsr.runner); a unit test calls them directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from trsr.schema import ALL_USERS, INTERMEDIATE, LISTS, SUMMARIES, SUMMARY_MISSING, SUMMARY_OK
from trsr.summarize.checks import check_generation, instruction_grams, trim_to_sentence
from trsr.summarize.config import SummarizeConfig
from trsr.summarize.prompts import PromptSet
from trsr.summarize.segment import MIN_CHARS, PromptTooLong, blocks_of, fit_prompt, render_items, scaled_caps

HIERARCHICAL = "hierarchical"
RECURRENT = "recurrent"
MODES = (HIERARCHICAL, RECURRENT)

OK, MISSING = SUMMARY_OK, SUMMARY_MISSING  # missing: not summarized (beyond summarize.max_users)
PROMPT_TOO_LONG = "prompt_too_long"

# The summarization state of one ranking list's user, carried from step to step: the
# list's own columns (passed through to the summaries) and the work so far.
STATE = pa.schema(
    list(LISTS)
    + [
        pa.field("items", pa.int32()),  # items covered (the window of the history)
        pa.field("first_position", pa.int32()),  # position of the first covered item
        pa.field("blocks", pa.list_(pa.string())),  # numbered item lines per block
        pa.field("nodes", pa.list_(pa.string())),  # summaries of the current level / [running summary]
        pa.field("node_problems", pa.list_(pa.string())),  # the checks' verdict on each node (null: none)
        pa.field("intermediates", pa.list_(INTERMEDIATE)),
        pa.field("tokens_in", pa.int64()),
        pa.field("tokens_out", pa.int64()),
        pa.field("calls", pa.int32()),
        pa.field("retries", pa.int32()),
        pa.field("shortened_blocks", pa.int32()),
        pa.field("trimmed", pa.int32()),
        pa.field("flagged_steps", pa.int32()),
        # ok / missing / prompt_too_long; Finalize turns ok into the final node's problem.
        pa.field("status", pa.string()),
        pa.field("block_count", pa.int32()),  # blocks of the covered history
        # Summaries of an earlier run this run takes instead of generating them
        # (`--update`: the nodes over unchanged blocks), and what this run is for the
        # user: new / updated / recomputed / unchanged (see SUMMARIES.refresh).
        pa.field("reuse", pa.list_(INTERMEDIATE)),
        pa.field("refresh", pa.string()),
    ]
)
NEW, UPDATED, RECOMPUTED, UNCHANGED = "new", "updated", "recomputed", "unchanged"


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


class RenderBlocks:
    """Ranking lists (LISTS rows) -> the state of each user: history item ids -> blocks
    of numbered item lines that fit the prompt budget.

    The budget reserves room for the generated text and, for recurrent updates, for
    the previous summary, so every later prompt built from these blocks fits too.
    `caps` (split -> lists to summarize, None = all): a list whose list_index is at or
    beyond its split's cap is passed on unsummarized (status "missing").

    Input rows are ranking lists (LISTS) or users (SEQUENCES: user_id, item_ids; the
    summarize.users "all" path), which become list-shaped rows (`lists_of_users`).
    `config.history_window` (blocks) keeps the last whole blocks of a history, anchored
    at absolute positions, so that new interactions only change the last block.
    """

    def __init__(self, config: SummarizeConfig, items, caps: dict[str, int | None] | None = None, mode: str | None = None):
        from trsr.data.catalogue import Catalogue
        from trsr.llm.chat import count_tokens, load_tokenizer, render_chat, user_message

        self.config = config
        self.caps = caps or {}
        self.mode = mode  # what the reusable summaries of an --update are (None: no update)
        # A path (items.parquet) lets each Ray actor load the catalogue itself.
        self.items = Catalogue.load(items) if isinstance(items, str) else Catalogue.from_mapping(items)
        self.prompts = config.prompts()
        tokenizer = load_tokenizer(config.engine.model)
        self._count_many = lambda texts: count_tokens(
            tokenizer, [render_chat(tokenizer, user_message(text)) for text in texts]
        )
        self._counted: dict[str, int] = {}
        generated = config.generation.max_new_tokens
        self.budget = config.engine.max_model_len - 2 * generated
        # The longest previous summary an update prompt can carry: max_new_tokens.
        self._placeholder_summary = " ".join(["word"] * generated)
        self.attribute_names = self.items.attribute_names

    def __call__(self, batch: pa.Table) -> pa.Table:
        previous = batch.column("previous").to_pylist() if "previous" in batch.column_names else [None] * batch.num_rows
        if "item_ids" in batch.column_names:
            batch = lists_of_users(batch)
        lists = batch.select(LISTS.names).to_pylist()
        todo = [row for row, earlier in zip(lists, previous) if not self._beyond_cap(row) and not self._unchanged(row, earlier)]
        self._count_full_size(todo)
        rows = []
        for row, earlier in zip(lists, previous):
            if self._beyond_cap(row):
                state = new_state(row)
                state["status"] = MISSING
                rows.append(state)
            elif self._unchanged(row, earlier):
                rows.append(kept_state(row, earlier))
            else:
                state = self.render_user(row)
                if earlier is not None:
                    reuse = reusable(earlier, state, self.config.items_per_block, self.config.fan_in, self.mode)
                    state["reuse"] = reuse or []
                    state["refresh"] = UPDATED if reuse else RECOMPUTED
                rows.append(state)
        self._counted = {}
        return pa.Table.from_pylist(rows, schema=STATE)

    def _unchanged(self, row: dict[str, Any], earlier: dict[str, Any] | None) -> bool:
        """The earlier run's row stands: same history (the settings were checked to be
        the same before the stage started)."""
        return earlier is not None and list(earlier["history"]) == list(row["history"])

    def _beyond_cap(self, row: dict[str, Any]) -> bool:
        cap = self.caps.get(row["split"])
        return cap is not None and row["list_index"] >= cap

    def _count(self, text: str) -> int:
        if text not in self._counted:
            self._counted[text] = self._count_many([text])[0]
        return self._counted[text]

    def _count_full_size(self, rows: list[dict[str, Any]]) -> None:
        """Count every block's prompt at full-size item texts in one tokenizer call:
        most blocks fit as they are, and one batched call is several times cheaper than
        one call per block. Blocks that do not fit are shortened one by one after."""
        caps = scaled_caps(self.attribute_names, self.config.item_max_chars, self.config.attribute_max_chars, 1.0, MIN_CHARS)
        prompts = []
        for row in rows:
            if self.items.missing(row["history"]):
                continue  # render_user raises for it
            for block in blocks_of(row["history"], self.config.items_per_block):
                prompts.append(self.prompts.update_prompt(self._placeholder_summary, render_items(self.items.attributes(block), caps)))
        unique = [p for p in dict.fromkeys(prompts) if p not in self._counted]
        if unique:
            self._counted.update(zip(unique, self._count_many(unique)))

    def render_user(self, row: dict[str, Any]) -> dict[str, Any]:
        history = row["history"]
        missing = self.items.missing(history)
        if missing:
            # Prepared data only holds catalogue items; this guards hand-made inputs.
            raise KeyError(f"user {row['user_id']}: history item(s) {missing[:5]} not in items.parquet")
        state = new_state(row, window_start(len(history), self.config.items_per_block, self.config.history_window))
        if not history:
            state["status"] = MISSING  # nothing to summarize
            return state
        blocks = []
        for block in blocks_of(history[state["first_position"] :], self.config.items_per_block):
            attributes = self.items.attributes(block)

            def build(caps, attributes=attributes) -> str:
                return self.prompts.update_prompt(self._placeholder_summary, render_items(attributes, caps))

            try:
                _, _, caps, shortened = fit_prompt(
                    build,
                    self._count,
                    self.budget,
                    self.attribute_names,
                    self.config.item_max_chars,
                    self.config.attribute_max_chars,
                )
            except PromptTooLong:
                state["status"] = PROMPT_TOO_LONG
                state["blocks"] = []
                return state
            blocks.append(render_items(attributes, caps))
            state["shortened_blocks"] += int(shortened)
        state["blocks"] = blocks
        state["block_count"] = len(blocks)
        return state


def kept_state(row: dict[str, Any], earlier: dict[str, Any]) -> dict[str, Any]:
    """The state that writes an earlier SUMMARIES row again as it was ("unchanged"):
    no blocks, so no step generates anything for it."""
    state = new_state(row, earlier["first_position"] or 0)
    state.update(
        items=earlier["items"],
        nodes=[earlier["summary"]] if earlier["summary"] is not None else [],
        node_problems=[None] if earlier["summary"] is not None else [],
        intermediates=earlier["intermediates"] or [],
        status=earlier["status"],
        block_count=earlier["blocks"],
        refresh=UNCHANGED,
    )
    for name in ("tokens_in", "tokens_out", "calls", "retries", "shortened_blocks", "trimmed", "flagged_steps"):
        state[name] = earlier[name]
    return state


def reusable(earlier: dict[str, Any], state: dict[str, Any], items_per_block: int, fan_in: int | None, mode: str | None) -> list[dict]:
    """The earlier run's summaries that a run over the new history would generate again
    unchanged: those whose prompts depend only on blocks the new history shares with the
    old one. The new history must extend the old (same items, same window start);
    blocks before the first one that changed (the old last block when it was partial,
    else the first new one) are shared. A hierarchical node at level l, index i covers
    blocks [i*f^l, (i+1)*f^l) (f = fan_in; with one merge of all, only level 0 is
    reusable); a recurrent step s covers blocks [0, s]. [] when nothing can be reused."""
    old, new = list(earlier["history"]), list(state["history"])
    start = earlier["first_position"] or 0
    if mode is None or start != state["first_position"] or len(new) < len(old) or new[: len(old)] != old:
        return []
    shared = (len(old) - start) // items_per_block  # whole blocks before the first changed one
    out = []
    for node in earlier["intermediates"] or []:
        step, index = node["step"], node["index"]
        if mode == RECURRENT:
            covered_end = step + 1
        elif step == 0:
            covered_end = index + 1
        elif fan_in:
            covered_end = (index + 1) * fan_in**step
        else:
            continue  # the single merge covers every block
        if covered_end <= shared:
            out.append(node)
    return out


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


def retry_reminder(max_new_tokens: int) -> str:
    words = max(10, int(max_new_tokens * 0.5))
    return f"\n\nAnswer in plain sentences, at most {words} words, describing the user."


def window_start(items: int, items_per_block: int, window: int | None) -> int:
    """Position of the first item a summary covers: the start of the `window`-th block
    from the end (None: 0). Blocks are anchored at position 0, so the window moves a
    whole block at a time and never shifts a block's boundaries."""
    if window is None:
        return 0
    blocks = math.ceil(items / items_per_block)
    return max(0, blocks - window) * items_per_block


def lists_of_users(batch: pa.Table) -> pa.Table:
    """SEQUENCES rows (user_id, item_ids) -> LISTS rows: one per user, keyed by user_id,
    split "all", the whole history and no candidates."""
    n = batch.num_rows
    users = batch.column("user_id").cast(pa.string())
    return pa.Table.from_arrays(
        [
            users,
            pa.array([ALL_USERS] * n, pa.string()),
            users,
            pa.array([0] * n, pa.int32()),
            batch.column("item_ids").cast(pa.list_(pa.string())),
            pa.array([[]] * n, pa.list_(pa.string())),
            pa.array([[]] * n, pa.list_(pa.int8())),
        ],
        schema=LISTS,
    )


def new_state(row: dict[str, Any], first_position: int = 0) -> dict[str, Any]:
    """The empty state of a LISTS row (its columns carried along) covering its history
    from `first_position` on."""
    state = {name: row[name] for name in LISTS.names}
    state.update(
        items=len(row["history"]) - first_position,
        first_position=first_position,
        blocks=[],
        nodes=[],
        node_problems=[],
        intermediates=[],
        tokens_in=0,
        tokens_out=0,
        calls=0,
        retries=0,
        shortened_blocks=0,
        trimmed=0,
        flagged_steps=0,
        status=OK,
        block_count=0,
        reuse=[],
        refresh=NEW,
    )
    return state


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
                    jobs.append(_Job(r, k, self.prompts.block_prompt(block)))
                continue
            nodes = row["nodes"]
            if len(nodes) <= 1:
                continue  # this user's tree is complete
            size = fan_in if fan_in else len(nodes)
            groups = blocks_of(nodes, size)
            next_nodes[r] = [None] * len(groups)
            for g, group in enumerate(groups):
                if len(group) == 1:
                    # A lone node moves up unchanged, with its problem.
                    next_nodes[r][g] = (group[0], row["node_problems"][g * size])
                else:
                    jobs.append(_Job(r, g, self.prompts.merge_prompt(group)))
        self._run(rows, jobs, next_nodes, level)

    # -- recurrent -----------------------------------------------------------------
    def _recurrent_step(self, rows: list[dict], step: int) -> None:
        jobs: list[_Job] = []
        next_nodes: dict[int, list[tuple | None]] = {}  # (text, problem) per node
        for r, row in enumerate(rows):
            if row["status"] in (PROMPT_TOO_LONG, MISSING) or row["refresh"] == UNCHANGED or step >= len(row["blocks"]):
                continue  # finished early: its summary stays as it is
            block = row["blocks"][step]
            if step == 0:
                prompt = self.prompts.block_prompt(block)
            else:
                prompt = self.prompts.update_prompt(row["nodes"][0], block)
            next_nodes[r] = [None]
            jobs.append(_Job(r, 0, prompt))
        self._run(rows, jobs, next_nodes, step)

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
            outputs = self._generate_checked([job.prompt for job in jobs])
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

    def _generate_checked(self, prompts: list[str]) -> list[tuple[str, int, int, bool, bool, str | None]]:
        """Generate; retry flagged outputs once; return (text, tokens in, tokens out,
        retried, trimmed, problem) per prompt."""
        from trsr.llm.chat import user_message

        messages = [user_message(p) for p in prompts]
        first = self._generate(messages, self.config.generation.params(self.seed))
        chosen = list(first)
        tokens = [(g.prompt_tokens, g.output_tokens) for g in first]
        problems = [check_generation(g.text, self.instructions, g.finish_reason) for g in first]
        retry_index = [i for i, problem in enumerate(problems) if problem]
        if retry_index:
            # The retry samples and adds a length reminder: most flagged outputs of
            # small models ran past the token limit or looped.
            reminder = retry_reminder(self.config.generation.max_new_tokens)
            second = self._generate(
                [user_message(prompts[i] + reminder) for i in retry_index],
                self.config.generation.retry_params(self.seed),
            )
            for i, generation in zip(retry_index, second):
                chosen[i] = generation
                tokens[i] = (tokens[i][0] + generation.prompt_tokens, tokens[i][1] + generation.output_tokens)
                problems[i] = check_generation(generation.text, self.instructions, generation.finish_reason)
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
