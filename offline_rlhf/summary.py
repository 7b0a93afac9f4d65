"""Summaries for ``offline-rlhf inspect``: of a dataset (counts, lineage, reward
statistics), or of a user's JSONL/JSON/Parquet file (its layout and the commands that
read it)."""

from __future__ import annotations

import polars as pl

from .dataset import Dataset
from .errors import InputError
from .rewards.judge_stats import pairwise_diagnostics, pointwise_diagnostics

STAT_COLUMNS = {
    "generations": ["reward", "reward_normalized", "ref_logps_sum"],
    "pairs": ["chosen_reward", "rejected_reward", "margin"],
    "prompts": [],
}


def _stats(frame: pl.LazyFrame, expr: pl.Expr) -> dict:
    row = frame.select(count=expr.count(), mean=expr.mean(), std=expr.std(),
                       min=expr.min(), max=expr.max()).collect().row(0, named=True)
    return row


def summarize(ds: Dataset, verify: bool = True) -> dict:
    """Everything ``inspect`` shows, as JSON-able data. A key in two rows, or a shard
    that does not decode, is refused in one line naming the file (and row)."""
    ds.check_keys()
    out = {"dataset": ds.url, "schema": ds.schema_name, "schema_version": ds.schema_version,
           "complete": ds.complete, "rows": ds.num_rows, "shards": len(ds.shards),
           "content_key": ds.fingerprint, "config_hash": ds.config_hash,
           "code_version": ds.manifest.get("code_version"),
           "lineage": ds.lineage, "counts": ds.stats, "reward_stats": {}}
    if ds.schema_name == "pairs":
        out["judge"] = pairwise_diagnostics(ds.stats)
    if ds.num_rows == 0:
        return out
    try:
        return _statistics(ds, ds.to_polars(verify=verify), out)
    except pl.exceptions.PolarsError as e:   # a shard that decodes badly (--no-verify)
        raise ds.unreadable(e) from None


def _statistics(ds: Dataset, lf: pl.LazyFrame, out: dict) -> dict:
    for col in STAT_COLUMNS.get(ds.schema_name, []):
        out["reward_stats"][col] = _stats(lf, pl.col(col))
    if ds.schema_name == "generations":
        comps = (lf.select(pl.col("reward_components")).explode("reward_components")
                 .drop_nulls().unnest("reward_components"))
        for name in sorted(comps.select(pl.col("name").unique()).collect()["name"].to_list()):
            out["reward_stats"][f"component:{name}"] = _stats(
                comps.filter(pl.col("name") == name), pl.col("value"))
        out["judge"] = _pointwise_judge(lf)
        out["counts"] = {**out["counts"], **lf.select(
            prompts=pl.col("prompt_id").n_unique(),
            mean_response_tokens=pl.col("response_token_ids").list.len().mean(),
        ).collect().row(0, named=True)}
    if ds.schema_name == "prompts":
        out["counts"] = {**out["counts"], **lf.select(
            text_prompts=pl.col("prompt").is_not_null().sum(),
            chat_prompts=pl.col("messages").is_not_null().sum(),
            with_reference_answer=pl.col("reference_answer").is_not_null().sum(),
        ).collect().row(0, named=True)}
    return out


