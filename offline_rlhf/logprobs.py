"""The reference log-probs stage (the log-prob math itself is in :mod:`offline_rlhf.logps`).

It stores the reference model's per-token and summed log-probs of every response, so no
optimiser loads the reference model: DPO-family training reads them from the shard.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .backends import SPEED_OPTIONS, BackendOptions, backend_module, check_backend
from .config import opt, to_dict
from .errors import InputError, located
from .executors import EXECUTOR_OPTIONS, ExecutorOptions, run_stage
from .lineage import config_hash
from .logps import processed_logps, sequence_logps  # noqa: F401  (their old home)
from .models import check_model_dir, fingerprint, load_tokenizer
from .schemas import replace_column
from .shards import open_dataset
from .stage import LazyWorker, StagePlan

# --------------------------------------------------------------------------- the stage

@dataclasses.dataclass
class LogprobsConfig(BackendOptions, ExecutorOptions):
    generations: str = opt(help="input generations dataset (directory or URL)")
    output: str = opt(help="output dataset: the input rows with ref_logps and ref_logps_sum")
    reference: str = opt(help="reference model directory (usually the starting policy)")
    overwrite: bool = opt(False, "replace an existing output dataset: it is removed (datasets only) once every input is checked, and the stage starts afresh")
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
    check_inputs(src, len(load_tokenizer(cfg.reference, cfg.trust_remote_code)), cfg.reference)
    ref_fp = fingerprint(cfg.reference)
    hashed = {k: v for k, v in to_dict(cfg).items()
              if k not in ("output", "overwrite", "token_budget", "device", *EXECUTOR_OPTIONS,
                           *SPEED_OPTIONS)}
    hashed.update(generations=src.fingerprint, reference=ref_fp)
    lineage = {**src.lineage, "reference_fingerprint": ref_fp, "generations": src.fingerprint}
    return StagePlan(name="logprobs", unit="rows", units=[e["rows"] for e in src.shards],
                     writer={"url": cfg.output, "schema": "generations", "lineage": lineage,
                             "config_hash": config_hash(hashed), "config": hashed},
                     worker=LogprobsWorker(cfg, ref_fp), info={"config": to_dict(cfg)},
                     overwrite=cfg.overwrite)


def check_inputs(src, vocab: int, reference: str) -> None:
    """Before the first output: every shard's size and sha256, token ids on every row,
    and every id inside the reference's vocabulary."""
    src.verify()
    for e in src.shards:
        table = src.read_shard(e["chunk"], columns=["prompt_token_ids", "response_token_ids"],
                               verify=False)
        where = src.store.display(e["name"])
        missing = table.column("prompt_token_ids").is_null().to_pylist()
        if any(missing):
            raise InputError(located("no prompt_token_ids: the logprobs stage needs the "
                                     "generator's token ids", where, missing.index(True),
                                     "prompt_token_ids"))
        for column in ("prompt_token_ids", "response_token_ids"):
            top = pc.max(pc.list_flatten(table.column(column))).as_py()
            if top is not None and top >= vocab:
                raise InputError(f"{where}: token id {top} in {column} is outside the "
                                 f"reference tokenizer {reference} (vocabulary {vocab}): the "
                                 "reference must share the policy's tokenizer")


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
