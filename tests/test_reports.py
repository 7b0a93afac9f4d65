"""Issue 27, item 4: reports a person reads. One `pipeline run` of an eval stage through
the CLI checks KL on by default, --ilql-heads, sample responses (the same prompts before
and after) and the figures printed at the end; bad eval options fail in one line before
any generation."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from cli_helpers import cli

from offline_rlhf.cli import main

PROMPTS = [{"prompt": f"Copy: {i} {i + 1} =>", "reference_answer": f"{i} {i + 1}"} for i in range(4)]

EVAL_JOB = """
name = "eval-only"
workdir = "{work}"
[inputs]
policy = "{policy}"
prompts = "{prompts}"
rm = "{rm}"
[stages.eval]
kind = "eval"
policy = "inputs.policy"
ilql_heads = "{heads}"
ilql_beta = 8.0
baseline = "inputs.policy"
prompts = "inputs.prompts"
reward_model = "inputs.rm"
weights = {{ reward_model = 1.0 }}
max_new_tokens = 4
"""


def _inputs(tmp_path, policy_dir):
    from offline_rlhf.ilql import ILQLHeads, save_heads
    cfg = json.loads((Path(policy_dir) / "config.json").read_text())
    torch.manual_seed(0)
    save_heads(ILQLHeads(cfg["hidden_size"], cfg["vocab_size"]), tmp_path / "heads")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return prompts, tmp_path / "heads"


def test_pipeline_eval_prints_figures_with_kl_by_default_and_samples(tmp_path, policy_dir, reward_dir):
    prompts, heads = _inputs(tmp_path, policy_dir)
    job = tmp_path / "job.toml"
    job.write_text(EVAL_JOB.format(work=tmp_path / "w", policy=policy_dir, prompts=prompts, heads=heads,
                                    rm=reward_dir))
    out = cli("pipeline", "run", job, "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    ev = next((tmp_path / "w" / "stages").glob("eval-*"))
    results = json.loads((ev / "results.json").read_text())
    # KL on by default: 2 samples per prompt at T=1 from each model (greedy evaluation)
    p, b = results["policy"], results["baseline"]
    assert p["kl_samples"] == b["kl_samples"] == 2 * len(PROMPTS)
    assert p["kl_to_reference"] > 0 and 0 <= b["kl_to_reference"] < 1e-5   # guided vs plain
    assert results["config"]["ilql_heads"] == str(heads)
    # the printed end: each eval's before/after table and its report path
    tail = out.stdout[out.stdout.index("eval stage eval:"):]
    assert "baseline" in tail and "policy" in tail and "KL to ref" in tail
    assert f"{b['reward_mean']:.4g}" in tail and f"{p['kl_to_reference']:.4g}" in tail
    assert f"report: {ev / 'report.md'}" in tail and "win rate of the policy" in tail
    # sample responses: the same prompt for both models, best / worst / random
    samples = results["samples"]
    assert [s["kind"] for s in samples][:2] == ["best", "worst"]
    gains = [s["models"][1]["reward"] - s["models"][0]["reward"] for s in samples]
    assert gains[0] == max(gains) and gains[1] == min(gains)
    report = (ev / "report.md").read_text()
    assert "## Sample responses" in report and "### best" in report and "### worst" in report
    for s in samples:
        assert [m["label"] for m in s["models"]] == ["baseline", "policy"]
        assert s["prompt"] in PROMPTS[int(s["prompt"].split()[1])]["prompt"]


def test_eval_options_are_checked_before_any_generation(tmp_path, policy_dir, capsys):
    prompts, heads = _inputs(tmp_path, policy_dir)
    base = ["eval", "--policy", str(policy_dir), "--prompts", str(prompts), "--quiet"]
    for extra, words in ((["--output", str(tmp_path / "a")], "nothing to score"),
                         (["--output", str(tmp_path / "b"), "--weights", "exact=1"],
                          "weights.exact: unknown component"),
                         (["--output", str(tmp_path / "c"), "--weights", "exact_match=1",
                           "--ilql-heads", str(tmp_path / "w")], "no ILQL heads")):
        (tmp_path / "w").mkdir(exist_ok=True)
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and words in err, err
        assert not Path(extra[1]).exists()    # before any work: no output directory either


def test_train_rm_prints_held_out_accuracy_and_writes_a_model_card(tmp_path, policy_dir, pairs_ds):
    """`train rm` (2 steps) prints the held-out pairwise accuracy, not only the training
    batch's; final/README.md names the base model and the data by content key, the
    command and the final figures (item 7); its progress lines have an ETA (item 5)."""
    out = cli("train", "rm", "--data", pairs_ds, "--policy", policy_dir, "--output", tmp_path / "rm",
              "--max-steps", "2", "--batch-size", "8", "--eval-fraction", "0.25",
              "--report-to", "none", env={"OFFLINE_RLHF_PROGRESS_SECONDS": "0", "TQDM_DISABLE": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    # item 5: plain progress lines (stderr is a pipe) with one rate and the time left
    lines = [x for x in out.stderr.splitlines() if x.startswith("train rm: ")]
    assert lines[0].startswith("train rm: 1/2 step (50%), ") and ", ETA " in lines[0], lines
    assert lines[-1].startswith("train rm: 2/2 step (100%) done") and "ETA" not in lines[-1]
    assert all(x.count("/s") == 1 and " step/s" in x for x in lines), lines
    summary = json.loads((tmp_path / "rm" / "train_summary.json").read_text())
    acc, n = summary["eval"]["eval/accuracy"], summary["data"]["eval_pairs"]
    assert n > 0 and f"held-out ({n} pairs): accuracy {acc:.4g}" in out.stdout, out.stdout
    card = (tmp_path / "rm" / "final" / "README.md").read_text()
    ident = json.loads((tmp_path / "rm" / "config.json").read_text())["identity"]
    assert f"`{policy_dir}` (content key `{ident['policy']}`)" in card
    assert f"`{pairs_ds}` (content key `{ident['data']}`)" in card
    assert "offline-rlhf train rm --data" in card and "| eval/accuracy |" in card
    assert f"| loss | {summary['last']['loss']:.6g} |" in card
    assert f"model card: {tmp_path / 'rm' / 'final' / 'README.md'}" in out.stdout


def test_stage_progress_lines_show_one_right_rate(monkeypatch, capsys):
    """Plain lines: tokens/s where a stage counts tokens (generate, score, logprobs), its
    unit per second where it does not (pairs: no `tokens/s 0`); an ETA until the end."""
    from offline_rlhf import console
    from offline_rlhf.stage import Progress
    monkeypatch.setenv("OFFLINE_RLHF_PROGRESS_SECONDS", "0")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setitem(console._state, "quiet", False)   # an earlier main(--quiet) set it
    gen = Progress(8, "generate", "prompts")
    gen.update(units=4, samples=16, tokens=160)
    gen.update(units=4, samples=16, tokens=160)
    gen.close()
    pairs = Progress(10, "pairs", "rows")
    pairs.update(units=5, samples=2)
    pairs.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5, lines
    assert all(x.count("/s") == 1 for x in lines), lines
    assert all(" tokens/s" in x for x in lines[:3]) and all(" rows/s" in x for x in lines[3:])
    assert ", ETA " in lines[0] and "ETA" not in lines[1] + lines[2]   # nothing left
    assert lines[2].startswith("generate: 8/8 prompts (100%) done, ")
    assert ", ETA " in lines[3] and "done" not in lines[4] and "ETA" not in lines[4]   # closed early
