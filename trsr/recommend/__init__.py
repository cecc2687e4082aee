"""The LLM recommender: the five-part prompt of the paper (Figure 8) and yes/no scoring.

`trsr.recommend.prompt` builds the prompt (instruction, preference summary, recent
items, candidate, answer) and guards its length; `trsr.recommend.score` scores ranking
lists with p(yes) through an engine, one shared user prefix per list;
`trsr.recommend.config` holds the `score` section of an experiment.
"""
