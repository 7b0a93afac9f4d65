"""Summaries of a dataset for ``offline-rlhf inspect``: counts, lineage, reward statistics."""

from __future__ import annotations

import polars as pl

from .dataset import Dataset
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
