"""The model card of a training run: ``README.md`` in ``OUTPUT/final/`` (or in
``OUTPUT/adapter/`` when a LoRA run writes no merged model).

It says what a person picking up the directory needs: the base model (path and content
key), the training data (path and content key), the algorithm and the command (or the
Python call) that made it, and the final figures: the last logged step's metrics and,
where the algorithm has them, the held-out ones (``train rm``: held-out pairwise
accuracy). Content keys are those of the run identity (see
:mod:`offline_rlhf.train.identity`), so the card names the inputs by content, not by a
path that may move. ``README.md`` is not among the fingerprinted files, so the card does
not change the model's content key.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from ..storage import write_file_atomic

SKIPPED = ("seconds", "epoch", "step")


def card_dir(out: Path) -> Path | None:
    for name in ("final", "adapter"):
        if (out / name).is_dir():
            return out / name
    return None


def _command() -> str:
    argv = sys.argv
    if argv and (argv[0].endswith("offline-rlhf") or argv[0].endswith("cli.py")
                 or argv[0] == "-m"):
        return "offline-rlhf " + shlex.join(argv[1:])
    return f"from Python ({shlex.join(argv) or 'an interactive session'}); the resolved " \
           "config is below"


def _figures(values: dict) -> list[str]:
    return [f"| {k} | {v:.6g} |" for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in SKIPPED]


def render_card(algorithm: str, cfg_dict: dict, identity: dict, summary: dict) -> str:
    keys = {k: v for k, v in identity.items() if isinstance(v, str) and ":" in v}
    data = cfg_dict.get("data")
    md = [f"# {algorithm} model trained with offline-rlhf", "",
          f"- base model: `{cfg_dict.get('policy')}` (content key `{keys.get('policy', '-')}`)",
          f"- data: `{data}` (content key `{keys.get('data', '-')}`)" if data else "- data: -",
          f"- steps: {summary.get('steps')}",
          f"- command: `{_command()}`", ""]
    last = _figures(summary.get("last") or {})
    if last:
        md += ["## Last training step", "", "| metric | value |", "|---|---|", *last, ""]
    held = _figures(summary.get("eval") or {})
    if held:
        md += ["## Held-out", "", "| metric | value |", "|---|---|", *held, ""]
    if summary.get("data"):
        md += ["## Data", "", "```json", json.dumps(summary["data"], indent=1, default=str), "```", ""]
    md += ["## Config", "", "```json", json.dumps(cfg_dict, indent=1, default=str), "```", ""]
    return "\n".join(md)


def write_card(out: Path, algorithm: str, cfg_dict: dict, identity: dict, summary: dict) -> None:
    where = card_dir(out)
    if where is not None:
        write_file_atomic(where / "README.md", render_card(algorithm, cfg_dict, identity, summary))
