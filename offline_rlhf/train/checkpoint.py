"""Checkpoints with exact resume, metrics logging, and the final save.

A checkpoint ``OUTPUT/checkpoints/step-0000012/`` holds the trainable weights
(safetensors), the optimizer and scheduler state, every process's RNG state and the
step (which fixes the data position: the plan is a function of seed and step). It is
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


def _trainable_state(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


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


def save(out: Path, step: int, acc, model, optimizer, scheduler, extras, cfg) -> Path:
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
            save_file(_trainable_state(acc.unwrap_model(extras)), tmp / "extras.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(
            {"step": step, "num_processes": acc.num_processes, "config": to_dict(cfg)}, indent=1))
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        kept = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in kept[:-max(1, cfg.save_total_limit)]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _load_into(module, path: Path) -> None:
    state = load_file(str(path))
    params = dict(module.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if wanted != set(state):
        extra = sorted(set(state) - wanted) or sorted(wanted - set(state))
        raise InputError(f"{path}: checkpoint does not match the model being trained "
                         f"(first differing parameter: {extra[0]})")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def load(path: Path, acc, model, optimizer, scheduler, extras) -> dict:
    state = json.loads((path / "state.json").read_text())
    if state["num_processes"] != acc.num_processes:
        # The plan does not depend on the process count, but RNG streams are per process.
        acc.print(f"note: checkpoint was written by {state['num_processes']} processes, "
                  f"resuming with {acc.num_processes}")
    _load_into(acc.unwrap_model(model), path / "trainable.safetensors")
    if extras is not None:
        _load_into(acc.unwrap_model(extras), path / "extras.safetensors")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng-{acc.process_index}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    acc.print(f"resumed from {path} at step {state['step']}")
    return {"step": state["step"]}


class MetricsLogger:
    """Per-step metrics to OUTPUT/metrics.jsonl and TensorBoard (main process only).

    On resume, records past the resumed step (from the killed run) are dropped."""

    def __init__(self, out: Path, main: bool, tensorboard: bool, start_step: int):
        self.main, self.tb = main, None
        self.path = out / "metrics.jsonl"
        if not main:
            return
        out.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


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
