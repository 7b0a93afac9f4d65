"""Trainers: the one loop (loop.py) and, per algorithm, a config, a task and a run function.

``ALGORITHMS`` is the explicit name -> (config class, run function, help) table that the
CLI and pipelines use; there is no plugin registry.
"""

from __future__ import annotations

from .dpo import DPOTrainConfig, train_dpo
from .grpo import GRPOTrainConfig, train_grpo
from .ilql import ILQLTrainConfig, train_ilql
from .kto import KTOTrainConfig, train_kto
from .rm import RMTrainConfig, train_rm
from .sft import SFTTrainConfig, train_sft

ALGORITHMS = {
    "dpo": (DPOTrainConfig, train_dpo, "DPO family on pairs: every TRL loss_type (sigmoid, ipo, "
            "apo_zero, ...) plus cdpo and simpo, combinable (MPO)"),
    "kto": (KTOTrainConfig, train_kto, "KTO on unpaired feedback: scored generations (labels from the "
            "reward), pairs, or a TRL prompt/completion/label file"),
    "rm": (RMTrainConfig, train_rm, "Bradley-Terry reward model on pairs (what `score` loads)"),
    "ilql": (ILQLTrainConfig, train_ilql, "ILQL (implicit language Q-learning) on scored generations; "
             "saves V/Q heads for value-guided decoding"),
    "sft": (SFTTrainConfig, train_sft, "NLL on answer tokens: filtered generations (rejection "
            "sampling), or a file in a TRL layout (prompt/completion, messages, text; text or chat)"),
    "grpo": (GRPOTrainConfig, train_grpo, "off-policy group policy gradient (GRPO, Dr. GRPO, RLOO, "
             "REINFORCE++-baseline) on scored generations, against their stored behaviour log-probs"),
}
