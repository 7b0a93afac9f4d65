"""Defaults a run chooses from what it can see, when the user leaves them unset.

The learning rate is the one hyper-parameter whose good value moves by orders of
magnitude with the model: a 0.1M-parameter toy model learns at 1e-3, a 1B model
fine-tunes at 1e-5. The rule (:func:`auto_lr`), calibrated at the small end by
``bench/defaults.py`` (every trainer, two toy tasks, beside a grid of tuned settings):

- full fine-tuning: ``lr = 1e-3 * sqrt(1e5 / N)`` for N parameters, kept within
  [1e-6, 1e-3] (1e-3 at 0.1M parameters and below, 1e-4 at 10M, 1e-5 at 1B, 3.8e-6 at 7B);
- LoRA (and QLoRA): ten times that, within [1e-5, 1e-3] (adapters train at a rate about
  ten times full fine-tuning's);
- ``train kto`` and ``train grpo``: 0.3 times the above (both over-optimised at the full
  rate on the flawed-demonstrator task).

Epochs left unset (:func:`auto_epochs`) are a base number of passes, or as many whole
epochs as make at least :data:`MIN_STEPS` optimizer steps when the base makes fewer (on a
few hundred examples, a few passes of batch 16 are too few updates to learn the copy task):

- three passes (transformers' ``num_train_epochs`` default) for the trainers that fit a
  likelihood: ``train sft``, ``train ilql`` (its policy term is an advantage-weighted
  likelihood), ``train grpo`` (an advantage-weighted likelihood ratio whose clip ends the
  push on a sample once its ratio leaves the clip range) and ``offline-rlhf rest``'s
  improve steps (the rule on each step's kept samples), and for ``train kto`` with its
  beta rule below. On the bench's tasks three passes beat one for sft on both, ILQL and
  GRPO on the flawed task and rest on the copy task (the others were level);
- one pass for those that fit a contrast whose loss keeps falling with every pass
  (:data:`CONTRASTS`: ``train dpo``, ``rm``): a reward model is commonly trained one epoch
  against over-fitting (InstructGPT).

``train dpo``'s and ``train kto``'s ``beta`` left unset (:func:`auto_beta`) is 0.1 (the
DPO and KTO papers' and TRL's value) when the run passes over its data once, and
:data:`BETA_REPEATED` (dpo 2.0, kto 1.0) when it passes over them more than once (the
:data:`MIN_STEPS` floor on a few hundred pairs, ``--epochs`` above 1, or a ``--max-steps``
beyond one pass): a stronger pull towards the reference against over-training on repeated
data. On the flawed-demonstrator task DPO's floor of six passes at beta 0.1 fell 8 points
short of the tuned best and 6.7 at 1.0 (means of three training seeds); at 2.0 the defaults
came within 3 points on both toy tasks at two task seeds. KTO at beta 0.1 lost 21 points
greedy on that task with three passes instead of one and gained 2 / 4 on the copy task;
at beta 1 three passes reach 93 / 91 and 81 / 27 greedy / sampled, against 72 / 65 and
56 / 12 for the old one-pass-at-0.1 defaults (docs/training.md).

An explicit ``lr``, ``epochs`` or ``beta`` always wins. The resolved value is what the run records (its
``config.json``, identity and summary) and the run's first line says what was chosen
and why, e.g. ``lr 0.001 (auto: full fine-tuning, 0.12M params)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .plan import steps_per_epoch

REFERENCE_PARAMS = 1e5     # where the bench calibrated the rate
REFERENCE_LR = 1e-3
FULL_RANGE = (1e-6, 1e-3)
LORA_FACTOR = 10.0
LORA_RANGE = (1e-5, 1e-3)

BASE_EPOCHS = 3           # epochs unset: transformers' num_train_epochs default, or one pass
CONTRASTS = ("dpo", "rm")  # for these trainers, ...
MIN_STEPS = 48            # ... or more whole passes, for at least this many optimizer steps
# KTO and GRPO over-optimised at the full rate on the flawed-demonstrator toy task
ALGORITHM_FACTOR = {"kto": 0.3, "grpo": 0.3}

BETA = 0.1                # beta unset, one pass (Rafailov et al. 2023, Ethayarajh et al. 2024; TRL)
BETA_REPEATED = {"dpo": 2.0, "kto": 1.0}   # ... more than one pass: a stronger pull to the reference


def beta_text(algorithm: str) -> str:
    """The beta rule, as ``--help`` states it."""
    return (f"unset: {BETA:g} when the run passes over its data once, {BETA_REPEATED[algorithm]:g} "
            "when more than once (docs/training.md)")


EPOCHS_TEXT = (f"unset: {BASE_EPOCHS} epochs (train sft, kto, ilql, grpo, rest's improve steps) or 1 (train "
               f"{', '.join(CONTRASTS)}), or as many whole epochs as make at least {MIN_STEPS} optimizer "
               "steps when those are fewer (docs/training.md)")
RULE_TEXT = ("unset: chosen by the model's parameter count N: full fine-tuning "
             "1e-3 * sqrt(1e5 / N) within [1e-6, 1e-3] (1e-5 at 1B); LoRA ten times that "
             "within [1e-5, 1e-3]; train kto and train grpo 0.3 times that (docs/training.md)")


def auto_lr(params: int, lora: bool, algorithm: str = "sft") -> float:
    """The learning rate the rule gives ``algorithm`` on a model of ``params`` parameters."""
    lr = REFERENCE_LR * math.sqrt(REFERENCE_PARAMS / max(params, 1))
    low, high = LORA_RANGE if lora else FULL_RANGE
    lr = min(high, max(low, lr * (LORA_FACTOR if lora else 1.0)))
    return float(lr * ALGORITHM_FACTOR.get(algorithm, 1.0))


def base_epochs(algorithm: str = "sft") -> int:
    """Passes over the data before the :data:`MIN_STEPS` floor: one for :data:`CONTRASTS`."""
    return 1 if algorithm in CONTRASTS else BASE_EPOCHS


def auto_epochs(examples: int, batch_size: int, algorithm: str = "sft") -> int:
    """Epochs when unset: :func:`base_epochs`, or enough whole epochs for :data:`MIN_STEPS` steps."""
    return max(base_epochs(algorithm), -(-MIN_STEPS // steps_per_epoch(examples, batch_size)))


def resolve_epochs(cfg, examples: int) -> str | None:
    """Set ``cfg.epochs`` by the rule when it is unset (and ``max_steps`` is 0); the line
    that says what was chosen and why."""
    if cfg.epochs is not None:
        return None
    algorithm = _algorithm(cfg)
    cfg.epochs = float(auto_epochs(examples, cfg.batch_size, algorithm))
    if cfg.max_steps:
        return None
    per_epoch = steps_per_epoch(examples, cfg.batch_size)
    why = (f"{per_epoch} steps of {cfg.batch_size} a pass, at least {MIN_STEPS} steps"
           if cfg.epochs > base_epochs(algorithm) else f"{per_epoch} steps of {cfg.batch_size} a pass")
    return f"epochs {cfg.epochs:g} (auto: {examples} examples, {why}; --epochs sets it)"


def passes(cfg, examples: int) -> float:
    """Passes over the data the run makes: its epochs, or ``max_steps`` in passes."""
    if cfg.max_steps:
        return cfg.max_steps / steps_per_epoch(examples, cfg.batch_size)
    return float(cfg.epochs)


def auto_beta(passes: float, algorithm: str = "dpo") -> float:
    """``train dpo``'s or ``train kto``'s beta when unset: :data:`BETA` for one pass over the
    data (or less), :data:`BETA_REPEATED` for more."""
    return BETA_REPEATED[algorithm] if passes > 1 else BETA


def beta_of(cfg) -> float:
    """A ``train dpo`` or ``train kto`` config's beta, which its trainer resolves once the data
    are read (:func:`resolve_beta`); an error that says so when a task is used before that."""
    if cfg.beta is None:
        name = _algorithm(cfg)
        raise ValueError(f"beta is unset: train_{name} chooses it (docs/training.md); set beta to use "
                         f"{name.upper()}Task outside train_{name}")
    return cfg.beta


def resolve_beta(cfg, examples: int) -> str | None:
    """Set an unset ``beta`` of ``train dpo`` or ``train kto`` by :func:`auto_beta` (after
    :func:`resolve_epochs`); the line that says what was chosen and why."""
    algorithm = _algorithm(cfg)
    if algorithm not in BETA_REPEATED or cfg.beta is not None:
        return None
    n = passes(cfg, examples)
    cfg.beta = auto_beta(n, algorithm)
    what = "pairs" if algorithm == "dpo" else "examples"
    return (f"beta {cfg.beta:g} (auto: {n:.3g} pass{'' if n == 1 else 'es'} over {examples} {what}; "
            "--beta sets it)")


def count_parameters(path) -> int:
    """Parameters in a model directory's safetensors weights, read from the file headers
    (no weights loaded). A LoRA adapter directory counts its base model."""
    from safetensors import safe_open

    from ..models import adapter_base
    p = Path(path)
    index = p / "model.safetensors.index.json"
    if index.exists():
        files = sorted({p / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (p / "model.safetensors").exists():
        files = [p / "model.safetensors"]
    else:
        base = adapter_base(p)
        return count_parameters(base) if base is not None else 0
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                total += math.prod(st.get_slice(k).get_shape())
    return total


def _algorithm(cfg) -> str:
    return type(cfg).__name__.removesuffix("TrainConfig").lower()     # DPOTrainConfig: dpo


def _size(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.2g}M"


def resolve_lr(cfg) -> str | None:
    """Set ``cfg.lr`` by the rule when it is unset; the line that says what was chosen and
    why (None when the user gave it)."""
    if cfg.lr is not None:
        return None
    n = count_parameters(cfg.policy)
    lora = bool(cfg.lora_r)
    algorithm = _algorithm(cfg)
    cfg.lr = auto_lr(n, lora, algorithm)
    kind = f"{'QLoRA' if cfg.bits else 'LoRA'} r={cfg.lora_r}" if lora else "full fine-tuning"
    factor = f", x{ALGORITHM_FACTOR[algorithm]:g} for {algorithm}" if algorithm in ALGORITHM_FACTOR else ""
    return f"lr {cfg.lr:.3g} (auto: {kind}, {_size(n)} params{factor}; --lr sets it)"
