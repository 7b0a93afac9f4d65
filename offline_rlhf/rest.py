"""ReST: grow / improve loops over stored shards.

ReST (Gulcehre et al. 2023, "Reinforced Self-Training (ReST) for Language Modeling")
alternates a **grow** step (sample K responses per prompt from the current policy and
score them) with several **improve** steps (fine-tune with NLL on the samples whose
reward passes a threshold that rises from step to step, with a learning rate that
falls). ReST-EM (Singh et al. 2023, "Beyond Human Data") restarts each iteration's
fine-tuning from the base model (``restart_from_base``).

Everything is composed from the stage and trainer pieces, and every piece is kept
with lineage under OUTPUT:

    grow-0-<key>/generations, grow-0-<key>/scored     (key: policy, prompts, settings)
    grow-0-<key>/improve-1-<key>/final                 (key: data, filter, lr, start model)
    grow-0-<key>/improve-1-<key>/eval                  (greedy on eval_prompts, scored;
                                                        kl-generations, kl-ref: the KL samples)
    report.md, report.json, grow-0-rewards.png, eval-reward.png, training.png

With ``eval_prompts``, the report gives after every improve step the held-out greedy
mean reward and the KL of the step's model to the base policy, estimated as ``eval``
does (``kl_samples`` responses per held-out prompt sampled at temperature 1, the k3
estimator summed over tokens, see :mod:`offline_rlhf.evaluate`); and the training
curves (loss per optimizer step) of all improve steps, one after another.

A stopped run resumes where it stopped (finished datasets and models are reused);
changing the filter reuses the grows and redoes only the improve steps.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from .backends import BackendOptions, backend_options
from .config import build, load_file, opt, to_dict
from .errors import InputError
from .filters import SampleFilter, select
from .generation import GenerateConfig, generate
from .lineage import config_hash
from .models import fingerprint
from .rewards.score import ScoreConfig, score
from .shards import is_complete, open_dataset
from .storage import read_json_file, remove_run_output, write_json_atomic
from .train.defaults import BASE_EPOCHS, MIN_STEPS, auto_epochs, auto_lr, count_parameters
from .train.plan import steps_per_epoch
from .train.sft import SFTTrainConfig, train_sft


@dataclasses.dataclass
class RestConfig(BackendOptions):
    """A ReST job; ``backend`` is the engine of the grow step's sampling and of the held-out
    evaluations (scoring runs on the built-in one)."""

    policy: str = opt(help="starting (base) policy directory")
    prompts: str = opt(help="training prompts (dataset or file)")
    output: str = opt(help="run directory")
    eval_prompts: str | None = opt(None, "held-out prompts: greedy mean reward and KL to the base "
                                   "policy after every step")
    kl_samples: int = opt(2, "eval_prompts: responses per prompt sampled at temperature 1 for the KL "
                          "to the base policy (0: no KL)")
    grows: int = opt(1, "grow steps (iterations)")
    improve_steps: int = opt(3, "improve steps per grow")
    threshold_mode: str = opt("absolute", "absolute | percentile (per prompt, as in the paper)")
    thresholds: list[float] = opt([0.7, 0.8, 0.9], "threshold of each improve step (rising)")
    lrs: list[float] = opt([], "learning rate of each improve step (falling); unset: the `train` "
                           "rule's lr for the policy (docs/training.md) halved at each step")
    max_per_prompt: int = opt(0, "samples kept per prompt at most (0: no cap)")
    restart_from_base: bool = opt(False, "ReST-EM: fine-tune each iteration from the base model")
    num_samples: int = opt(8, "K: samples per prompt in a grow")
    temperature: float = opt(1.0, "grow sampling temperature")
    top_p: float = opt(1.0, "grow nucleus sampling")
    max_new_tokens: int = opt(128, "longest response")
    stop: list[str] = opt([], "stop strings")
    seed: int = opt(0, "run seed")
    reward_model: str | None = opt(None, "reward model directory (optional)")
    weights: dict[str, float] = opt({}, "reward components and weights (see `score`)")
    format_pattern: str | None = opt(None, "regex for the 'format' component")
    steps_per_improve: int = opt(0, "optimizer steps per improve step (0: epochs_per_improve epochs)")
    epochs_per_improve: float | None = opt(None, "epochs per improve step when steps_per_improve is 0; "
                                           f"unset: the `train` rule on the step's kept samples ({BASE_EPOCHS}, "
                                           f"or enough whole epochs for {MIN_STEPS} steps; docs/training.md)")
    batch_size: int = opt(16, "examples per optimizer step")
    micro_batch_size: int = opt(16, "examples per forward pass")
    lora_r: int = opt(0, "LoRA rank (0: full fine-tuning)")
    bits: int | None = opt(None, "4 or 8 with lora_r: QLoRA")
    gradient_checkpointing: bool = opt(False, "improve steps recompute activations in the backward "
                                       "pass to save memory")
    overwrite: bool = opt(False, "start afresh: remove an earlier ReST job's OUTPUT (a directory "
                          "holding config.json) first")

    def __post_init__(self):
        super().__post_init__()
        if self.threshold_mode not in ("absolute", "percentile"):
            raise InputError(f"threshold_mode: must be absolute or percentile, got {self.threshold_mode!r}")
        if len(self.thresholds) < self.improve_steps:
            raise InputError(f"thresholds: {len(self.thresholds)} given, improve_steps is {self.improve_steps}")
        if self.lrs and len(self.lrs) < self.improve_steps:
            raise InputError(f"lrs: {len(self.lrs)} given, improve_steps is {self.improve_steps}")
        if self.grows < 1 or self.improve_steps < 1:
            raise InputError("grows and improve_steps must be >= 1")
        if self.kl_samples < 0:
            raise InputError(f"kl_samples: must be >= 0, got {self.kl_samples}")


def load_rest_config(path: str, overrides: list[str] | None = None) -> RestConfig:
    from .config import apply_overrides
    return build(RestConfig, apply_overrides(load_file(path), overrides or []), "rest")


def _key(obj) -> str:
    return config_hash(obj)[:10]


def _score_cfg(cfg: RestConfig, gens: Path, out: Path) -> ScoreConfig:
    kw = {"format_pattern": cfg.format_pattern} if cfg.format_pattern else {}
    return ScoreConfig(generations=str(gens), output=str(out), reward_model=cfg.reward_model,
                       weights=dict(cfg.weights), **kw)


def _grow(cfg: RestConfig, g: int, policy: str, out: Path) -> Path:
    settings = {"policy": fingerprint(policy), "prompts": cfg.prompts, "k": cfg.num_samples,
                "temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                "stop": cfg.stop, "seed": cfg.seed + g, "reward_model": cfg.reward_model,
                "weights": cfg.weights, "format": cfg.format_pattern, "backend": cfg.backend}
    d = out / f"grow-{g}-{_key(settings)}"
    if not is_complete(str(d / "scored")):
        generate(GenerateConfig(prompts=cfg.prompts, output=str(d / "generations"), policy=policy,
                                num_samples=cfg.num_samples, temperature=cfg.temperature,
                                top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, stop=list(cfg.stop),
                                seed=cfg.seed + g, overlong="truncate", **backend_options(cfg)))
        score(_score_cfg(cfg, d / "generations", d / "scored"))
    (d / "lineage.json").write_text(json.dumps({"grow": g, "policy": policy, **settings}, indent=1))
    return d


def _evaluate(cfg: RestConfig, model: str, out: Path) -> float | None:
    if not cfg.eval_prompts:
        return None
    if not is_complete(str(out / "scored")):
        generate(GenerateConfig(prompts=cfg.eval_prompts, output=str(out / "generations"), policy=model,
                                num_samples=1, greedy=True, max_new_tokens=cfg.max_new_tokens,
                                stop=list(cfg.stop), overlong="truncate", **backend_options(cfg)))
        score(_score_cfg(cfg, out / "generations", out / "scored"))
    return float(np.mean(open_dataset(str(out / "scored")).read(columns=["reward"])
                         .column("reward").to_pylist()))


def _kl(cfg: RestConfig, model: str, out: Path) -> dict:
    """KL(model || base policy) on held-out prompts (see the module docstring)."""
    if not cfg.eval_prompts or not cfg.kl_samples:
        return {"kl": None, "kl_stderr": None}
    from .evaluate import kl_k3
    from .logprobs import LogprobsConfig, compute_logprobs
    if not is_complete(str(out / "kl-ref")):
        generate(GenerateConfig(prompts=cfg.eval_prompts, output=str(out / "kl-generations"),
                                policy=model, num_samples=cfg.kl_samples, temperature=1.0,
                                max_new_tokens=cfg.max_new_tokens, stop=list(cfg.stop),
                                seed=cfg.seed + 1, overlong="truncate"))
        compute_logprobs(LogprobsConfig(generations=str(out / "kl-generations"),
                                        output=str(out / "kl-ref"), reference=cfg.policy))
    t = open_dataset(str(out / "kl-ref")).read(columns=["behaviour_logps", "ref_logps"])
    per = kl_k3(t.column("behaviour_logps").to_pylist(), t.column("ref_logps").to_pylist())
    se = float(per.std(ddof=1) / np.sqrt(len(per))) if len(per) > 1 else 0.0
    return {"kl": float(per.mean()), "kl_stderr": se}


def improve_filter(cfg: RestConfig, i: int) -> dict:
    """The filter of improve step ``i``: threshold tau_i, absolute or a per-prompt
    percentile (thresholds given as fractions: 0.7 is the 70th percentile)."""
    return {"threshold": cfg.thresholds[i] if cfg.threshold_mode == "absolute" else None,
            "percentile": 100 * cfg.thresholds[i] if cfg.threshold_mode == "percentile" else None,
            "max_per_prompt": cfg.max_per_prompt}


def improve_plan(cfg: RestConfig, kept: int) -> tuple[float | None, int]:
    """Epochs (None when ``steps_per_improve`` decides) and optimizer steps of an improve
    step on ``kept`` samples, counted as ``train`` counts them: floor(epochs * ceil(kept /
    batch)); epochs unset follow the ``train`` rule (:func:`auto_epochs`)."""
    if cfg.steps_per_improve:
        return None, cfg.steps_per_improve
    epochs = cfg.epochs_per_improve or auto_epochs(kept, cfg.batch_size)
    return epochs, max(1, int(epochs * steps_per_epoch(kept, cfg.batch_size)))


def _improve(cfg: RestConfig, g: int, i: int, grow_dir: Path, start: str) -> dict:
    scored = open_dataset(str(grow_dir / "scored"), require_complete=True)
    flt = improve_filter(cfg, i)
    lr = cfg.lrs[i] if cfg.lrs else auto_lr(count_parameters(start), bool(cfg.lora_r)) / 2 ** i
    key = _key({"data": scored.fingerprint, **flt, "lr": lr,
                "start": fingerprint(start), "steps": cfg.steps_per_improve,
                "epochs": cfg.epochs_per_improve, "batch": cfg.batch_size, "lora": cfg.lora_r,
                "bits": cfg.bits, "seed": cfg.seed})
    d = grow_dir / f"improve-{i + 1}-{key}"
    rows = scored.read(columns=["prompt_id", "sample_index", "response", "reward"]).to_pylist()
    kept, stats = select(rows, SampleFilter(**flt))
    if not kept:
        raise InputError(f"improve step {i + 1} of grow {g}: no sample passes threshold "
                         f"{cfg.thresholds[i]} ({cfg.threshold_mode}); lower it")
    epochs, steps = improve_plan(cfg, len(kept))
    if read_json_file(d / "train_summary.json") is None:
        _say_choice(cfg, g, i, lr, epochs, steps, len(kept))
        train_sft(SFTTrainConfig(data=str(grow_dir / "scored"), output=str(d), policy=start,
                                 lr=lr, max_steps=steps, batch_size=min(cfg.batch_size, len(kept)),
                                 micro_batch_size=cfg.micro_batch_size, schedule="constant",
                                 seed=cfg.seed, lora_r=cfg.lora_r, bits=cfg.bits, report_to="none",
                                 gradient_checkpointing=cfg.gradient_checkpointing, **flt))
    return {"dir": str(d), "model": str(d / "final"), "kept": len(kept),
            "kept_fraction": len(kept) / max(1, len(rows)), "threshold": cfg.thresholds[i],
            "lr": lr, "epochs": epochs, "filter": stats}


def _say_choice(cfg: RestConfig, g: int, i: int, lr: float, epochs, steps: int, kept: int) -> None:
    """One line before an improve step's training: its rate and passes, and which the rule chose."""
    from .console import status
    rate = f"lr {lr:.3g}" + ("" if cfg.lrs else f" (auto: the train rule's rate / {2 ** i}; lrs sets it)")
    passes = (f"{steps} steps (steps_per_improve)" if cfg.steps_per_improve else
              f"epochs {epochs:g} of {kept} kept samples, {steps} steps"
              + ("" if cfg.epochs_per_improve else " (auto; epochs_per_improve sets it)"))
    status(f"grow {g} improve {i + 1}: {rate}, {passes}")


