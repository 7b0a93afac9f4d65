"""The LLM judge (RLAIF, issue 25): pointwise scores from the judge's next-token
probabilities, pairwise labels asked in both orders, the verdict cache, resume after a
kill, and the diagnostics of the judge itself."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import generation_table

from offline_rlhf.rewards.judge import render, scale_labels
from offline_rlhf.rewards.score import ScoreConfig, score
from offline_rlhf.shards import ShardWriter, open_dataset


def write_generations(path, tables) -> str:
    with ShardWriter(str(path), "generations") as w:
        for c, t in enumerate(tables):
            w.write(c, t)
        w.finish(total_chunks=len(tables))
    return str(path)


def hand_score(judge_dir, prompt: str, response: str, reference: str, labels: list[str]):
    """The judge's score computed by hand: the default template rendered, the chat
    template applied, one unpadded forward, softmax over the label tokens' logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline_rlhf.rewards.judge import TEMPLATES
    tok = AutoTokenizer.from_pretrained(str(judge_dir))
    model = AutoModelForCausalLM.from_pretrained(str(judge_dir)).eval()
    template = (TEMPLATES / "pointwise.txt").read_text()[:-1]
    content = template.replace("{prompt}", prompt).replace("{response}", response).replace(
        "{reference_answer}", reference).replace("{scale_low}", labels[0]).replace(
        "{scale_high}", labels[-1])
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    label_ids = [tok.convert_tokens_to_ids(x) for x in labels]
    p = torch.softmax(logits[label_ids].double(), -1).numpy()
    return float(p @ np.arange(1, len(labels) + 1)), p


def test_pointwise_score_is_the_expected_label_from_the_judge_logits(tmp_path, policy_dir):
    tables = [generation_table(6), generation_table(6, start=6)]
    tables = [t.set_column(t.schema.get_field_index("reference_answer"), "reference_answer",
                           [[a if i % 3 else "x" for i, a in enumerate(t.column("reference_answer").to_pylist())]])
              for t in tables]                   # every third response is wrong by the rule
    gens = write_generations(tmp_path / "g", tables)
    score(ScoreConfig(generations=gens, output=str(tmp_path / "s"), judge=str(policy_dir),
                      judge_scale="1-5", weights={"judge": 2.0, "exact_match": 0.5}))
    t = open_dataset(str(tmp_path / "s")).read().to_pylist()
    labels = scale_labels("1-5")
    for r in (t[0], t[7]):
        want, p = hand_score(policy_dir, r["prompt"], r["response"], r["reference_answer"], labels)
        comps = {c["name"]: c["value"] for c in r["reward_components"]}
        assert comps["judge"] == pytest.approx(want, abs=1e-5)
        assert r["judge_probs"] == pytest.approx(p.tolist(), abs=1e-5)
        assert r["reward"] == pytest.approx(2.0 * want + 0.5 * comps["exact_match"], abs=1e-5)
    # distinct responses are judged differently (the row's text really is the input)
    assert len({round(r["reward_components"][0]["value"], 9) for r in t}) > 1
    # inspect: the judge against the rule, and against length
    from offline_rlhf.summary import summarize
    d = summarize(open_dataset(str(tmp_path / "s")))["judge"]
    judge = [r["reward_components"][0]["value"] for r in t]
    rule = [r["reward_components"][1]["value"] for r in t]
    assert d["corr_with_exact_match"] == pytest.approx(np.corrcoef(judge, rule)[0, 1])
    assert d["length_bias"] is None          # every response has 6 tokens: no correlation defined


def test_render_keeps_other_braces():
    assert render("{prompt} {x} {response}", {"prompt": "f(){}", "response": None}) == "f(){} {x} "


def judge_gens(tmp_path, chunks: int = 1, prompts: int = 3, k: int = 3) -> str:
    """Unscored generations: ``prompts`` addition prompts per chunk, ``k`` distinct responses each."""
    tables = []
    for c in range(chunks):
        t = generation_table(prompts * k, start=c * prompts * k, k=k)
        t = t.set_column(t.schema.get_field_index("response"), "response",
                         [[f" {i % 7}{'' if i % 2 else ' maybe'}" for i in range(c * 100, c * 100 + t.num_rows)]])
        t = t.set_column(t.schema.get_field_index("reward"), "reward", pa.nulls(t.num_rows, pa.float64()))
        ids = t.column("prompt_id").to_pylist()       # one prompt text and reference per prompt id
        t = t.set_column(t.schema.get_field_index("prompt"), "prompt",
                         [[f"What is {int(p[1:])}+1? Answer:" for p in ids]])
        t = t.set_column(t.schema.get_field_index("reference_answer"), "reference_answer",
                         [[str(int(p[1:]) + 1) for p in ids]])
        tables.append(t)
    return write_generations(tmp_path / "g", tables)


