"""Log-probabilities of responses, and the reference log-probs stage.

:func:`processed_logps` is the sampling distribution (temperature, top-k, top-p) that
the generator samples from and stores as behaviour log-probs; :func:`sequence_logps`
recomputes it teacher-forced. The ``logprobs`` stage stores the reference model's
per-token and summed log-probs of every response, so no optimiser loads the reference
model: DPO-family training reads them from the shard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from .backends import SPEED_OPTIONS, BackendOptions, backend_module, check_backend
from .batching import budget_batches, pad
from .config import opt, to_dict
from .errors import InputError
from .executors import EXECUTOR_OPTIONS, ExecutorOptions
from .lineage import config_hash
from .models import check_model_dir, fingerprint, load_tokenizer
from .schemas import replace_column
from .shards import open_dataset
from .stage import LazyWorker, StagePlan, run_stage


def processed_logps(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0) -> torch.Tensor:
    """Log-probs of the distribution actually sampled: logits / temperature, then top-k
    and top-p (nucleus) filtering; filtered tokens get -inf. Computed in float32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each token
        sorted_logits = sorted_logits.masked_fill(before > top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def sequence_logps(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                   *, pad_id: int, token_budget: int = 16384, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0) -> list[np.ndarray]:
    """Per-token log-probs of each response given its prompt (teacher forcing).

    Rows are batched by ``token_budget`` with length bucketing and right padding; only
    the response positions go through the (vocabulary-sized) softmax.
    """
    device = next(model.parameters()).device
    out: list[np.ndarray | None] = [None] * len(prompts)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    for batch in budget_batches(lengths, token_budget):
        seqs = [list(prompts[i]) + list(responses[i]) for i in batch]
        ids, mask = pad(seqs, pad_id, "right", device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        rows, cols, targets = [], [], []
        for r, i in enumerate(batch):
            start, n = len(prompts[i]), len(responses[i])
            if start == 0:
                raise InputError("a response needs at least one prompt token before it")
            rows += [r] * n
            cols += range(start - 1, start - 1 + n)
            targets += list(responses[i])
        picked = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        lp = processed_logps(picked, temperature, top_k, top_p)
        tok_lp = lp.gather(1, torch.tensor(targets, device=device)[:, None])[:, 0].cpu().numpy()
        at = 0
        for i in batch:
            n = len(responses[i])
            out[i] = tok_lp[at:at + n]
            at += n
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- the stage

@dataclasses.dataclass
class LogprobsConfig(BackendOptions, ExecutorOptions):
    generations: str = opt(help="input generations dataset (directory or URL)")
    output: str = opt(help="output dataset: the input rows with ref_logps and ref_logps_sum")
    reference: str = opt(help="reference model directory (usually the starting policy)")
    token_budget: int = opt(16384, "hf backend: tokens per forward batch (rows x longest "
                            "prompt+response)")
    dtype: str = opt("auto", "auto | float32 | bfloat16 | float16")
    bits: int | None = opt(None, "load the reference in 4 or 8 bits (bitsandbytes); for a QLoRA "
                           "policy, its --bits: the reference is then the base its adapter starts from")
    device: str | None = opt(None, "cuda | cpu (default: cuda when available)")
    trust_remote_code: bool = opt(False, "allow custom model code from the model directory")

    def __post_init__(self):
        super().__post_init__()
        if self.token_budget < 1:
            raise InputError(f"token_budget: must be >= 1, got {self.token_budget}")


def compute_logprobs(cfg: LogprobsConfig) -> dict:
    """Run the logprobs stage: reference log-probs of every response into a new dataset."""
    return run_stage(plan_logprobs(cfg), cfg)


def plan_logprobs(cfg: LogprobsConfig) -> StagePlan:
    src = open_dataset(cfg.generations, require_complete=True)
    if src.schema_name != "generations":
        raise InputError(f"{cfg.generations}: is a {src.schema_name} dataset, not generations")
    check_model_dir(cfg.reference, "reference model")
    check_backend(cfg, "logprobs")
    ref_fp = fingerprint(cfg.reference)
    hashed = {k: v for k, v in to_dict(cfg).items()
              if k not in ("output", "token_budget", "device", *EXECUTOR_OPTIONS,
                           *SPEED_OPTIONS)}
    hashed.update(generations=src.fingerprint, reference=ref_fp)
    lineage = {**src.lineage, "reference_fingerprint": ref_fp, "generations": src.fingerprint}
    return StagePlan(name="logprobs", unit="rows", units=[e["rows"] for e in src.shards],
                     writer={"url": cfg.output, "schema": "generations", "lineage": lineage,
                             "config_hash": config_hash(hashed)},
                     worker=LogprobsWorker(cfg, ref_fp), info={"config": to_dict(cfg)})


class LogprobsWorker(LazyWorker):
    """Reference log-probs of chunks of generations; the reference loads on first use."""

    def __init__(self, cfg: LogprobsConfig, ref_fp: str):
        self.cfg, self.ref_fp = cfg, ref_fp

    def load(self):
        cfg = self.cfg
        tokenizer = load_tokenizer(cfg.reference, cfg.trust_remote_code)
        return (open_dataset(cfg.generations, require_complete=True), tokenizer,
                backend_module(cfg.backend).ReferenceModel(cfg, tokenizer))

    def compute(self, chunk: int, progress) -> tuple[pa.Table, dict]:
        src, tok, model = self.loaded
        table = src.read_shard(chunk)
        prompts = table.column("prompt_token_ids").to_pylist()
        responses = table.column("response_token_ids").to_pylist()
        if any(p is None for p in prompts):
            raise InputError(f"{src.url}: chunk {chunk} has rows without prompt_token_ids; "
                             "the logprobs stage needs the generator's token ids")
        _check_vocab(tok, prompts, responses, self.cfg.reference)
        logps = model.sequence_logps(prompts, responses)
        progress.update(units=table.num_rows, samples=table.num_rows,
                        tokens=sum(len(r) for r in responses))
        table = replace_column(table, "ref_logps", pa.array([x.tolist() for x in logps],
                                                            pa.list_(pa.float32())))
        table = replace_column(table, "ref_logps_sum",
                               pa.array([float(x.astype(np.float64).sum()) for x in logps]))
        table = replace_column(table, "reference_fingerprint",
                               pa.array([self.ref_fp] * table.num_rows))
        return table, {}


def _check_vocab(tok, prompts, responses, where) -> None:
    top = max((max(s) for s in list(prompts) + list(responses) if s), default=-1)
    if top >= len(tok):
        raise InputError(f"{where}: token id {top} is outside the reference tokenizer "
                         f"(vocabulary {len(tok)}): the reference must share the policy's tokenizer")
