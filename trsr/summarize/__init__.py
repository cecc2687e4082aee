"""Preference summarization: a frozen LLM turns each user's history into a summary.

    config        the `summarize` section
    prompts       templates per domain (words from trsr.domains), overridable from a file
    segment       history -> blocks of N items, with a token-budget guard
    checks        a summary's problems (empty, echo, over-length) and its sentence cut
    state         the per-user state rows carried from step to step, and the statuses
    render        RenderBlocks: history -> token-fitted blocks (CPU actor)
    stages        SummarizeStage (hierarchical levels: block summaries, then merges of
                  `fan_in` nodes; recurrent steps: update(summary, block t)), Finalize
    refresh       --update: reuse the summaries of unchanged blocks
    job           wiring: the runner's StageJob per mode (read Parquet, stages, write)
"""