def hand_first_better(judge_dir, prompt: str, first: str, second: str, reference: str) -> float:
    """P(first better) by hand: the pairwise template in the chat template, p(A)/(p(A)+p(B))."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline_rlhf.rewards.judge import TEMPLATES
    tok = AutoTokenizer.from_pretrained(str(judge_dir))
    model = AutoModelForCausalLM.from_pretrained(str(judge_dir)).eval()
    content = (TEMPLATES / "pairwise.txt").read_text()[:-1].replace("{prompt}", prompt).replace(
        "{response_a}", first).replace("{response_b}", second).replace("{reference_answer}", reference)
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                   add_generation_prompt=True)
    with torch.no_grad():
        logits = model(**tok(text, add_special_tokens=False, return_tensors="pt")).logits[0, -1]
    a, b = logits[tok.convert_tokens_to_ids("A")].double(), logits[tok.convert_tokens_to_ids("B")].double()
    return float(torch.sigmoid(a - b))


def test_pairs_are_judged_in_both_orders(tmp_path, policy_dir):
    from offline_rlhf.pairs import PairsConfig, build_pairs
    gens = judge_gens(tmp_path)
    m = build_pairs(PairsConfig(generations=gens, output=str(tmp_path / "p"), strategy="judge",
                                judge=str(policy_dir), judge_inconsistent="keep",
                                judge_cache=str(tmp_path / "cache")))
    assert m["stats"]["judge_pairs_asked"] == 9 and m["stats"]["judge_inputs"] == 18
    rows = open_dataset(str(tmp_path / "p")).read().to_pylist()
    r = rows[0]
    g = open_dataset(gens).read(columns=["prompt_id", "reference_answer"]).to_pydict()
    ref = dict(zip(g["prompt_id"], g["reference_answer"]))[r["prompt_id"]]
    # P(chosen better): chosen shown first, and 1 - P(first better) with rejected shown first
    ab = hand_first_better(policy_dir, r["prompt"], r["chosen"], r["rejected"], ref)
    ba = 1 - hand_first_better(policy_dir, r["prompt"], r["rejected"], r["chosen"], ref)
    assert r["judge_p_ab"] == pytest.approx(ab, abs=1e-5)
    assert r["judge_p_ba"] == pytest.approx(ba, abs=1e-5)
    assert abs(ab - ba) > 1e-6          # two different inputs, two different answers
    assert r["margin"] == pytest.approx(ab + ba - 1 if r["judge_consistent"] else 0.0)
    assert all((x["judge_p_ab"] + x["judge_p_ba"]) / 2 > 0.5 for x in rows)
    assert {x["judge_consistent"] for x in rows} == {x["judge_p_ab"] > 0.5 and x["judge_p_ba"] > 0.5
                                                      for x in rows}
    # the verdict cache: the same pairs judged again run nothing
    again = build_pairs(PairsConfig(generations=gens, output=str(tmp_path / "p2"), strategy="judge",
                                    judge=str(policy_dir), judge_inconsistent="keep",
                                    judge_cache=str(tmp_path / "cache")))
    assert again["stats"]["judge_cached"] == 18
    assert open_dataset(str(tmp_path / "p2")).read(columns=["judge_p_ab"]).equals(
        open_dataset(str(tmp_path / "p")).read(columns=["judge_p_ab"]))


def biased_judge(directory, tokenizer, bias: float):
    """A tiny judge made to prefer the first position: every token embedding carries a
    constant in dimension 0 (so the normalised final hidden state always does), and the
    untied output row of "A" reads it: about +8 x bias on the logit of A whatever the input."""
    from transformers import AutoModelForCausalLM

    from offline_rlhf.tiny import tiny_config
    cfg = tiny_config(tokenizer)
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] += 1.0
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("A"), 0] += bias
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_a_position_biased_judge_is_caught(tmp_path, tokenizer):
    from offline_rlhf.pairs import PairsConfig, build_pairs
    from offline_rlhf.shards import open_dataset as open_ds
    from offline_rlhf.summary import render, summarize
    judge = biased_judge(tmp_path / "judge", tokenizer, bias=0.1)
    gens = judge_gens(tmp_path, prompts=4)
    build_pairs(PairsConfig(generations=gens, output=str(tmp_path / "p"), strategy="judge",
                            judge=judge, judge_inconsistent="keep"))
    rows = open_ds(str(tmp_path / "p")).read().to_pylist()
    first = np.mean([(r["judge_p_ab"] + 1 - r["judge_p_ba"]) / 2 for r in rows])
    s = summarize(open_ds(str(tmp_path / "p")))
    d = s["judge"]
    assert d["judge_pairs_asked"] == 12 == len(rows) + s["counts"]["judge_ties_dropped"]
    assert d["first_position_preference"] == pytest.approx(first, abs=1e-3) and first > 0.6
    assert d["position_consistency"] == pytest.approx(np.mean([r["judge_consistent"] for r in rows]))
    assert d["position_consistency"] < 1
    assert "judge.first_position_preference" in render(s)
    # dropped by default: every stored pair is consistent, the counters still see them all
    m = build_pairs(PairsConfig(generations=gens, output=str(tmp_path / "p2"), strategy="judge",
                                judge=judge))
    kept = open_ds(str(tmp_path / "p2")).read(columns=["judge_consistent"]).column(0).to_pylist()
    assert all(kept) and len(kept) == 12 - m["stats"]["judge_inconsistent"] - \
        m["stats"]["judge_ties_dropped"]
    assert summarize(open_ds(str(tmp_path / "p2")))["judge"]["position_consistency"] == \
        pytest.approx(d["position_consistency"])


class StubJudge:
    """P(first better) = sigmoid(quality(first) - quality(second) + bias): a judge with a
    known content preference (the digit in the response) and a known position bias."""
    fingerprint = "stub"

    def __init__(self, bias: float):
        self.bias, self.stats, self.inputs = bias, {"judge_inputs": 0}, []

    def first_better(self, prompts, firsts, seconds, refs):
        self.inputs += list(zip(firsts, seconds))
        q = lambda r: int(r.split()[0])   # noqa: E731
        return 1 / (1 + np.exp(-np.array([q(a) - q(b) + self.bias for a, b in zip(firsts, seconds)])))


@pytest.mark.parametrize("bias", [0.0, 2.5])
def test_consistency_and_position_bias_are_measured_exactly(bias):
    from conftest import generation_rows

    from offline_rlhf.pairs import PairsConfig, judge_pairs
    from offline_rlhf.rewards.judge_stats import pairwise_diagnostics
    rows = generation_rows(12, k=4)
    for i, r in enumerate(rows):
        r["response"] = f" {[0, 1, 2, 5][i % 4]}"
    cfg = PairsConfig(generations="-", output="-", strategy="judge", judge="-",
                      judge_inconsistent="keep")
    judge = StubJudge(bias)
    pairs, stats = judge_pairs(rows, cfg, judge, "test")
    assert len(judge.inputs) == 2 * 18 and set(judge.inputs) == {(b, a) for a, b in judge.inputs}
    d = pairwise_diagnostics(stats)
    sig = lambda x: 1 / (1 + np.exp(-x))   # noqa: E731
    gaps = [1, 2, 5, 1, 4, 3]                    # quality gaps of the 6 pairs of {0, 1, 2, 5}
    assert d["first_position_preference"] == pytest.approx(
        np.mean([(sig(g + bias) + sig(-g + bias)) / 2 for g in gaps]))
    inconsistent = sum(sig(-g + bias) > 0.5 for g in gaps) / 6   # the worse one wins when first
    assert d["position_consistency"] == pytest.approx(1 - inconsistent)
    if bias == 0:
        assert d["position_consistency"] == 1 and d["first_position_preference"] == pytest.approx(0.5)
    else:
        assert d["position_consistency"] < 1 and d["first_position_preference"] > 0.6
    assert all(p["chosen"] > p["rejected"] for p in pairs)   # the better digit is chosen


def test_min_margin_drops_low_confidence_judge_pairs():
    """``min_margin`` with the judge keeps the consistent pairs whose judge margin
    (2 P(chosen better) - 1) reaches it: computed here from the stub's sigmoid."""
    from conftest import generation_rows

    from offline_rlhf.errors import InputError
    from offline_rlhf.pairs import PairsConfig, judge_pairs
    rows = generation_rows(12, k=4)
    for i, r in enumerate(rows):
        r["response"] = f" {[0, 1, 2, 5][i % 4]}"
    sig = lambda x: 1 / (1 + np.exp(-x))   # noqa: E731
    gaps = [1, 2, 5, 1, 4, 3]                # quality gaps of the 6 pairs of {0, 1, 2, 5}
    margins = [2 * sig(g) - 1 for g in gaps]  # no position bias: P(better) = sig(gap) in both orders
    everything, _ = judge_pairs(rows, PairsConfig(generations="-", output="-", strategy="judge",
                                                  judge="-"), StubJudge(0.0), "test")
    assert sorted(p["margin"] for p in everything) == pytest.approx(sorted(3 * margins))
    cut = 0.8                                # between the margins of gaps 2 (0.76) and 3 (0.91)
    kept, stats = judge_pairs(rows, PairsConfig(generations="-", output="-", strategy="judge", judge="-",
                                                min_margin=cut), StubJudge(0.0), "test")
    assert len(kept) == 3 * sum(m >= cut for m in margins) == 9
    assert stats["judge_below_min_margin_dropped"] == 18 - 9
    assert all(p["margin"] >= cut for p in kept)
    with pytest.raises(InputError, match="use --judge-inconsistent drop"):
        PairsConfig(generations="-", output="-", strategy="judge", judge="-", min_margin=0.5,
                    judge_inconsistent="keep")
    with pytest.raises(InputError, match="judge margins are at most 1"):
        PairsConfig(generations="-", output="-", strategy="judge", judge="-", min_margin=1.5)


