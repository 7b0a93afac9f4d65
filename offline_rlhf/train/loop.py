"""The one training loop every optimiser uses (DPO family, reward model, SFT, ReST, ILQL).

An algorithm is a :class:`Task`: its prepared examples, a collate function and a loss
that returns per-example losses and metrics. The loop owns everything else:
accelerate (DDP on CPU/gloo or GPUs; FSDP/DeepSpeed through an accelerate config),
gradient accumulation, clipping, mixed precision, gradient checkpointing, schedules
with warm-up, length-grouped token-budget micro-batches, checkpoints with exact resume,
metrics (JSONL, TensorBoard), a progress bar and the final save.

Batches are planned (``plan.py``) independently of the process count: each optimiser step takes
``batch_size`` examples (a seeded permutation per epoch; an epoch is ceil(n / batch_size)
steps, its last step the rest, so every example is trained every epoch), split by length
into micro-batches that are dealt round-robin to the processes. Every per-example loss is
scaled by ``world_size / examples_in_step`` before DDP averages the gradients, so a
step's gradient is the mean over its examples whatever the number of processes.

A step whose loss, a loss term (``loss/*``) or gradient norm is not finite stops the run
before its update (:class:`~offline_rlhf.errors.TrainingDiverged`): the checkpoints
stay, no ``final/`` and no ``train_summary.json`` are written. Resuming, and what a run
does with an output that holds another run, is ``identity.py``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..config import opt, to_dict
from ..errors import InputError, TrainingDiverged
from ..lineage import code_version, config_hash
from ..storage import write_json_atomic
from . import checkpoint as ckpt
from .defaults import EPOCHS_TEXT, RULE_TEXT, resolve_beta, resolve_epochs, resolve_lr
from .identity import Finished, prepare_output, run_identity
from .plan import micro_batches, plan_epoch, steps_per_epoch, total_steps, warmup_steps

SCHEDULES = ("linear", "cosine", "cosine_with_min_lr", "constant_with_warmup")


@dataclasses.dataclass
class TrainConfig:
    """Options shared by every ``train`` command."""
    data: str = opt(help="input dataset (pairs or generations, per algorithm)")
    output: str = opt(help="output directory: checkpoints, metrics, final model")
    policy: str = opt(help="model to train: a transformers directory (safetensors)")
    lr: float | None = opt(None, "peak learning rate; " + RULE_TEXT)
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon")
    schedule: str = opt("cosine", "learning-rate schedule after the linear warm-up, named as in "
                        "transformers: linear | cosine | cosine_with_min_lr (cosine down to "
                        "lr * min_lr_ratio) | constant_with_warmup (alias: constant)")
    min_lr_ratio: float = opt(0.0, "cosine_with_min_lr: the rate it ends at, as a fraction of lr "
                              "(transformers' min_lr_rate)")
    warmup_steps: int = opt(0, "linear warm-up steps (set this or warmup_ratio, not both)")
    warmup_ratio: float = opt(0.0, "linear warm-up over this fraction of the total steps, rounded "
                              "up (set this or warmup_steps, not both)")
    max_steps: int = opt(0, "optimizer steps (0: run `epochs` epochs)")
    epochs: float | None = opt(None, "passes over the data when max_steps is 0; " + EPOCHS_TEXT)
    batch_size: int = opt(16, "examples per optimizer step, over all processes (an epoch is "
                          "ceil(examples / batch_size) steps, the last one the rest)")
    micro_batch_size: int = opt(8, "most examples per forward pass on one process")
    max_tokens_per_micro_batch: int = opt(16384, "most padded tokens per forward pass")
    group_by_length: bool = opt(True, "sort each step's examples by length before cutting "
                                "micro-batches (off: fixed-size micro-batches in data order)")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off; the norm is still logged, "
                               "and a non-finite one stops the run)")
    seed: int = opt(0, "seed of data order and initialisation")
    save_steps: int = opt(0, "checkpoint every N steps (0: only at the end)")
    save_total_limit: int = opt(2, "checkpoints kept")
    log_steps: int = opt(1, "log metrics every N steps")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    mixed_precision: str = opt("auto", "auto (bf16 on CUDA, none on CPU) | no | bf16 | fp16")
    device: str | None = opt(None, "cuda | cpu (default: cuda when available; cpu trains on "
                             "the CPU even where a GPU is visible)")
    dtype: str = opt("float32", "dtype of the loaded weights: float32 | bfloat16 | float16 | auto")
    bits: int | None = opt(None, "4 or 8: bitsandbytes base weights (with lora: QLoRA)")
    lora_r: int = opt(0, "LoRA rank (0: full fine-tuning)")
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    lora_target_modules: list[str] = opt([], "LoRA target modules (default: all linear layers)")
    save_merged: bool = opt(True, "with LoRA, also save the adapter merged into the base model")
    report_to: str = opt("tensorboard", ckpt.TRACKERS_HELP)
    resume: str = opt("auto", "auto: resume from the latest checkpoint in OUTPUT if an identical run "
                      "wrote it (same options that change the trajectory, same data and policy "
                      "content; see docs/training.md); an identical finished run is not redone; "
                      "another run's output is refused | never: train from step 0 (checkpoints "
                      "in OUTPUT are deleted) | PATH: a checkpoint of an identical run")
    overwrite: bool = opt(False, "delete an earlier run's files in OUTPUT (checkpoints, final model, "
                          "metrics, summary) and start afresh")
    trust_remote_code: bool = opt(False, "allow custom model code from the model directory")

    def __post_init__(self):
        if self.lr is not None and self.lr <= 0:
            raise InputError(f"lr: must be > 0, got {self.lr}")
        positive = ("batch_size", "micro_batch_size", "max_tokens_per_micro_batch", "log_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise InputError(f"{name}: must be > 0, got {getattr(self, name)}")
        self._check_optimizer()
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise InputError(f"mixed_precision: must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.device not in (None, "cpu", "cuda"):
            raise InputError(f"device: must be cpu or cuda, got {self.device!r}")
        if self.bits not in (None, 4, 8):
            raise InputError(f"bits: must be 4 or 8, got {self.bits}")
        if self.bits and not self.lora_r:
            raise InputError("bits: quantized base weights cannot be trained; set lora_r (QLoRA)")
        if self.max_steps < 0 or (self.epochs is not None and self.epochs <= 0):
            raise InputError("max_steps must be >= 0 and epochs > 0")
        if self.overwrite and self.resume not in ("auto", "never"):
            raise InputError("overwrite: starts afresh; it cannot be combined with --resume PATH")
        ckpt.resolve_trackers(self.report_to)  # an uninstalled tracker fails here, before any work

    def _check_optimizer(self):
        if self.schedule == "constant":
            self.schedule = "constant_with_warmup"   # our earlier name, kept as an alias
        if self.schedule not in SCHEDULES:
            raise InputError(f"schedule: must be one of {', '.join(SCHEDULES)} (or constant), "
                             f"got {self.schedule!r}")
        checks = [("adam_beta1", 0 <= self.adam_beta1 < 1, "must be in [0, 1)"),
                  ("adam_beta2", 0 <= self.adam_beta2 < 1, "must be in [0, 1)"),
                  ("adam_epsilon", self.adam_epsilon > 0, "must be > 0"),
                  ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
                  ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
                  ("warmup_ratio", 0 <= self.warmup_ratio < 1, "must be in [0, 1)"),
                  ("min_lr_ratio", 0 <= self.min_lr_ratio < 1, "must be in [0, 1)")]
        for name, ok, why in checks:
            if not ok:
                raise InputError(f"{name}: {why}, got {getattr(self, name)!r}")
        if self.warmup_steps and self.warmup_ratio:
            raise InputError("warmup_steps and warmup_ratio: set one of them, not both")
        if self.min_lr_ratio and self.schedule != "cosine_with_min_lr":
            raise InputError(f"min_lr_ratio: only used by the cosine_with_min_lr schedule "
                             f"(schedule is {self.schedule})")


class Task(Protocol):
    """What an algorithm gives the loop."""

    name: str

    def lengths(self) -> np.ndarray:
        """Tokens each example costs in a forward pass (for micro-batching)."""

    def collate(self, indices: list[int], device) -> dict:
        """A padded batch of the examples ``indices`` on ``device``."""

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-example losses ``[n]`` and per-example metrics (averaged over the step's
        examples; those named ``*/max`` or ``*/min`` are reduced by max or min)."""

    # Optional hooks: ``begin_step(examples)`` before a step's micro-batches (every
    # process gets the whole step's example list); ``finish_record(record)`` may derive
    # metrics from the reduced record in place; ``after_step(step)`` after the update.


