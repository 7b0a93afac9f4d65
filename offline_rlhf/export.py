"""``offline-rlhf export CHECKPOINT OUT``: a training checkpoint as a transformers model.

A checkpoint (``OUTPUT/checkpoints/step-0000005/``, see :mod:`offline_rlhf.train.checkpoint`)
holds only the run's trainable weights (``trainable.safetensors``, plus
``extras.safetensors`` for ILQL heads) and ``state.json`` with the run's config. Export
loads the base policy the run started from (on CPU, unquantized), puts the trainable
weights in, and writes what ``OUTPUT/final/`` would have been at that step:

- full fine-tuning: ``OUT/`` is the model (safetensors) with the tokenizer;
- LoRA / QLoRA: ``OUT/`` is the adapter merged into the base (full precision) and
  ``OUT/adapter/`` the peft adapter (its ``base_model_name_or_path`` is the base's
  absolute path);
- ``train rm``: a one-label sequence classifier, what ``score`` loads;
- ILQL: the policy and its V/Q heads (``heads.safetensors`` + ``heads.json``) beside it.

``OUT/export.json`` records the source checkpoint, its step and the base policy.

Refused in one line before anything is written: a directory that is not a checkpoint, a
base policy that is missing or not the one the run trained (its fingerprint, where the
checkpoint records one; else the parameter names and shapes), an ``OUT`` that exists
and is not empty (without ``--overwrite``) or collides with an input. ``OUT`` is
written under a temporary name beside it and renamed, so it is complete or absent.

Layer: beside the trainers (it reads their checkpoint files and reuses their merge);
``evaluate`` and the CLI, above it, call it. Torch and transformers are imported only
where a model loads, so that :func:`is_checkpoint` serves the CLI's early path checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

from .config import opt
from .errors import InputError

STATE, TRAINABLE, EXTRAS, RECORD = "state.json", "trainable.safetensors", "extras.safetensors", \
    "export.json"
CHECKPOINT_HELP = "a training checkpoint directory: OUTPUT/checkpoints/step-0000005"


@dataclasses.dataclass
class ExportConfig:
    checkpoint: str = opt(help=CHECKPOINT_HELP)
    out: str = opt(help="the model directory to write (merged model; LoRA adapter in OUT/adapter)")
    policy: str | None = opt(None, "the base policy the run started from, when it has moved "
                             "(default: the policy recorded in the checkpoint's state.json)")
    overwrite: bool = opt(False, "replace OUT when it exists and is not empty")


@dataclasses.dataclass
class Checkpoint:
    """A checked training checkpoint: where it is, its state and what to load under it."""
    path: Path
    state: dict
    algorithm: str
    base: Path

    @property
    def config(self) -> dict:
        return self.state["config"]

    @property
    def lora(self) -> bool:
        return bool(self.config.get("lora_r"))

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))


def is_checkpoint(path) -> bool:
    """A directory holding a training checkpoint's state (cheap: no file is read)."""
    p = Path(path)
    return (p / STATE).is_file() and not (p / "config.json").exists()


# --------------------------------------------------------------------------- checks

def read_checkpoint(path, policy: str | None = None) -> Checkpoint:
    """The checkpoint at ``path`` with its base policy (``policy`` or the recorded one),
    checked: every file there, the base present and unchanged where that can be told
    without loading it. Anything else is one InputError line."""
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{path}: checkpoint directory not found")
    if not (p / STATE).is_file():
        raise InputError(f"{path}: not a training checkpoint (no {STATE}); checkpoints are "
                         "OUTPUT/checkpoints/step-NNNNNNN directories of a `train` run")
    state = _state(p)
    algorithm = _algorithm(state, p)
    for name in (TRAINABLE,) + ((EXTRAS,) if algorithm == "ilql" else ()):
        if not (p / name).is_file():
            raise InputError(f"{path}: incomplete checkpoint: no {name}")
    return Checkpoint(p, state, algorithm, _base(p, state, policy))