def test_killed_judging_run_resumes_to_the_same_rows(tmp_path, policy_dir):
    """SIGKILL after the first committed shard of `pairs --strategy judge`; the rerun
    skips it and ends with the rows of an uninterrupted run. Then `train dpo
    --pair-weight judge` trains on them and `inspect` shows the judge diagnostics."""
    import re

    from cli_helpers import cli, popen
    from conftest import kill_when

    from offline_rlhf.pairs import PairsConfig, build_pairs
    from offline_rlhf.summary import render, summarize
    from offline_rlhf.train.dpo import DPOTrainConfig, train_dpo
    gens = judge_gens(tmp_path, chunks=4)
    args = ["pairs", "--generations", gens, "--output", tmp_path / "killed", "--strategy", "judge",
            "--judge", policy_dir, "--judge-inconsistent", "keep"]
    shards = tmp_path / "killed" / ".offline-rlhf" / "shards"
    kill_when(popen(*args), lambda: shards.exists() and len(list(shards.glob("*.json"))) >= 1)
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    done, skipped = map(int, re.search(r"(\d+) chunks done, (\d+) already committed", rerun.stdout).groups())
    assert skipped >= 1 and done + skipped == 4
    build_pairs(PairsConfig(generations=gens, output=str(tmp_path / "clean"), strategy="judge",
                            judge=str(policy_dir), judge_inconsistent="keep"))
    cols = ["pair_id", "chosen", "rejected", "margin", "judge_p_ab", "judge_p_ba", "judge_consistent",
            "judge_fingerprint"]
    killed = open_dataset(str(tmp_path / "killed"))
    assert killed.read(columns=cols).equals(open_dataset(str(tmp_path / "clean")).read(columns=cols))
    shown = render(summarize(killed))
    assert "judge.position_consistency" in shown and "judge.first_position_preference" in shown
    s = train_dpo(DPOTrainConfig(data=str(tmp_path / "killed"), output=str(tmp_path / "t"),
                                 policy=str(policy_dir), reference=str(policy_dir), pair_weight="judge",
                                 max_steps=2, batch_size=4, micro_batch_size=4, report_to="none"))
    assert s["data"]["pairs"] == killed.num_rows and np.isfinite(s["last"]["loss"])