# --------------------------------------------------------------------------- set-up

def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InputError("device: cuda was asked for but no CUDA GPU is visible")
    on_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if on_cuda and torch.cuda.is_bf16_supported() else "no"
    trackers = ckpt.resolve_trackers(cfg.report_to)
    project = ProjectConfiguration(project_dir=cfg.output, logging_dir=str(Path(cfg.output) / "tensorboard"))
    # cpu=True is what makes accelerate start gloo for several CPU processes (torchrun etc.)
    return Accelerator(mixed_precision=mp, gradient_accumulation_steps=1, cpu=not on_cuda,
                       log_with=trackers or None, project_config=project)


def load_model_for_training(cfg: TrainConfig, device, model_loader=None):
    from ..models import LoraSpec, enable_activation_checkpointing, load_policy
    lora = None
    if cfg.lora_r:
        lora = LoraSpec(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        target_modules=cfg.lora_target_modules or "all-linear")
    torch.manual_seed(cfg.seed)
    loader = model_loader or load_policy
    model = loader(cfg.policy, dtype=cfg.dtype, bits=cfg.bits, lora=lora, device=str(device),
                   train=True, trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


def make_optimizer(cfg: TrainConfig, params, steps: int):
    from transformers import get_scheduler
    params = [p for p in params if p.requires_grad]
    if not params:
        raise InputError("no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    extra = {"min_lr_rate": cfg.min_lr_ratio} if cfg.schedule == "cosine_with_min_lr" else None
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=warmup_steps(cfg, steps),
                              num_training_steps=steps, scheduler_specific_kwargs=extra)
    return optimizer, scheduler


# --------------------------------------------------------------------------- the loop

def _step(acc, model, task: Task, mine: list[list[int]], n_step: int, filler: int = 0):
    """Forward/backward this process's micro-batches of a step of ``n_step`` examples;
    summed metrics. An empty micro-batch runs the example ``filler`` with its loss and
    metrics weighted zero (sums add 0, maxima -inf, minima +inf): the gradient is
    unchanged, and the process takes part in DDP's reduction."""
    sums: dict[str, torch.Tensor] = {}
    scale = acc.num_processes / n_step
    for j, mb in enumerate(mine):
        batch = task.collate(mb or [filler], acc.device)
        sync = j == len(mine) - 1
        ctx = acc.no_sync(model) if not sync and acc.num_processes > 1 else contextlib.nullcontext()
        with ctx, acc.autocast():
            losses, metrics = task.loss(model, batch)
            acc.backward(losses.sum() * (scale if mb else 0.0))
        for k, v in {"loss": losses, **metrics}.items():
            v = v.detach().float()
            sums[k] = _combine(k, sums.get(k), v if mb else _neutral(k, v))
    return sums


def _neutral(key: str, v: torch.Tensor) -> torch.Tensor:
    if key.endswith(EXTREMA):
        return torch.full_like(v, -math.inf if key.endswith("/max") else math.inf)
    return torch.zeros_like(v)


EXTREMA = ("/max", "/min")  # metrics reduced by max / min over the step, not averaged


def _combine(key: str, acc_value, v: torch.Tensor) -> torch.Tensor:
    if key.endswith("/max"):
        v = v.max()
        return v if acc_value is None else torch.maximum(acc_value, v)
    if key.endswith("/min"):
        v = v.min()
        return v if acc_value is None else torch.minimum(acc_value, v)
    v = v.sum()
    return v if acc_value is None else acc_value + v


def _reduce(acc, sums: dict, n: int) -> dict:
    """The step's metrics over all processes: per-example means, and the maximum or
    minimum of ``*/max`` and ``*/min`` metrics."""
    keys = sorted(k for k in sums if not k.endswith(EXTREMA))
    totals = acc.reduce(torch.stack([sums[k] for k in keys]), reduction="sum")
    record = {k: float(v) / n for k, v in zip(keys, totals.tolist())}
    for k in sorted(set(sums) - set(keys)):
        gathered = acc.gather(sums[k][None])
        record[k] = float(gathered.max() if k.endswith("/max") else gathered.min())
    return record


def fit(cfg: TrainConfig, task_factory, **kw) -> dict:
    """Train ``task_factory(model, tokenizer, accelerator)`` under ``cfg``; return a summary.

    ``extra_modules(model)`` may return modules trained beside the model (ILQL heads);
    ``evaluate(model, accelerator)`` runs after training and its figures are logged.
    Once the run is over, nothing of it is held: its memory (on CUDA, the allocator's
    cache too) is handed back for the next phase of a pipeline or ReST loop.
    """
    from ..models import free_memory
    try:
        return _fit(cfg, task_factory, **kw)
    finally:
        free_memory()


def _fit(cfg: TrainConfig, task_factory, *, model_loader=None, extra_modules=None,
         evaluate=None) -> dict:
    from ..console import status
    from ..models import check_model_dir, load_tokenizer
    check_model_dir(cfg.policy, "policy")
    out = Path(cfg.output)
    chose = [resolve_lr(cfg)]         # before the identity, which records the value
    identity = run_identity(cfg)
    acc = make_accelerator(cfg)
    try:
        try:
            resume_from = prepare_output(cfg, identity, acc)
        except Finished as done:
            return _finished(cfg, acc, done.summary)
        tokenizer = load_tokenizer(cfg.policy, cfg.trust_remote_code, padding_side="right")
        model = load_model_for_training(cfg, acc.device, model_loader)
        task = task_factory(model, tokenizer, acc)
        extras = extra_modules(model) if extra_modules else None
        lengths = task.lengths()
        chose.append(resolve_epochs(cfg, len(lengths)))   # identity keeps "unset": data decide it
        chose.append(resolve_beta(cfg, len(lengths)))     # train dpo: by the passes just chosen
        steps = total_steps(cfg, len(lengths))
        params = list(model.parameters()) + (list(extras.parameters()) if extras else [])
        optimizer, scheduler = make_optimizer(cfg, params, steps)
        if extras is not None:
            model, extras, optimizer = acc.prepare(model, extras, optimizer)
            task.attach(extras)
        else:
            model, optimizer = acc.prepare(model, optimizer)
        state = {"step": 0}
        if resume_from is not None:
            state = ckpt.load(resume_from, acc, model, optimizer, scheduler, extras)
        for line in chose:   # said once the run is sure to start (a refused checkpoint stays one line)
            if line and acc.is_main_process:
                status(line)
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / "config.json", {
                "algorithm": task.name, "config": to_dict(cfg), "identity": identity,
                "resumed_from": str(resume_from) if resume_from else None,
                "code_version": code_version(), "config_hash": config_hash(to_dict(cfg))})
        logger = ckpt.MetricsLogger(out, acc, state["step"], to_dict(cfg))
        run = Run(cfg, acc, model, task, optimizer, scheduler, extras, out, logger, identity)
        summary = _train(run, lengths, steps, state["step"])
        if evaluate is not None:
            summary["eval"] = evaluate(acc.unwrap_model(model), acc)
            logger.log({"step": steps, **summary["eval"]})
        ckpt.save_final(cfg, acc, model, tokenizer, out, extras)
        summary.update(resumed_from=str(resume_from) if resume_from else None, steps=steps,
                       is_main_process=acc.is_main_process, data=getattr(task, "stats", None),
                       identity=identity)
        if acc.is_main_process:
            from .card import write_card  # README.md in final/: the model card
            write_card(out, task.name, to_dict(cfg), identity, summary)
            write_json_atomic(out / "train_summary.json", summary)  # presence means done
        acc.wait_for_everyone()
        return summary
    finally:
        acc.end_training()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:  # gloo can hang at interpreter exit otherwise
            torch.distributed.destroy_process_group()
        else:  # let a later fit() in this process choose other settings
            from accelerate.state import AcceleratorState
            AcceleratorState._reset_state(reset_partial_state=True)


