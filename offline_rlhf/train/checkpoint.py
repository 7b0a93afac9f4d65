"""Checkpoints with exact resume, metrics logging, and the final save.

A checkpoint ``OUTPUT/checkpoints/step-0000012/`` holds the trainable weights
(safetensors), the optimizer and scheduler state, every process's RNG state, the
step (which fixes the data position: the plan is a function of seed and step) and the
run's identity (``identity.py``: a run resumes only a checkpoint of an identical run). It is
written under a temporary name and renamed, so a kill never leaves a half checkpoint
looking complete. Our own ``.pt`` files are read with ``weights_only=True``.

The final save is ``OUTPUT/final/`` (a full transformers model directory; for LoRA the
adapter merged into the base) and, for LoRA, ``OUTPUT/adapter/`` (a peft adapter).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import to_dict
from ..errors import InputError

CKPT_DIR = "checkpoints"


def _trainable_state(module, everything: bool = False) -> dict[str, torch.Tensor]:
    """The parameters training changes (``everything``: all of them, e.g. ILQL's target Q
    heads, which follow the trained heads by Polyak averaging without a gradient)."""
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters()
            if p.requires_grad or everything}


def find_resume(out: Path, resume: str) -> Path | None:
    if resume == "never":
        return None
    if resume != "auto":
        p = Path(resume)
        if not (p / "state.json").is_file():
            raise InputError(f"{resume}: not a checkpoint directory (no state.json)")
        return p
    root = out / CKPT_DIR
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def save(out: Path, step: int, acc, model, optimizer, scheduler, extras, cfg,
         identity: dict | None = None) -> Path:
    root = out / CKPT_DIR
    final, tmp = root / f"step-{step:07d}", root / f".step-{step:07d}.tmp"
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / f"rng-{acc.process_index}.pt")
    if acc.is_main_process:
        save_file(_trainable_state(acc.unwrap_model(model)), tmp / "trainable.safetensors")
        if extras is not None:
            save_file(_trainable_state(acc.unwrap_model(extras), everything=True),
                      tmp / "extras.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(
            {"step": step, "num_processes": acc.num_processes, "config": to_dict(cfg),
             "identity": identity}, indent=1))
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        kept = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in kept[:-max(1, cfg.save_total_limit)]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _load_into(module, path: Path, everything: bool = False) -> None:
    state = load_file(str(path))
    params = dict(module.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad or everything}
    if wanted != set(state):
        extra = sorted(set(state) - wanted) or sorted(wanted - set(state))
        raise InputError(f"{path}: checkpoint does not match the model being trained "
                         f"(first differing parameter: {extra[0]})")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def load_pt(path: Path):
    """One of our own ``.pt`` state files, read with ``weights_only=True``: anything
    beyond tensors and plain containers (a pickled object could run code) is refused
    in one line naming the file."""
    import pickle
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines()
                       if "GLOBAL" in line or "Unsupported" in line), "not plain tensors")
        raise InputError(f"{path}: refused: the file holds pickled objects, not only tensors "
                         f"({detail}); it was not written by this package: delete this "
                         "checkpoint to resume from an earlier one") from None


def load(path: Path, acc, model, optimizer, scheduler, extras) -> dict:
    state = json.loads((path / "state.json").read_text())
    if state["num_processes"] != acc.num_processes:
        # The plan does not depend on the process count, but RNG streams are per process.
        acc.print(f"note: checkpoint was written by {state['num_processes']} processes, "
                  f"resuming with {acc.num_processes}")
    _load_into(acc.unwrap_model(model), path / "trainable.safetensors")
    if extras is not None:
        _load_into(acc.unwrap_model(extras), path / "extras.safetensors", everything=True)
    optimizer.load_state_dict(load_pt(path / "optimizer.pt"))
    scheduler.load_state_dict(load_pt(path / "scheduler.pt"))
    rng_file = path / f"rng-{acc.process_index}.pt"
    if rng_file.exists():
        rng = load_pt(rng_file)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    acc.print(f"resumed from {path} at step {state['step']}")
    return {"step": state["step"]}


TRACKERS_HELP = ("experiment trackers, comma-separated (accelerate's): tensorboard (under "
                 "OUTPUT/tensorboard), wandb, mlflow, trackio, aim, comet_ml, clearml, dvclive, "
                 "swanlab; or none. OUTPUT/metrics.jsonl is always written")


def resolve_trackers(report_to: str) -> list[str]:
    """The tracker names of ``report_to``; an unknown or uninstalled one is refused."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    names = [x.strip() for x in report_to.split(",") if x.strip()]
    if names == ["none"] or not names:
        return []
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise InputError(f"report_to: unknown tracker {name!r} (known: "
                             f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}, or none)")
        if name not in available:
            raise InputError(f"report_to: {name} is requested but its package is not installed "
                             f"(pip install {name}, or choose another with --report-to)")
    return list(dict.fromkeys(names))


class MetricsLogger:
    """Per-step metrics to OUTPUT/metrics.jsonl and to the accelerate trackers that
    ``acc`` was made with (main process only).

    On resume, records past the resumed step (from the killed run) are dropped, from the
    JSONL file and (``purge_step``) from TensorBoard."""

    def __init__(self, out: Path, acc, start_step: int, config: dict | None = None):
        self.acc, self.main = acc, acc.is_main_process
        self.path = out / "metrics.jsonl"
        if acc.log_with:
            init = {"tensorboard": {"purge_step": start_step + 1}} if start_step else {}
            acc.init_trackers("offline-rlhf", config=_flat(config or {}), init_kwargs=init)
        if not self.main:
            return
        out.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if self.acc.log_with:
            self.acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))
                          and not isinstance(v, bool) and k not in ("step", "epoch")},
                         step=record["step"])
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _flat(config: dict) -> dict:
    """Hyper-parameters as trackers take them: scalars, everything else as JSON text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
            for k, v in config.items() if v is not None}


def save_final(cfg, acc, model, tokenizer, out: Path, extras=None) -> None:
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return
    unwrapped = acc.unwrap_model(model)
    final = out / "final"
    if cfg.lora_r:
        unwrapped.save_pretrained(out / "adapter", safe_serialization=True)
        tokenizer.save_pretrained(out / "adapter")
        if cfg.save_merged:
            merge_adapter(cfg.policy, out / "adapter", final, cfg.trust_remote_code, unwrapped)
            tokenizer.save_pretrained(final)
    else:
        unwrapped.save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)
    if extras is not None:
        from ..ilql import save_heads
        save_heads(acc.unwrap_model(extras), final)


def merge_adapter(base_path, adapter_dir: Path, out: Path, trust_remote_code: bool = False,
                  trained=None) -> None:
    """Load the base in full precision on CPU, apply the adapter, merge, save."""
    import peft
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    task = getattr(getattr(trained, "peft_config", {}).get("default", None), "task_type", None)
    kw = dict(dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code)
    if str(task).endswith("SEQ_CLS"):  # a reward model: the same one-label head as in training
        config = copy.deepcopy(trained.base_model.model.config)
        if hasattr(config, "quantization_config"):   # QLoRA: the merged model is unquantized
            del config.quantization_config
        kw["config"] = config
        base = AutoModelForSequenceClassification.from_pretrained(str(base_path), **kw)
    else:
        base = AutoModelForCausalLM.from_pretrained(str(base_path), **kw)
    from ..models import quiet_peft
    with quiet_peft():
        merged = peft.PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
