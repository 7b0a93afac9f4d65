"""An LLM judge (RLAIF): a causal LM read as a scorer and as a pair labeller.

The verdict is never parsed from generated text. The judge reads a rendered template
(its chat template applied when it has one, the assistant turn opened) and its
*next-token distribution* over the verdict labels is the answer:

- pointwise (``score --judge``): labels are the scale ``LO..HI`` (``--judge-scale 1-5``);
  the component ``judge`` is the expected label value under the distribution
  renormalised over the labels (G-Eval's probability-weighted score, Liu et al. 2023),
  and the label probabilities are stored per row;
- pairwise (``pairs --strategy judge``): labels ``A`` and ``B``; P(first is better) =
  p(A) / (p(A) + p(B)). Each pair is asked in both orders (position bias: Zheng et al.
  2023, "Judging LLM-as-a-Judge", sec. 3.3).

Only prefill runs. On the hf backend (``--judge-backend hf``, the default): one forward
per input, the logits of the last position kept, in token-budget batches through the
built-in transformers path. On vLLM (``--judge-backend vllm``): the same log-probs as
prompt log-probs of input + label, one request per (input, label)
(:class:`offline_rlhf.backends.vllm.JudgeModel`). Either way the label log-probs go
through one path (renormalised, cached, counted), and the judge fingerprint does not
name the backend: verdicts agree to float noise. Verdicts are cached by
(judge fingerprint, input text) in ``--judge-cache`` (see :class:`VerdictCache`), so
re-judging unchanged rows costs nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import uuid
from pathlib import Path

import numpy as np

from ..config import opt
from ..errors import InputError

TEMPLATES = Path(__file__).resolve().parent / "judge_templates"
PAIR_LABELS = ("A", "B")
POINTWISE_FIELDS = ("{prompt}", "{response}")
PAIRWISE_FIELDS = ("{prompt}", "{response_a}", "{response_b}")


@dataclasses.dataclass(kw_only=True)
class JudgeOptions:
    """judge options (an LLM judge read from its next-token probabilities; docs/rlaif.md)"""

    judge: str | None = opt(None, "judge model directory (a causal LM). score: adds the reward "
                            "component 'judge' (weight it with --weights judge=1); pairs: the "
                            "judge of --strategy judge")
    judge_template: str | None = opt(None, "judge template file: {prompt}, {reference_answer} and "
                                     "{response} (score) or {response_a} and {response_b} (pairs); "
                                     "{scale_low}/{scale_high} optional. Default: the shipped "
                                     "offline_rlhf/rewards/judge_templates/*.txt")
    judge_scale: str = opt("1-5", "score: verdict labels LO-HI, each one token of the judge's "
                           "tokenizer; the component is their expected value")
    judge_backend: str = opt("hf", "engine of the judge's prefill: hf (the built-in transformers "
                             "path: one forward per input, batched by --judge-token-budget) | "
                             "vllm (a vLLM engine, the vllm extra: prompt log-probs of input + "
                             "label, one request per input and label; --vllm-kv-cache-gb "
                             "applies; no --judge-bits, no LoRA adapter judge). Same verdicts "
                             "to float noise, same fingerprint and cache (docs/rlaif.md)")
    judge_bits: int | None = opt(None, "load the judge in 4 or 8 bits (bitsandbytes; hf judge "
                                 "backend only)")
    judge_dtype: str = opt("auto", "judge dtype: auto | float32 | bfloat16 | float16")
    judge_max_length: int = opt(2048, "judge input tokens kept (the last ones: the verdict "
                                "position stays); cut inputs are counted")
    judge_token_budget: int = opt(16384, "judge tokens per prefill batch (hf judge backend; "
                                  "vLLM schedules its own)")
    judge_cache: str | None = opt(None, "directory of verdicts keyed by (judge fingerprint, "
                                  "template, input): rows judged before are not run again")

    def __post_init__(self):
        if self.judge_bits not in (None, 4, 8):
            raise InputError(f"judge_bits: must be 4 or 8, got {self.judge_bits}")
        if self.judge_backend not in JUDGE_BACKENDS:
            raise InputError(f"judge_backend: must be one of {', '.join(JUDGE_BACKENDS)}, "
                             f"got {self.judge_backend!r}")
        if self.judge_backend == "vllm" and self.judge_bits is not None:
            raise InputError(f"judge_bits: {self.judge_bits}: --judge-backend vllm does not load "
                             "bitsandbytes models (vLLM's own quantization formats are not "
                             "--judge-bits); use --judge-backend hf")
        if self.judge_max_length < 1 or self.judge_token_budget < 1:
            raise InputError("judge_max_length and judge_token_budget: must be >= 1")
        scale_labels(self.judge_scale)
        if self.judge_template is not None and not Path(self.judge_template).is_file():
            raise InputError(f"judge_template: {self.judge_template}: file not found")
        later = getattr(super(), "__post_init__", None)   # cooperative: other option mixins
        if later is not None:
            later()


JUDGE_BACKENDS = ("hf", "vllm")
JUDGE_OPTIONS = tuple(f.name for f in dataclasses.fields(JudgeOptions))


def scale_labels(spec: str) -> list[str]:
    """The labels of ``LO-HI`` (integers, LO < HI, at most 100 labels)."""
    m = re.fullmatch(r"\s*(-?\d+)\s*-\s*(-?\d+)\s*", spec or "")
    if not m or not int(m[1]) < int(m[2]) or int(m[2]) - int(m[1]) >= 100:
        raise InputError(f"judge_scale: must be LO-HI with integers LO < HI (e.g. 1-5), got {spec!r}")
    return [str(v) for v in range(int(m[1]), int(m[2]) + 1)]


def read_template(path: str | None, kind: str) -> str:
    """The template text (one final newline dropped), checked for its fields."""
    file = Path(path) if path else TEMPLATES / f"{kind}.txt"
    text = file.read_text()
    text = text[:-1] if text.endswith("\n") else text
    fields = POINTWISE_FIELDS if kind == "pointwise" else PAIRWISE_FIELDS
    missing = [f for f in fields if f not in text]
    if missing:
        raise InputError(f"{file}: judge template has no {', '.join(missing)} field "
                         f"({kind} templates need {', '.join(fields)})")
    return text


def render(template: str, values: dict[str, str | None]) -> str:
    """``template`` with each ``{name}`` of ``values`` replaced (other braces kept as is:
    prompts may contain code); a missing value renders empty."""
    return re.sub(r"\{(\w+)\}", lambda m: (values.get(m[1]) or "") if m[1] in values else m[0],
                  template)


def verdict_token_ids(tokenizer, labels: list[str], judge: str) -> list[int]:
    """One token id per label; a label the tokenizer splits is refused (its probability
    would need a second forward per label)."""
    ids = []
    for label in labels:
        toks = tokenizer(label, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise InputError(f"judge_scale: label {label!r} is {len(toks)} tokens for the judge "
                             f"{judge} (every label must be one token; try a narrower scale)")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise InputError(f"judge_scale: two labels share a token for the judge {judge}")
    return ids


def expected_value(probs: np.ndarray, labels: list[str]) -> np.ndarray:
    """Expected label value per row of ``probs`` ``[n, labels]`` (rows sum to 1)."""
    return probs @ np.array([float(x) for x in labels])


def judge_spec(model_fp: str, template: str, labels: list[str], max_length: int) -> str:
    """The judge fingerprint: model content, template text, labels and input cut."""
    spec = json.dumps([model_fp, template, labels, max_length])
    return hashlib.sha256(spec.encode()).hexdigest()


def check_judge(cfg: JudgeOptions, kind: str) -> str:
    """Before any work: the judge directory, its template and labels (one token each),
    and on vLLM what the engine cannot serve; returns the judge fingerprint (what
    :class:`Judge` computes after loading)."""
    from ..models import check_model_dir, fingerprint, load_tokenizer
    check_model_dir(cfg.judge, "judge model")
    if cfg.judge_backend == "vllm":
        from ..backends.vllm import check_judge as check_vllm_judge
        check_vllm_judge(cfg)
    template = read_template(cfg.judge_template, kind)
    labels = scale_labels(cfg.judge_scale) if kind == "pointwise" else list(PAIR_LABELS)
    verdict_token_ids(load_tokenizer(cfg.judge), labels, cfg.judge)
    return judge_spec(fingerprint(cfg.judge), template, labels, cfg.judge_max_length)


class VerdictCache:
    """Verdicts (label probabilities) by sha256 of (judge fingerprint, input text), in
    ``DIR/<judge fingerprint>/*.jsonl``: each process appends to a file of its own (a
    line per verdict, flushed per batch), so concurrent workers never share a file and a
    torn last line from a kill is skipped on reading. ``None`` directory: memory only."""

    def __init__(self, directory: str | None, judge_fp: str):
        self.judge_fp, self.entries = judge_fp, {}
        self.dir = Path(directory) / judge_fp if directory else None
        self.own = None
        if self.dir is not None and self.dir.is_dir():
            for f in sorted(self.dir.glob("*.jsonl")):
                for line in f.read_text().splitlines():
                    try:
                        k, v = json.loads(line)
                    except ValueError:
                        continue    # the torn last line of a killed writer
                    self.entries[k] = v

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.judge_fp}\0{text}".encode()).hexdigest()

    def add(self, new: dict[str, list[float]]) -> None:
        self.entries.update(new)
        if self.dir is None or not new:
            return
        if self.own is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.own = self.dir / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        with open(self.own, "a") as f:
            f.write("".join(json.dumps([k, v]) + "\n" for k, v in new.items()))
            f.flush()
            os.fsync(f.fileno())


class Judge:
    """A judge model loaded once: renders inputs and reads verdict probabilities."""

    def __init__(self, cfg: JudgeOptions, kind: str, device: str | None = None):
        from ..models import fingerprint, load_policy, load_tokenizer
        self.kind, self.cfg = kind, cfg
        self.template = read_template(cfg.judge_template, kind)
        self.labels = scale_labels(cfg.judge_scale) if kind == "pointwise" else list(PAIR_LABELS)
        self.tokenizer = load_tokenizer(cfg.judge, padding_side="left")
        self.label_ids = verdict_token_ids(self.tokenizer, self.labels, cfg.judge)
        self.fingerprint = judge_spec(fingerprint(cfg.judge), self.template, self.labels,
                                      cfg.judge_max_length)
        self.cache = VerdictCache(cfg.judge_cache, self.fingerprint)
        self.model = self.engine = None
        if cfg.judge_backend == "vllm":
            from ..backends.vllm import JudgeModel
            self.engine = JudgeModel(cfg)
        else:
            self.model = load_policy(cfg.judge, dtype=cfg.judge_dtype, bits=cfg.judge_bits,
                                     device=device, train=False)
            self.model.requires_grad_(False)
        self.stats = {"judge_inputs": 0, "judge_cached": 0, "judge_inputs_truncated": 0}

    def text(self, values: dict[str, str | None]) -> str:
        """The judge's input: the rendered template, as a user turn of its chat template
        (assistant turn opened) when it has one."""
        content = render(self.template, {"scale_low": self.labels[0],
                                         "scale_high": self.labels[-1], **values})
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                      tokenize=False, add_generation_prompt=True)
        return content

    def encode(self, texts: list[str]) -> list[list[int]]:
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        ids = self.tokenizer(texts, add_special_tokens=not chat)["input_ids"] if texts else []
        n = self.cfg.judge_max_length
        self.stats["judge_inputs_truncated"] += sum(len(x) > n for x in ids)
        return [x[-n:] for x in ids]

    def probs(self, texts: list[str]) -> np.ndarray:
        """Label probabilities ``[len(texts), labels]`` (renormalised over the labels),
        from the cache where known; each distinct new text runs once."""
        keys = [self.cache.key(t) for t in texts]
        todo = sorted({k: t for k, t in zip(keys, texts) if k not in self.cache.entries}.items())
        self.stats["judge_inputs"] += len(texts)
        self.stats["judge_cached"] += len(texts) - len(todo)
        if todo:
            seqs = self.encode([t for _, t in todo])
            lp = (self.engine.verdict_logps(seqs, self.label_ids) if self.engine is not None else
                  verdict_logps(self.model, seqs, self.label_ids, self.tokenizer.pad_token_id,
                                self.cfg.judge_token_budget))
            p = np.exp(lp - lp.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            self.cache.add({k: row.tolist() for (k, _), row in zip(todo, p)})
        return np.array([self.cache.entries[k] for k in keys], dtype=np.float64).reshape(
            len(texts), len(self.labels))

    def pointwise(self, prompts, responses, refs) -> tuple[np.ndarray, np.ndarray]:
        """(expected scale value, label probabilities) of each response."""
        probs = self.probs([self.text({"prompt": p, "response": r, "reference_answer": a})
                            for p, r, a in zip(prompts, responses, refs)])
        return expected_value(probs, self.labels), probs

    def first_better(self, prompts, firsts, seconds, refs) -> np.ndarray:
        """P(the response shown first is better), per (prompt, first, second)."""
        probs = self.probs([self.text({"prompt": p, "response_a": a, "response_b": b,
                                       "reference_answer": r})
                            for p, a, b, r in zip(prompts, firsts, seconds, refs)])
        return probs[:, 0]

    def close(self) -> None:
        self.model = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def verdict_logps(model, seqs: list[list[int]], label_ids: list[int], pad_id: int,
                  token_budget: int) -> np.ndarray:
    """Log-probabilities ``[len(seqs), len(label_ids)]`` of the label tokens as the next
    token after each sequence: prefill only, left-padded token-budget batches, the
    logits of the last position alone."""
    import torch

    from ..batching import budget_batches, pad, positions
    device = next(model.parameters()).device
    out = np.zeros((len(seqs), len(label_ids)), dtype=np.float64)
    labels = torch.tensor(label_ids, device=device)
    with torch.no_grad():
        for batch in budget_batches([len(s) for s in seqs], token_budget):
            ids, mask = pad([seqs[i] for i in batch], pad_id, "left", device)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                           logits_to_keep=1).logits[:, -1].float()
            out[batch] = torch.log_softmax(logits, -1)[:, labels].double().cpu().numpy()
    return out