def run_rest(cfg: RestConfig) -> dict:
    """Run (or resume) a ReST job; return the report data (also written to OUTPUT)."""
    out = Path(cfg.output)
    if cfg.overwrite:
        remove_run_output(out, "config.json", "rest")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    report = {"base": {"model": cfg.policy,
                       "eval_reward": _evaluate(cfg, cfg.policy, out / "eval-base")}, "grows": []}
    policy = cfg.policy
    for g in range(cfg.grows):
        grow_dir = _grow(cfg, g, policy, out)
        rewards = open_dataset(str(grow_dir / "scored")).read(columns=["reward"]).column("reward").to_pylist()
        entry = {"grow": g, "dir": str(grow_dir), "policy": policy, "samples": len(rewards),
                 "reward_mean": float(np.mean(rewards)), "improves": []}
        start = cfg.policy if cfg.restart_from_base else policy
        for i in range(cfg.improve_steps):
            step = _improve(cfg, g, i, grow_dir, start)
            step["eval_reward"] = _evaluate(cfg, step["model"], Path(step["dir"]) / "eval")
            step.update(_kl(cfg, step["model"], Path(step["dir"]) / "eval"))
            entry["improves"].append(step)
            start = step["model"]
        entry["rewards"] = rewards
        report["grows"].append(entry)
        policy = start
    report["final_model"] = policy
    write_report(report, out)
    return report