def _state(p: Path) -> dict:
    try:
        state = json.loads((p / STATE).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{p / STATE}: not valid JSON ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or \
            not isinstance(state["config"].get("policy"), str):
        raise InputError(f"{p / STATE}: not a checkpoint state (an object whose config names "
                         "the policy)")
    return state


def _algorithm(state: dict, p: Path) -> str:
    """The trainer that wrote ``state``: recorded, or the one whose own options the
    recorded config holds."""
    if isinstance(state.get("algorithm"), str):
        return state["algorithm"]
    from .train import ALGORITHMS
    from .train.loop import TrainConfig
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    keys = set(state["config"])
    fits = {}
    for name, (cls, _, _) in ALGORITHMS.items():
        own = {f.name for f in dataclasses.fields(cls)} - shared
        if own <= keys:
            fits[name] = len(own)
    if not fits:
        raise InputError(f"{p / STATE}: its config matches no training algorithm")
    return max(fits, key=fits.get)


def _recorded_fingerprint(state: dict) -> str | None:
    """The base policy's fingerprint, where the checkpoint records one."""
    for holder in (state, state.get("identity"), state.get("config")):
        if isinstance(holder, dict) and isinstance(holder.get("policy_fingerprint"), str):
            return holder["policy_fingerprint"]
    policy = (state.get("identity") or {}).get("policy")   # the run's identity (train/identity.py)
    if isinstance(policy, str) and policy.startswith("model:"):
        return policy[len("model:"):]
    return None


def _base(p: Path, state: dict, policy: str | None) -> Path:
    from .models import check_model_dir, fingerprint
    recorded = state["config"]["policy"]
    base = Path(policy or recorded)
    try:
        check_model_dir(base, "base policy")
    except InputError as e:
        how = "" if policy else f" (recorded in {STATE}; give the moved base with --policy)"
        raise InputError(f"{p}: {e}{how}") from None
    want = _recorded_fingerprint(state)
    have = fingerprint(base) if want is not None else None
    if have != want:
        raise InputError(f"{p}: base policy {base} is not the one this run trained (fingerprint "
                         f"{have[:12]}, recorded {want[:12]}); give the run's base with --policy")
    return base.resolve()


def check_out(out, inputs: dict, overwrite: bool) -> Path:
    """Refuse an OUT that is a file, is a non-empty directory (without ``overwrite``), or
    collides with an input (the same, inside it, or holding it)."""
    target = Path(out).resolve()
    if Path(out).is_symlink() or target.is_file():
        raise InputError(f"{out}: exists and is not a directory")
    for name, value in inputs.items():
        src = Path(value).resolve()
        if target == src or src in target.parents or target in src.parents:
            raise InputError(f"{out}: collides with the {name} {value}; export to another path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise InputError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    return target


# --------------------------------------------------------------------------- loading

def _load_trainable(module, file: Path, base: Path, what: str = "trainable weights") -> None:
    """Copy a checkpoint's tensors into ``module``'s trainable parameters; names, shapes
    and count must match exactly (else the base is not the run's)."""
    import torch
    from safetensors.torch import load_file
    state = load_file(str(file))
    params = {n: q for n, q in module.named_parameters() if q.requires_grad}
    differ = sorted(set(state) ^ set(params))
    differ += sorted(n for n in set(state) & set(params) if state[n].shape != params[n].shape)
    if differ:
        raise InputError(f"{file.parent}: the {what} do not fit the base policy {base} "
                         f"(first differing parameter: {differ[0]}); give the run's base with "
                         "--policy")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def _lora_spec(cfg: dict):
    from .models import LoraSpec
    return LoraSpec(r=cfg["lora_r"], alpha=cfg.get("lora_alpha", 32),
                    dropout=cfg.get("lora_dropout", 0.0),
                    target_modules=cfg.get("lora_target_modules") or "all-linear")


def load_model(ck: Checkpoint):
    """The run's model at the checkpoint's step, on CPU: a peft model for LoRA (on an
    unquantized float32 base), else a transformers model in the run's dtype."""
    import torch

    from .models import load_policy
    cfg = ck.config
    dtype = "float32" if ck.lora or cfg.get("dtype", "auto") == "auto" else cfg["dtype"]
    kw = dict(dtype=dtype, bits=None, lora=_lora_spec(cfg) if ck.lora else None, device="cpu",
              train=False, trust_remote_code=bool(cfg.get("trust_remote_code", False)))
    torch.manual_seed(int(cfg.get("seed", 0)))
    if ck.algorithm == "rm":
        from .train.rm import load_reward_for_training
        model = load_reward_for_training(str(ck.base), **kw)
    else:
        model = load_policy(str(ck.base), **kw)
    _load_trainable(model, ck.path / TRAINABLE, ck.base)
    return model


def load_heads(ck: Checkpoint, model):
    """ILQL's V/Q heads from ``extras.safetensors``, target Q heads included."""
    from safetensors.torch import load_file

    from .ilql import ILQLHeads
    heads = ILQLHeads(model.config.hidden_size, model.config.vocab_size,
                      bool(ck.config.get("two_qs", True)))
    state = load_file(str(ck.path / EXTRAS))
    missing = sorted(set(heads.state_dict()) - set(state))
    if missing and all(n.startswith("target_") for n in missing):
        raise InputError(f"{ck.path}: the checkpoint's ILQL heads lack their target Q heads "
                         f"({missing[0]}, ...), which value-guided decoding uses; export "
                         "OUTPUT/final of a finished run instead")
    _load_trainable(heads.requires_grad_(True), ck.path / EXTRAS, ck.base, "ILQL heads")
    return heads


# --------------------------------------------------------------------------- writing

def checkpoint_key(path) -> str:
    """What identifies a checkpoint's content cheaply: its state and its weight files'
    sizes and modification times."""
    p = Path(path)
    h = hashlib.sha256((p / STATE).read_bytes())
    for name in (TRAINABLE, EXTRAS):
        if (p / name).exists():
            st = (p / name).stat()
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _write(ck: Checkpoint, tmp: Path) -> None:
    from .models import load_tokenizer
    from .train.checkpoint import merge_adapter
    trust = bool(ck.config.get("trust_remote_code", False))
    model = load_model(ck)
    tokenizer = load_tokenizer(ck.base, trust, padding_side="right")
    if ck.lora:
        model.save_pretrained(tmp / "adapter", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "adapter")
        merge_adapter(ck.base, tmp / "adapter", tmp, trust, model)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if ck.algorithm == "ilql":
        from .ilql import save_heads
        save_heads(load_heads(ck, model), tmp)
    record = {"checkpoint": str(ck.path.resolve()), "step": ck.step, "algorithm": ck.algorithm,
              "lora": ck.lora, "base_policy": str(ck.base),
              "checkpoint_key": checkpoint_key(ck.path)}
    (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")


def _commit(tmp: Path, target: Path) -> None:
    """Put ``tmp`` at ``target``: a rename (an empty directory there is replaced by it);
    a non-empty one is moved aside first and removed after."""
    old = None
    if target.is_dir() and any(target.iterdir()):
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(checkpoint, out, policy: str | None = None, overwrite: bool = False) -> dict:
    """Write the model of ``checkpoint`` to ``out`` (see the module docstring); return
    what ``OUT/export.json`` records."""
    ck = read_checkpoint(checkpoint, policy)
    target = check_out(out, {"checkpoint": ck.path, "base policy": ck.base}, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.export-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write(ck, tmp)
        _commit(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return json.loads((target / RECORD).read_text())


def exported(checkpoint, out) -> tuple[Path, bool]:
    """``checkpoint`` exported to ``out``, reused when ``out`` already holds this
    checkpoint's export (eval's cache); and whether it was exported now."""
    target = Path(out)
    try:
        record = json.loads((target / RECORD).read_text())
    except (OSError, ValueError):
        record = {}
    if record.get("checkpoint_key") == checkpoint_key(checkpoint):
        return target, False
    export_checkpoint(checkpoint, target, overwrite=True)
    return target, True


def run_export(cfg: ExportConfig) -> dict:
    return export_checkpoint(cfg.checkpoint, cfg.out, cfg.policy, cfg.overwrite)
