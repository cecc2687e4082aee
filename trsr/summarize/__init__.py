"""Preference summarization: a frozen LLM turns each user's history into a summary.

    prompts       templates per domain (news, shopping, generic), overridable from a file
    segment       history -> blocks of N items, with a token-budget guard
    hierarchical  block summaries, then merges of `fan_in` nodes per level up to one
    recurrent     summary of block 1, then update(summary, block t) for t = 2..T
    stages        the per-level / per-step batch stages Ray Data runs (no Ray inside)
    job           wiring: read prepared data, run the stages on Ray Data, write Parquet
"""