def _pointwise_judge(lf: pl.LazyFrame) -> dict:
    """Judge diagnostics of a generations dataset scored with a ``judge`` component."""
    rows = (lf.with_row_index("row").select("row", "reward_components",
                                            n=pl.col("response_token_ids").list.len())
            .explode("reward_components").drop_nulls("reward_components")
            .unnest("reward_components").collect())
    if "judge" not in set(rows["name"].to_list()):
        return {}
    wide = rows.pivot(on="name", index=["row", "n"], values="value").sort("row")
    others = {c: wide[c].to_numpy() for c in wide.columns if c not in ("row", "n", "judge")}
    return pointwise_diagnostics(wide["judge"].to_numpy(), others, wide["n"].to_numpy())


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render(summary: dict) -> str:
    """The summary as a small text table."""
    lines = []
    kv = [("dataset", summary["dataset"]),
          ("schema", f"{summary['schema']} {summary['schema_version']}"),
          ("status", "complete" if summary["complete"] else "INCOMPLETE (a stage did not finish)"),
          ("rows", summary["rows"]), ("shards", summary["shards"]),
          ("content key", summary["content_key"]),
          ("config hash", summary["config_hash"]), ("code version", summary["code_version"])]
    kv += [(f"lineage.{k}", v) for k, v in sorted(summary["lineage"].items())]
    kv += [(f"count.{k}", v) for k, v in sorted(summary["counts"].items())]
    kv += [(f"judge.{k}", v) for k, v in (summary.get("judge") or {}).items()]
    width = max(len(k) for k, _ in kv)
    lines += [f"{k:<{width}}  {_fmt(v)}" for k, v in kv]
    if summary["reward_stats"]:
        cols = ["count", "mean", "std", "min", "max"]
        names = list(summary["reward_stats"])
        w = max(len(n) for n in names + ["column"])
        lines += ["", f"{'column':<{w}}  " + "  ".join(f"{c:>10}" for c in cols)]
        for n in names:
            s = summary["reward_stats"][n]
            lines.append(f"{n:<{w}}  " + "  ".join(f"{_fmt(s.get(c)):>10}" for c in cols))
    return "\n".join(lines)


# --------------------------------------------------------------------------- a user's file

def _kind(rows: list[dict], column: str) -> str:
    value = next((r.get(column) for r in rows if r.get(column) is not None), None)
    return "chat messages" if isinstance(value, list) else "text"


def _file_layout(rows: list[dict], columns: list[str]) -> tuple[str, str, str] | None:
    """(layout, the commands that read it, the ``validate`` schema) of a file's columns."""
    from .schemas import load_schema
    have = set(columns)
    for name in ("pairs", "generations", "prompts"):
        if {c.name for c in load_schema(name).columns if not c.nullable} <= have:
            return (f"a {name} table as the engine stores it", f"the commands that read {name} "
                    "datasets, once it is a dataset (it has no manifest)", name)
    if {"chosen", "rejected"} <= have:
        prompt = f"prompt ({_kind(rows, 'prompt')}) + " if "prompt" in have else "implicit prompt + "
        return (f"preferences: {prompt}chosen/rejected ({_kind(rows, 'chosen')})",
                "`import-pairs FILE OUT`, `train dpo|rm --data FILE`", "preferences")
    if {"prompt", "completion"} <= have or "text" in have:
        lay = f"prompt + completion ({_kind(rows, 'completion')})" if "completion" in have else "text"
        return f"SFT: {lay}", "`train sft --data FILE`", "sft"
    if "messages" in have:
        return ("conversations (messages): SFT data, or chat prompts", "`train sft --data FILE`; "
                "`import-prompts FILE OUT` (or `generate --prompts FILE`)", "sft or prompts-file")
    if "prompt" in have:
        return (f"prompts ({_kind(rows, 'prompt')})", "`import-prompts FILE OUT`, `generate|eval "
                "--prompts FILE`", "prompts-file")
    return None


def describe_file(path: str) -> dict:
    """What ``inspect`` says of a JSONL/JSON/Parquet file: its rows, columns, layout and the
    commands that read it; columns in no known layout are one line naming them and what
    to rename (``--prompt-column``, ...)."""
    from .datafiles import read_rows
    rows, columns = read_rows(path)
    found = _file_layout(rows, columns)
    if found is None:
        raise InputError(f"{path}: no layout that a command reads in columns "
                         f"{', '.join(columns) or '(none)'}: expected prompt + chosen + rejected "
                         "(preferences), prompt + completion, messages or text (SFT), or prompt "
                         "(prompts); validate, import-pairs, import-prompts and train sft take "
                         "yours with --prompt-column, --chosen-column, --rejected-column, "
                         "--completion-column, --messages-column")
    layout, readers, schema = found
    return {"file": path, "rows": len(rows), "columns": columns, "layout": layout,
            "read_by": readers, "validate": f"offline-rlhf validate {path} --schema "
            f"{schema.split(' or ')[0]}"}


def render_file(d: dict) -> str:
    kv = [("file", d["file"]), ("rows", d["rows"]), ("columns", ", ".join(d["columns"])),
          ("layout", d["layout"]), ("read by", d["read_by"]), ("check with", d["validate"])]
    return "\n".join(f"{k:<10}  {v}" for k, v in kv)