def test_refusals_name_the_option(tmp_path, policy_dir):
    from offline_rlhf.errors import InputError
    from offline_rlhf.pairs import PairsConfig
    from offline_rlhf.train.dpo import DPOTrainConfig, pair_weights
    gens = write_generations(tmp_path / "g", [generation_table(4)])
    with pytest.raises(InputError, match="judge_scale: label '10' is 2 tokens"):
        score(ScoreConfig(generations=gens, output=str(tmp_path / "s"), judge=str(policy_dir),
                          judge_scale="1-10"))
    with pytest.raises(InputError, match="judge_scale: must be LO-HI"):
        ScoreConfig(generations=gens, output="o", judge=str(policy_dir), judge_scale="5-1")
    with pytest.raises(InputError, match="weights.judge: set, but no judge model"):
        ScoreConfig(generations=gens, output="o", weights={"judge": 1.0})
    with pytest.raises(InputError, match="strategy: judge needs --judge"):
        PairsConfig(generations=gens, output="o", strategy="judge")
    bad = tmp_path / "t.txt"
    bad.write_text("{prompt} only")
    with pytest.raises(InputError, match="has no {response_a}, {response_b} field"):
        from offline_rlhf.rewards.judge import read_template
        read_template(str(bad), "pairwise")
    cfg = DPOTrainConfig(data="d", output="o", policy="p", pair_weight="judge")
    rows = [{"judge_p_ab": 0.9, "judge_p_ba": 0.7, "judge_consistent": True},
            {"judge_p_ab": 0.8, "judge_p_ba": 0.4, "judge_consistent": False}]
    assert pair_weights(rows, cfg).tolist() == pytest.approx([0.6, 0.0])
    with pytest.raises(InputError, match="d, row 0, column 'judge_p_ab': no judge verdict"):
        pair_weights([{"judge_p_ab": None, "judge_p_ba": None, "judge_consistent": None}], cfg)
