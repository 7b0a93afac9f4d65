"""offline-rlhf: offline / batch preference optimisation of language models.

Two halves meet in Parquet shards: a batch generator (sample, score, reference
log-probs) and offline optimisers (DPO family, ILQL, ReST, reward model, SFT).
"""

__version__ = "0.1.0"