def _finished(cfg: TrainConfig, acc, summary: dict) -> dict:
    """The stored summary of the identical run that finished in OUTPUT; nothing runs."""
    from ..console import status
    if acc.is_main_process:
        status(f"{cfg.output}: an identical run finished here ({summary.get('steps')} steps); "
               "nothing to do (--overwrite trains again)")
    return {**summary, "already_done": True, "steps_run": 0, "train_seconds": 0.0,
            "is_main_process": acc.is_main_process}


@dataclasses.dataclass
class Run:
    """What the steps of a run share."""
    cfg: TrainConfig
    acc: object
    model: object
    task: Task
    optimizer: object
    scheduler: object
    extras: object
    out: Path
    logger: object
    identity: dict


def _train(run: Run, lengths, steps: int, start: int) -> dict:
    from ..console import progress
    cfg, acc, task = run.cfg, run.acc, run.task
    per_epoch = steps_per_epoch(len(lengths), cfg.batch_size)
    bar = progress(steps, f"train {task.name}", "step", initial=start, enabled=acc.is_main_process)
    history: list[dict] = []
    t0 = time.perf_counter()
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    if run.extras is not None:
        trainable += [p for p in run.extras.parameters() if p.requires_grad]
    for step in range(start, steps):
        epoch, k = divmod(step, per_epoch)
        examples = plan_epoch(len(lengths), cfg.batch_size, cfg.seed, epoch)[k]
        mbs = micro_batches(examples, lengths, cfg.micro_batch_size,
                            cfg.max_tokens_per_micro_batch, acc.num_processes, cfg.group_by_length)
        if hasattr(task, "begin_step"):
            task.begin_step(examples)
        run.model.train()
        sums = _step(acc, run.model, task, mbs[acc.process_index::acc.num_processes], len(examples),
                     examples[0])
        # max_grad_norm 0: the norm is measured (for the guard), the gradient multiplied by 1
        grad_norm = acc.clip_grad_norm_(trainable, cfg.max_grad_norm if cfg.max_grad_norm > 0
                                        else math.inf)
        record = _reduce(acc, sums, len(examples))
        record.update(step=step + 1, epoch=epoch, lr=run.scheduler.get_last_lr()[0],  # this step's
                      examples=len(examples), seconds=time.perf_counter() - t0)
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        _guard(run, record, steps)       # before the update: a bad step changes no weight
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if hasattr(task, "after_step"):
            task.after_step(step + 1)
        if hasattr(task, "finish_record"):
            task.finish_record(record)
        history.append(record)
        if (step + 1) % cfg.log_steps == 0 or step + 1 == steps:
            run.logger.log(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        bar.update(1)
        if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < steps:
            ckpt.save(run.out, step + 1, acc, run.model, run.optimizer, run.scheduler, run.extras,
                      cfg, run.identity)
    bar.close()
    seconds = time.perf_counter() - t0
    return {"history_tail": history[-5:], "train_seconds": seconds,
            "steps_run": steps - start, "first": history[0] if history else None,
            "last": history[-1] if history else None}


def _guard(run: Run, record: dict, steps: int) -> None:
    """Stop the run at a non-finite loss, loss term or gradient norm (every process sees
    the same reduced values, so all stop at the same step). Under fp16 loss scaling an
    infinite gradient norm is the scaler's business (it skips that step), not divergence."""
    bad = [k for k in sorted(record, key=lambda k: (k == "loss", k))
           if (k == "loss" or k.startswith("loss/")) and not math.isfinite(record[k])]
    if "grad_norm" in record and not math.isfinite(record["grad_norm"]) and \
            getattr(run.acc, "scaler", None) is None:
        bad.append("grad_norm")
    if not bad:
        return
    if hasattr(run.task, "finish_record"):
        run.task.finish_record(record)
    run.logger.log(record)        # the bad step's record, as a finished step's would be
    last = ckpt.find_resume(run.out, "auto")
    raise TrainingDiverged(
        f"training diverged at step {record['step']} of {steps}: "
        + ", ".join(f"{k} is {record[k]}" for k in bad)
        + "; that step was not applied and no final model was written; last good checkpoint: "
        + (str(last) if last else "none (--save-steps N keeps some)")
        + "; lower --lr or check the data")
