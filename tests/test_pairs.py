import json

import pyarrow as pa
import pytest
from conftest import generation_rows

from offline_rlhf.errors import InputError
from offline_rlhf.pairs import PairsConfig, build_pairs, import_pairs
from offline_rlhf.schemas import load_schema
from offline_rlhf.shards import ShardWriter, open_dataset


def scored(tmp_path, groups: dict[str, list[tuple[str, float]]], ref=True):
    rows, i = [], 0
    for pid, samples in groups.items():
        for k, (text, reward) in enumerate(samples):
            r = generation_rows(1, start=i)[0]
            r.update(prompt_id=pid, sample_index=k, response=text, reward=reward,
                     ref_logps_sum=-float(k + 1) if ref else None)
            rows.append(r)
            i += 1
    path = tmp_path / "gen"
    with ShardWriter(str(path), "generations") as w:
        w.write(0, pa.Table.from_pylist(rows, schema=load_schema("generations").arrow))
        w.finish(total_chunks=1)
    return str(path)


GROUPS = {
    "a": [("x", 1.0), ("y", 3.0), ("z", 2.0), ("y", 3.0)],   # duplicate "y"
    "b": [("p", 5.0), ("q", 5.0)],                            # all tied
    "c": [("only", 1.0), ("only", 1.0)],                      # one distinct response
    "d": [("m", 0.0), ("n", 0.5), ("o", 2.0), ("r", -1.0)],
}


def pairs_of(tmp_path, **kw):
    gen = scored(tmp_path, GROUPS)
    m = build_pairs(PairsConfig(generations=gen, output=str(tmp_path / "pairs"), **kw))
    rows = open_dataset(str(tmp_path / "pairs"), True).read().to_pylist()
    return m, sorted((r["prompt_id"], r["chosen"], r["rejected"]) for r in rows), rows


def test_best_worst(tmp_path):
    m, got, rows = pairs_of(tmp_path)
    assert got == [("a", "y", "x"), ("d", "o", "r")]
    assert m["stats"]["prompts_all_tied"] == 1 and m["stats"]["prompts_single_response"] == 1
    assert m["stats"]["duplicate_responses_dropped"] == 2
    r = next(r for r in rows if r["prompt_id"] == "a")
    assert r["margin"] == 2.0 and r["chosen_reward"] == 3.0
    assert r["chosen_ref_logps_sum"] == -2.0 and r["rejected_ref_logps_sum"] == -1.0  # from samples 1 and 0
    assert all(r["chosen"] != r["rejected"] for r in rows)


def test_margin_strategy(tmp_path):
    _, got, _ = pairs_of(tmp_path, strategy="margin", min_margin=1.0)
    # a: 3, 2, 1 -> margins 1, 2, 1; d: 2, 0.5, 0, -1 -> all but (n, m) (0.5)
    assert got == [("a", "y", "x"), ("a", "y", "z"), ("a", "z", "x"), ("d", "m", "r"),
                   ("d", "n", "r"), ("d", "o", "m"), ("d", "o", "n"), ("d", "o", "r")]


def test_top_bottom_and_cap(tmp_path):
    _, got, _ = pairs_of(tmp_path, strategy="top_bottom", top_k=2)
    # a has 3 distinct responses, so k = 1; d: top {o, n} x bottom {m, r}
    assert got == [("a", "y", "x"), ("d", "n", "m"), ("d", "n", "r"), ("d", "o", "m"), ("d", "o", "r")]
    _, capped, _ = pairs_of(tmp_path / "cap", strategy="top_bottom", top_k=2, max_pairs_per_prompt=1)
    assert capped == [("a", "y", "x"), ("d", "o", "r")]


def test_unscored_generations_refused(tmp_path):
    gen = scored(tmp_path, {"a": [("x", 1.0), ("y", 2.0)]})
    t = open_dataset(gen).read()
    with ShardWriter(str(tmp_path / "raw"), "generations") as w:
        w.write(0, t.set_column(t.schema.get_field_index("reward"), "reward",
                                pa.nulls(2, pa.float64())))
        w.finish(total_chunks=1)
    with pytest.raises(InputError, match=r"row 0, column 'reward': row has no reward: run `offline-rlhf score`"):
        build_pairs(PairsConfig(generations=str(tmp_path / "raw"), output=str(tmp_path / "o")))


def test_import_text_chat_and_implicit(tmp_path, policy_dir):
    src = tmp_path / "prefs.jsonl"
    rows = [
        {"prompt": "Q1", "chosen": " good", "rejected": " bad", "score_chosen": 2.0, "score_rejected": 1.0},
        {"prompt": "Q2", "chosen": " same", "rejected": " same"},
        {"prompt": [{"role": "user", "content": "hi"}],
         "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "go away"}]},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = import_pairs(str(src), str(tmp_path / "p"), str(policy_dir))
    assert m["num_rows"] == 2 and m["stats"]["pairs_dropped_identical"] == 1
    got = open_dataset(str(tmp_path / "p")).read().to_pylist()
    assert got[0]["margin"] == 1.0 and got[0]["chosen"] == " good"
    assert got[1]["prompt"] == "<|user|>hi\n<|assistant|>" and got[1]["chosen"] == "hello\n"
    implicit = tmp_path / "implicit.jsonl"
    conv = [{"role": "user", "content": "hi"}]
    implicit.write_text(json.dumps({"chosen": conv + [{"role": "assistant", "content": "a"}],
                                    "rejected": conv + [{"role": "assistant", "content": "b"}]}) + "\n")
    import_pairs(str(implicit), str(tmp_path / "i"), str(policy_dir))
    (r,) = open_dataset(str(tmp_path / "i")).read().to_pylist()
    assert r["prompt"] == "<|user|>hi\n<|assistant|>" and (r["chosen"], r["rejected"]) == ("a\n", "b\n")


def test_import_errors(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": [{"role": "user", "content": "x"}], "chosen": "a",
                               "rejected": "b"}) + "\n")
    with pytest.raises(InputError, match=r"p.jsonl, row 0, column 'prompt': chat messages need a tokenizer"):
        import_pairs(str(src), str(tmp_path / "o"))
    src.write_text(json.dumps({"prompt": "x", "chosen": "a"}) + "\n")
    with pytest.raises(InputError, match=r"column 'rejected': missing column"):
        import_pairs(str(src), str(tmp_path / "o"))


def test_pairs_fingerprint_follows_the_content(tmp_path):
    """The key of stored reference log-probs: a dataset's fingerprint; a preference file's
    bytes together with the tokenizer that reads it (same bytes elsewhere, same key)."""
    from offline_rlhf.pairs import pairs_fingerprint
    rows = [{"prompt": "q", "chosen": " a", "rejected": " b"}]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps(rows[0]) + "\n")
    b.write_text(json.dumps(rows[0]) + "\n")
    assert pairs_fingerprint(str(a), "tok1") == pairs_fingerprint(str(b), "tok1")
    assert pairs_fingerprint(str(a), "tok1") != pairs_fingerprint(str(a), "tok2")
    b.write_text(json.dumps({**rows[0], "rejected": " c"}) + "\n")
    assert pairs_fingerprint(str(a), "tok1") != pairs_fingerprint(str(b), "tok1")
    import_pairs(str(a), str(tmp_path / "ds"))
    assert pairs_fingerprint(str(tmp_path / "ds"), "tok1") == open_dataset(str(tmp_path / "ds")).fingerprint
