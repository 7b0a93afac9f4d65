"""The LLM judge (RLAIF, issue 25): pointwise scores from the judge's next-token
probabilities, pairwise labels asked in both orders, the verdict cache, resume after a
kill, and the diagnostics of the judge itself."""

from __future__ import annotations

import numpy as np
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
    gens = write_generations(tmp_path / "g", [generation_table(6), generation_table(6, start=6)])
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


def test_render_keeps_other_braces():
    assert render("{prompt} {x} {response}", {"prompt": "f(){}", "response": None}) == "f(){} {x} "
