"""The flawed-demonstrator toy task (offline_rlhf/toy.py): answers checked by hand."""

import json

from offline_rlhf.shards import open_dataset
from offline_rlhf.toy import (
    addition_prompts,
    carry_dropped,
    flawed_demonstrations,
    setup_flawed_task,
)


def test_carry_dropped_by_hand():
    assert [carry_dropped(7, 8), carry_dropped(17, 8), carry_dropped(12, 7), carry_dropped(19, 19),
            carry_dropped(0, 0)] == ["5", "15", "19", "28", "0"]


def test_flawed_demonstrations_drop_only_carries_at_the_rate():
    prompts = addition_prompts(200, seed=3)
    rows = flawed_demonstrations(prompts, flaw_rate=0.6, copies=4, seed=3)
    assert len(rows) == 800
    wrong_carry = right_carry = 0
    for r in rows:
        a, b = (int(x) for x in r["prompt"].split("is ")[1].split("?")[0].split("+"))
        answer = r["completion"].strip()
        if carry_dropped(a, b) == str(a + b):
            assert answer == str(a + b)          # no carry: always right
        else:
            assert answer in (str(a + b), carry_dropped(a, b))
            wrong_carry += answer == carry_dropped(a, b)
            right_carry += answer == str(a + b)
    assert 0.5 < wrong_carry / (wrong_carry + right_carry) < 0.7


def test_setup_flawed_task_splits_disjoint(tmp_path):
    setup_flawed_task(tmp_path, n_train=50, n_test=20, seed=1)
    train = open_dataset(str(tmp_path / "train_prompts")).read().to_pylist()
    test = open_dataset(str(tmp_path / "test_prompts")).read().to_pylist()
    assert len(train) == 50 and len(test) == 20
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert {json.loads(r["metadata"])["split"] for r in test} == {"test"}
    sft = [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert len(sft) == 200 and {r["prompt"] for r in sft} == {r["prompt"] for r in train}


def test_pretrain_flawed_until_stops_at_the_threshold_or_the_step_cap(tmp_path):
    from offline_rlhf.toy import exact_match, pretrain_flawed_until
    setup_flawed_task(tmp_path / "a", n_train=12, n_test=4, seed=0)
    # a threshold of 0 is met after the first round; an unreachable one runs to the cap,
    # whose last round is cut to what is left (3 + 2 steps)
    model, steps, em = pretrain_flawed_until(tmp_path / "a", at_least=0.0, round_steps=3, max_steps=5)
    assert steps == 3 and model == tmp_path / "a" / "flawed0" / "final"
    setup_flawed_task(tmp_path / "b", n_train=12, n_test=4, seed=0)
    model, steps, em = pretrain_flawed_until(tmp_path / "b", at_least=1.01, round_steps=3, max_steps=5)
    assert steps == 5 and model == tmp_path / "b" / "flawed1" / "final"
    assert not (tmp_path / "b" / "flawed2").exists()
    assert em == exact_match(model, tmp_path / "b" / "train_prompts", tmp_path / "b" / "again")
    state = json.loads((tmp_path / "b" / "flawed1" / "config.json").read_text())
    assert state["config"]["max_steps"] == 2 and state["config"]["seed"] == 1
