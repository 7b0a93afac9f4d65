"""A training run's identity, and what a run does with an output that already holds one.

The identity is every option that changes the run's trajectory, with the paths that
name content replaced by their content keys: the policy (and a DPO reference) by
:func:`models.fingerprint`, the data (and GRPO's ``previous_data``) by the dataset's
:attr:`fingerprint` or a file's sha256. Options that change only how a step is computed
or what is written are left out (:data:`NOT_IN_IDENTITY`): a run may resume on another
device, with a smaller micro-batch after running out of memory, or with checkpoints
every other number of steps, and still follow the same trajectory.

The identity is written into ``config.json`` when a run starts, into every checkpoint's
``state.json`` and into ``train_summary.json``. With ``--resume auto`` a run:

- does nothing (and says so) when an identical run finished in OUTPUT;
- resumes from the latest checkpoint only if an identical run wrote it;
- is refused, in one line naming the differing options, when OUTPUT holds another run;
  ``--overwrite`` deletes that run's files first, ``--resume never`` starts at step 0.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..config import to_dict
from ..errors import InputError
from ..manifest import config_diff
from ..storage import read_json_file
from . import checkpoint as ckpt

# Options that do not change the trajectory: where output goes and how it is logged or
# checkpointed; how a step is cut into forward passes (a step's gradient is the mean over
# the same examples whatever the micro-batches: only rounding differs) or where it runs;
# what the final save holds; permission to run a model's code.
NOT_IN_IDENTITY = frozenset({
    "output", "report_to", "log_steps", "save_steps", "save_total_limit", "resume", "overwrite",
    "micro_batch_size", "max_tokens_per_micro_batch", "group_by_length", "gradient_checkpointing",
    "device", "save_merged", "trust_remote_code",
    "share_prompt", "prefix_attention",       # DPO: how a pair is laid out in a forward pass
})
MODEL_PATHS = ("policy", "reference")          # replaced by models.fingerprint
DATA_PATHS = ("data", "previous_data")         # replaced by the data's content key
# What a run writes in OUTPUT, deleted by --overwrite. The DPO reference log-probs
# (reference_logps.safetensors) are kept: they are keyed by content and checked.
RUN_FILES = ("checkpoints", "final", "adapter", "train_summary.json", "metrics.jsonl",
             "config.json", "tensorboard")


def data_key(path: str) -> str:
    """The content key of a dataset (its fingerprint) or of a file (its sha256)."""
    from ..shards import is_dataset, open_dataset
    if is_dataset(path):
        return "dataset:" + open_dataset(path).fingerprint
    import fsspec
    digest = hashlib.sha256()
    with fsspec.open(str(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "file:" + digest.hexdigest()


def run_identity(cfg) -> dict:
    """The options of ``cfg`` that change the trajectory, paths replaced by content keys."""
    from ..models import fingerprint
    ident = {"algorithm": type(cfg).__name__.removesuffix("TrainConfig").lower()}
    for key, value in to_dict(cfg).items():
        if key in NOT_IN_IDENTITY:
            continue
        if key in MODEL_PATHS and value:
            value = "model:" + fingerprint(value)
        elif key in DATA_PATHS and value:
            value = [data_key(v) for v in value] if isinstance(value, list) else data_key(value)
        ident[key] = value
    return json.loads(json.dumps(ident))    # as it reads back from a file


def differences(recorded: dict | None, current: dict) -> str:
    """The differing keys, with their values where they are short."""
    if not isinstance(recorded, dict):
        return "it records no run identity (written by an older version)"
    return config_diff(recorded, current, opaque=MODEL_PATHS + DATA_PATHS)


class Finished(Exception):
    """Internal: an identical run already finished in OUTPUT (``summary`` is its summary)."""

    def __init__(self, summary: dict):
        super().__init__("already finished")
        self.summary = summary


def _same(recorded, current: dict, where: Path, out: Path) -> None:
    if recorded != current:
        raise InputError(f"{where}: written by a run with other settings ({differences(recorded, current)}); "
                         f"to start afresh in {out} pass --overwrite (deletes that run's checkpoints, "
                         "final model and metrics) or --resume never (trains from step 0), or choose "
                         "another --output")


def _recorded(path: Path, key: str = "identity"):
    data = read_json_file(path)
    return data.get(key) if data is not None else None


def _delete(out: Path, names) -> None:
    for name in names:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def prepare_output(cfg, identity: dict, acc) -> Path | None:
    """The checkpoint to resume from (or None), after deleting what this run replaces.
    Raises :class:`Finished` when an identical run finished in OUTPUT (``--resume
    auto``), :class:`InputError` when OUTPUT or ``--resume PATH`` holds another run."""
    out = Path(cfg.output)
    resume_from, delete = None, ["train_summary.json"]   # a run that starts is not done
    if cfg.overwrite:
        delete = list(RUN_FILES)
    elif cfg.resume == "never":
        delete.append(ckpt.CKPT_DIR)                      # this run's checkpoints replace them
    elif cfg.resume != "auto":
        resume_from = ckpt.find_resume(out, cfg.resume)
        _same(_recorded(resume_from / "state.json"), identity, resume_from, out)
    else:
        summary = read_json_file(out / "train_summary.json")
        if summary is not None:
            _same(summary.get("identity"), identity, out / "train_summary.json", out)
            if (out / "final").is_dir():
                raise Finished(summary)
        resume_from = ckpt.find_resume(out, "auto")
        if resume_from is not None:
            _same(_recorded(resume_from / "state.json"), identity, resume_from, out)
        elif (out / "config.json").is_file():
            _same(_recorded(out / "config.json"), identity, out / "config.json", out)
    acc.wait_for_everyone()      # every process has read OUTPUT before anything is deleted
    if acc.is_main_process and out.is_dir():
        _delete(out, delete)
    acc.wait_for_everyone()
    return resume_from
