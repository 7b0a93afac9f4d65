"""Evaluation: win rate with known answers, honest KL numbers and report plots."""

import json

import numpy as np
import pytest
from conftest import cli_on_cpu, finished

from offline_rlhf import cli
from offline_rlhf.errors import InputError
from offline_rlhf.evaluate import kl_k3, win_rate


def test_k3_is_never_negative_and_estimates_kl_without_bias():
    """On a categorical distribution: the mean of k3 over samples of pi converges to the
    exact KL(pi || ref); every single estimate is >= 0 and 0 when pi equals ref."""
    rng = np.random.default_rng(0)
    pi = np.array([0.5, 0.3, 0.15, 0.05])
    ref = np.array([0.25, 0.25, 0.25, 0.25])
    exact = float(np.sum(pi * np.log(pi / ref)))
    # sequences of 3 independent tokens: the sequence KL is 3 x the per-token KL
    tokens = rng.choice(4, size=(200_000, 3), p=pi)
    est = kl_k3(np.log(pi)[tokens].tolist(), np.log(ref)[tokens].tolist())
    assert (est >= 0).all()
    assert est.mean() == pytest.approx(3 * exact, rel=0.01)
    # the naive estimator sum(log pi - log ref) has the same mean but goes negative
    naive = (np.log(pi)[tokens] - np.log(ref)[tokens]).sum(1)
    assert (naive < 0).any() and naive.mean() == pytest.approx(3 * exact, rel=0.02)
    same = kl_k3([[-0.5, -1.2]], [[-0.5, -1.2]])
    assert same.tolist() == [0.0]


def heldout(tmp_path):
    rows = [{"prompt": f"Copy: {i} {i + 1} =>", "reference_answer": f"{i} {i + 1}"} for i in range(6)]
    (tmp_path / "h.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "h.jsonl")


def test_greedy_eval_reports_no_kl_and_sampled_kl_is_not_negative(tmp_path, policy_dir, capsys):
    """Greedy with kl_samples 0: KL null, with the reason. With kl_samples: sampled from the policy at T=1,
    k3, never negative; a model's KL to itself is 0."""
    from offline_rlhf.tiny import build_tiny_model
    other = build_tiny_model(tmp_path / "other", seed=3)
    base = ["eval", "--policy", str(other), "--baseline", str(policy_dir), "--prompts", heldout(tmp_path),
            "--weights", "exact_match=1", "--max-new-tokens", "4", "--quiet"]
    assert cli.main([*base, "--output", str(tmp_path / "greedy"), "--kl-samples", "0"]) == 0
    r = json.loads((tmp_path / "greedy" / "results.json").read_text())
    assert r["policy"]["kl_to_reference"] is None and r["baseline"]["kl_to_reference"] is None
    assert "greedy decoding does not sample from the model itself" in r["policy"]["kl_note"]
    report = (tmp_path / "greedy" / "report.md").read_text()
    assert "| KL to reference (± s.e.) | n/a | n/a |" in report and "No reward-vs-KL plot" in report
    assert not (tmp_path / "greedy" / "reward_vs_kl.png").exists()

    # in a child on CPU: a model's KL to itself is 0 only where sampling (with a KV cache)
    # and the reference pass compute alike, in float32 (on CUDA both would run in bf16)
    finished(cli_on_cpu([*base, "--output", tmp_path / "kl", "--kl-samples", "3"]))
    r = json.loads((tmp_path / "kl" / "results.json").read_text())
    p, b = r["policy"], r["baseline"]
    assert p["kl_samples"] == b["kl_samples"] == 18
    assert p["kl_to_reference"] > 0.01 and p["kl_stderr"] > 0       # another model
    assert 0 <= b["kl_to_reference"] < 1e-6                          # the reference itself
    assert (tmp_path / "kl" / "reward_vs_kl.png").stat().st_size > 1000
    # sampled at temperature 1, the evaluation's own samples serve
    assert cli.main([*base, "--output", str(tmp_path / "s"), "--no-greedy", "--num-samples", "2"]) == 0
    r = json.loads((tmp_path / "s" / "results.json").read_text())
    assert r["policy"]["kl_samples"] == 12 and r["policy"]["kl_to_reference"] >= 0
    assert not (tmp_path / "s" / "policy" / "kl-generations").exists()


def _figure_of(monkeypatch):
    import matplotlib.figure
    figs = []
    save = matplotlib.figure.Figure.savefig

    def spy(self, *a, **k):
        figs.append(self)
        return save(self, *a, **k)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return figs


def test_report_plots(tmp_path, monkeypatch):
    from matplotlib.ticker import MaxNLocator

    from offline_rlhf.plots import curves, histograms, points
    figs = _figure_of(monkeypatch)
    # reward vs KL: points with error bars; nothing joins two points
    points([{"x": 0.0, "y": 0.2, "xerr": 0.0, "yerr": 0.04, "label": "baseline"},
            {"x": 0.8, "y": 0.5, "xerr": 0.1, "yerr": 0.05, "label": "checkpoint 0"},
            {"x": 2.0, "y": 0.7, "xerr": 0.1, "yerr": 0.05, "label": "policy"}],
           tmp_path / "kl.png", "t", "KL", "reward")
    (ax,) = figs[-1].axes
    joined = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1 and ln.get_linestyle() not in ("None", "")]
    assert not joined and len(ax.containers) == 3
    assert not ax.get_legend() and figs[-1].legends      # the legend sits outside the axes
    # training curves: one axis per quantity, integer steps
    curves([1, 2, 3], {"loss": [0.7, 0.6, 0.5], "rewards/margins": [0.0, 3.0, 9.0]},
           tmp_path / "c.png", "t")
    axes = figs[-1].axes
    assert [a.get_ylabel() for a in axes] == ["loss", "rewards/margins"]
    assert isinstance(axes[-1].xaxis.get_major_locator(), MaxNLocator)
    assert all(float(t).is_integer() for t in axes[-1].get_xticks())
    # a histogram whose smallest bar would be invisible gets a log count axis
    histograms({"baseline": [0.0] * 199 + [1.0], "policy": [0.0] * 100 + [1.0] * 100},
               tmp_path / "h.png", "t")
    assert figs[-1].axes[0].get_yscale() == "log"
    histograms({"baseline": [0.0] * 60 + [1.0] * 40}, tmp_path / "h2.png", "t")
    assert figs[-1].axes[0].get_yscale() == "linear"


