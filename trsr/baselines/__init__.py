"""Classic recommenders over item text embeddings, on the LLM methods' own protocol.

`run_baselines(config, context)` (trsr.baselines.job) trains NCF, DIN, DIEN, GRU4Rec, NARM,
SASRec, CORE, popularity and random on the training split and writes their scores of
the 1:20 lists in the LLM scorer's schema. See README.md, section Baselines.
"""