def write_report(report: dict, out: Path) -> None:
    from .plots import histograms, lines
    pngs = []
    for entry in report["grows"]:
        pngs.append(histograms({f"grow {entry['grow']}": entry["rewards"]},
                               out / f"grow-{entry['grow']}-rewards.png",
                               f"Rewards of grow {entry['grow']} ({entry['samples']} samples)"))
    evals = [report["base"]["eval_reward"]] + [s["eval_reward"] for e in report["grows"] for s in e["improves"]]
    labels = ["base"] + [f"g{e['grow']}/i{s_i + 1}" for e in report["grows"] for s_i in range(len(e["improves"]))]
    if all(v is not None for v in evals):
        pngs.append(lines(labels, {"held-out greedy mean reward": evals}, out / "eval-reward.png",
                          "Held-out mean reward per step", "step", "mean reward"))
    curve = _training_curves(report, out)
    pngs += [curve] if curve else []
    md = ["# ReST report", "", f"Final model: `{report['final_model']}`", "",
          "| step | threshold | lr | kept | kept fraction | held-out mean reward | KL to base (± s.e.) |",
          "|---|---|---|---|---|---|---|",
          f"| base | - | - | - | - | {_f(report['base']['eval_reward'])} | 0 |"]
    for e in report["grows"]:
        md.append(f"| grow {e['grow']} ({e['samples']} samples, mean reward {e['reward_mean']:.3f}) "
                  "| | | | | | |")
        for i, s in enumerate(e["improves"]):
            kl = "-" if s.get("kl") is None else f"{s['kl']:.4g} ± {s['kl_stderr']:.2g}"
            md.append(f"| improve {i + 1} | {s['threshold']} | {s['lr']:g} | {s['kept']} | "
                      f"{s['kept_fraction']:.3f} | {_f(s['eval_reward'])} | {kl} |")
    md += ["", "KL: k3 estimator summed over response tokens, on responses sampled at "
           "temperature 1 from each step's model on the held-out prompts; the base policy is "
           "the reference." if any(s.get("kl") is not None for e in report["grows"]
                                   for s in e["improves"]) else "KL: not estimated (no "
           "eval_prompts, or kl_samples 0)."]
    md += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
    (out / "report.md").write_text("\n".join(md) + "\n")
    slim = {**report, "grows": [{k: v for k, v in e.items() if k != "rewards"} for e in report["grows"]]}
    write_json_atomic(out / "report.json", slim)  # its presence means done: atomic


def _training_curves(report: dict, out: Path) -> Path | None:
    """Loss per optimizer step of every improve step, one after another."""
    from .plots import curves
    steps, loss = [], []
    for e in report["grows"]:
        for s in e["improves"]:
            path = Path(s["dir"]) / "metrics.jsonl"
            rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] \
                if path.is_file() else []
            for r in rows:
                if "loss" in r:
                    steps.append(len(steps) + 1)
                    loss.append(r["loss"])
    if not steps:
        return None
    return curves(steps, {"loss": loss}, out / "training.png",
                  "Training curves of the improve steps (one after another)")


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"