def keyed(*rewards):
    return {(f"p{i}", 0): r for i, r in enumerate(rewards)}


def test_win_rate_known_answers():
    baseline = keyed(0.0, 1.0, -2.0, 0.5)
    assert win_rate(keyed(1.0, 2.0, -1.0, 0.6), baseline) == 1.0    # always better
    assert win_rate(keyed(-1.0, 0.0, -3.0, 0.4), baseline) == 0.0   # never better
    assert win_rate(dict(baseline), baseline) == 0.5                 # ties count half
    # win, tie, loss, win: (1 + 0.5 + 0 + 1) / 4
    assert win_rate(keyed(0.1, 1.0, -2.5, 0.7), baseline) == 0.625


def test_win_rate_pairs_samples_by_prompt_and_index():
    policy = {("a", 0): 1.0, ("a", 1): 0.0, ("b", 0): 5.0}
    baseline = {("a", 0): 0.0, ("a", 1): 1.0, ("c", 0): -9.0}
    assert win_rate(policy, baseline) == 0.5   # only ("a", 0) won, ("a", 1) lost
    with pytest.raises(InputError, match="share no evaluated prompt"):
        win_rate({("b", 0): 1.0}, {("c", 0): 0.0})


def test_eval_rerun_with_other_options_is_refused_and_overwrite_starts_afresh(tmp_path, policy_dir):
    """Through the CLI: an eval rerun into the same OUTPUT with another option is refused in
    one line naming that option; --overwrite removes the earlier eval and runs anew; a
    directory that is not an eval's output is never removed by it."""
    from cli_helpers import cli as run_cli
    from cli_helpers import one_error_line
    base = ["eval", "--policy", policy_dir, "--prompts", heldout(tmp_path), "--weights",
            "exact_match=1", "--output", tmp_path / "ev"]
    assert run_cli(*base, "--max-new-tokens", "3").returncode == 0
    first = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert first["config"]["max_new_tokens"] == 3
    one_error_line(run_cli(*base, "--max-new-tokens", "4"), "max_new_tokens: 3 before, 4 now",
                   "--overwrite")
    out = run_cli(*base, "--max-new-tokens", "4", "--overwrite")
    assert out.returncode == 0, out.stderr
    again = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert again["config"]["max_new_tokens"] == 4
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    one_error_line(run_cli(*base[:-1], other, "--max-new-tokens", "4", "--overwrite"),
                   "--overwrite replaces an earlier eval output only")
    assert (other / "keep.txt").read_text() == "mine"
