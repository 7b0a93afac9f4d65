"""Issue 13, item 1: every common data layout is read correctly, or refused in one line.

Through the CLI as a user runs it (``cli.main``); where the token ids the model is
trained on are checked, the SFT task's batches are recorded on their way to the model.
"""

import json

import pyarrow as pa
import pytest

from offline_rlhf import cli
from offline_rlhf.shards import ShardWriter, open_dataset
from offline_rlhf.train import sft as sft_module

EXAMPLES = [("Copy: 1 2 =>", " 1 2"), ("Copy: 7 3 =>", " 7 3"), ("Copy: 9 0 =>", " 9 0"),
            ("Copy: 4 4 =>", " 4 4")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture
def trained_batches(monkeypatch):
    """The (input ids, loss mask) rows of every batch the SFT task hands the model."""
    seen = []
    collate = sft_module.SFTTask.collate

    def spy(self, indices, device):
        batch = collate(self, indices, device)
        for ids, attn, mask in zip(batch["input_ids"], batch["attention_mask"], batch["response_mask"]):
            n = int(attn.sum())
            seen.append((ids[:n].tolist(), mask[:n].tolist()))
        return batch
    monkeypatch.setattr(sft_module.SFTTask, "collate", spy)
    return seen


def run_sft(tmp_path, data, policy_dir, name, capsys=None):
    rc = cli.main(["train", "sft", "--data", data, "--output", str(tmp_path / name), "--policy",
                   str(policy_dir), "--batch-size", "4", "--max-steps", "1", "--report-to", "none",
                   "--quiet"])
    assert rc == 0
    summary = json.loads((tmp_path / name / "train_summary.json").read_text())
    return summary


def by_sequence(seen):
    return {tuple(ids): mask for ids, mask in seen}


def test_sft_text_and_chat_train_on_the_chat_template_ids(tmp_path, policy_dir, tokenizer, trained_batches):
    text = write_jsonl(tmp_path / "text.jsonl", [{"prompt": p, "completion": c} for p, c in EXAMPLES])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [user(p)], "completion": [assistant(c)]}
                                                 for p, c in EXAMPLES])
    assert run_sft(tmp_path, text, policy_dir, "text")["data"]["layout"] == "prompt_completion"
    text_rows = by_sequence(trained_batches)
    trained_batches.clear()
    run_sft(tmp_path, chat, policy_dir, "chat")
    chat_rows = by_sequence(trained_batches)
    eos = tokenizer.eos_token_id
    for p, c in EXAMPLES:
        # text: the prompt's tokens, then the completion's and EOS, which alone are trained
        ids_p, ids_c = tokenizer(p)["input_ids"], tokenizer(c, add_special_tokens=False)["input_ids"]
        assert text_rows[tuple(ids_p + ids_c + [eos])] == [0] * len(ids_p) + [1] * (len(ids_c) + 1)
        # chat: exactly the ids of the chat template; the answer turn alone is trained
        want = tokenizer.apply_chat_template([user(p), assistant(c)], tokenize=True, return_dict=False)
        head = tokenizer.apply_chat_template([user(p)], add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
        # the tiny template ends a turn with a plain newline (no end-of-turn token): EOS
        # follows it, trained, so that the model learns to stop
        want += [eos]
        assert want[:len(head)] == head and tuple(want) in chat_rows
        mask = chat_rows[tuple(want)]
        assert mask == [0] * len(head) + [1] * (len(want) - len(head))
        assert tokenizer.decode([t for t, m in zip(want, mask) if m]) == c + "\n</s>"
    for ids in chat_rows:   # never the Python repr of the message lists
        assert "role" not in tokenizer.decode(list(ids)) and "{" not in tokenizer.decode(list(ids))


def test_sft_messages_train_on_assistant_turns_only(tmp_path, policy_dir, tokenizer, trained_batches):
    conv = [{"role": "system", "content": "Copy the digits."}, user("1 2"), assistant("1 2"),
            user("3 4"), assistant("3 4"), user("thanks")]
    data = write_jsonl(tmp_path / "m.jsonl", [{"messages": conv}] * 4)
    assert run_sft(tmp_path, data, policy_dir, "m")["data"]["layout"] == "messages"
    (ids, mask), *_ = trained_batches
    want = tokenizer.apply_chat_template(conv[:5], tokenize=True, return_dict=False)
    eos = tokenizer.eos_token_id   # ends each answer turn (the template has no end-of-turn)
    assert [t for t in ids if t != eos] == want and ids.count(eos) == 2 and ids[-1] == eos
    # the trailing user turn (after the last answer) is left out
    trained = [i for i, m in enumerate(mask) if m]
    runs = []   # contiguous trained spans
    for i in trained:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    assert [tokenizer.decode([ids[i] for i in r]) for r in runs] == ["1 2\n</s>", "3 4\n</s>"]


def test_sft_text_layout(tmp_path, policy_dir, tokenizer, trained_batches):
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": f"Copy: {p} => {p}"} for p in "1234"])
    assert run_sft(tmp_path, data, policy_dir, "t")["data"]["layout"] == "text"
    ids, mask = trained_batches[0]
    assert ids[-1] == tokenizer.eos_token_id and mask == [0] + [1] * (len(ids) - 1)


@pytest.mark.parametrize("row, where, message", [
    ({"prompt": "a", "completion": None}, "row 1, column 'completion'", "missing value (null)"),
    ({"prompt": "a", "completion": 7}, "row 1, column 'completion'", "expected text or a list of {role, content} messages, got int"),
    ({"prompt": {"x": 1}, "completion": "b"}, "row 1, column 'prompt'", "expected text or a list of {role, content} messages, got dict"),
    ({"prompt": [user("a")], "completion": "b"}, "row 1, column 'completion'", "prompt and completion must both be text or both be chat"),
    ({"prompt": [{"role": "user"}], "completion": [assistant("b")]}, "row 1, column 'prompt'", "messages[0]: expected a {role, content} object"),
    ({"prompt": "a", "completion": ""}, "row 1, column 'completion'", "empty completion"),
])
def test_sft_refuses_bad_cells_in_one_line(tmp_path, policy_dir, capsys, row, where, message):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "completion": " fine"}, row])
    assert cli.main(["train", "sft", "--data", data, "--output", str(tmp_path / "o"),
                     "--policy", str(policy_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{data}, {where}: {message}" in err
    assert not (tmp_path / "o").exists()      # refused before anything was written
    assert cli.main(["validate", data, "--schema", "sft"]) == 2
    assert f"{data}, {where}: {message}" in capsys.readouterr().err


def test_sft_messages_without_an_answer_and_unknown_columns(tmp_path, policy_dir, capsys):
    data = write_jsonl(tmp_path / "m.jsonl", [{"messages": [user("hi")]}])
    assert cli.main(["validate", data, "--schema", "sft"]) == 2
    assert "row 0, column 'messages': no assistant turn to train on" in capsys.readouterr().err
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}])
    assert cli.main(["train", "sft", "--data", data, "--output", str(tmp_path / "o"),
                     "--policy", str(policy_dir)]) == 2
    assert "no SFT columns: expected prompt + completion" in capsys.readouterr().err


# --------------------------------------------------------------------------- preferences

HH = {"prompt": "Copy: 1 2",
      "chosen": [user("Copy: 1 2"), assistant("1 2")],
      "rejected": [user("Copy: 1 2"), assistant("2 1")]}
TEMPLATE_PROMPT = "<|user|>Copy: 1 2\n<|assistant|>"


def imported(tmp_path, capsys, rows, name, *extra):
    src = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    rc = cli.main(["import-pairs", src, str(tmp_path / name), *extra])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert cli.main(["validate", src, "--schema", "preferences", *extra]) == 0
    capsys.readouterr()
    return open_dataset(str(tmp_path / name)).read(columns=["prompt", "chosen", "rejected"]).to_pylist()


def test_import_pairs_every_common_layout(tmp_path, policy_dir, capsys):
    tok = ["--tokenizer", str(policy_dir)]
    # prompt text + whole conversations that repeat it (Anthropic HH / UltraFeedback-binarized)
    (r,) = imported(tmp_path, capsys, [HH], "hh", *tok)
    assert r == {"prompt": TEMPLATE_PROMPT, "chosen": "1 2\n", "rejected": "2 1\n"}
    # prompt messages + whole conversations that repeat them
    (r2,) = imported(tmp_path, capsys, [{**HH, "prompt": [user("Copy: 1 2")]}], "repeat", *tok)
    assert r2 == r
    # prompt messages + answer turns only (TRL conversational, explicit prompt)
    (r3,) = imported(tmp_path, capsys, [{"prompt": [user("Copy: 1 2")], "chosen": [assistant("1 2")],
                                         "rejected": [assistant("2 1")]}], "explicit", *tok)
    assert r3 == r
    # implicit prompt, conversations and plain texts (TRL's implicit-prompt layouts)
    (r4,) = imported(tmp_path, capsys, [{"chosen": HH["chosen"], "rejected": HH["rejected"]}],
                     "implicit_chat", *tok)
    assert r4 == r
    rows = imported(tmp_path, capsys, [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
                                       {"chosen": "Q: 2+2?\nA: 4", "rejected": "Q: 2+2?\nA: 5"},
                                       {"chosen": "The sky is blue", "rejected": "The sky is black"}],
                    "implicit_text")
    assert rows == [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
                    {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"},
                    {"prompt": "The sky is", "chosen": " blue", "rejected": " black"}]


@pytest.mark.parametrize("row, message", [
    ({**HH, "prompt": "something else"}, "column 'prompt': prompt is text but chosen/rejected are "
     "conversations whose shared turns do not contain it"),
    ({"chosen": [user("a"), assistant("x")], "rejected": [user("b"), assistant("x")]},
     "column 'chosen': chosen and rejected share no first turns"),
    ({"chosen": [user("a"), user("b"), assistant("x")], "rejected": [user("a"), user("c"), assistant("x")]},
     "column 'chosen': chosen and rejected differ at message 1, which is not an assistant turn"),
    ({"chosen": "abc", "rejected": "abd"}, "column 'chosen': no prompt column, and chosen and "
     "rejected share no beginning"),
    ({"prompt": "p", "chosen": "a", "rejected": [assistant("b")]}, "column 'rejected': chosen and "
     "rejected must both be text or both be chat messages"),
    ({"prompt": "p", "chosen": "a", "rejected": None}, "column 'rejected': missing value (null)"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "column 'prompt': expected text or a list"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": "high"},
     "column 'score_chosen': expected a number, got str"),
])
def test_import_pairs_refuses_what_it_cannot_read(tmp_path, policy_dir, capsys, row, message):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok", "chosen": " a", "rejected": " b"}, row]
                      if "prompt" in row else [{"chosen": "x a", "rejected": "x b"}, row])
    assert cli.main(["import-pairs", src, str(tmp_path / "o"), "--tokenizer", str(policy_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{src}, row 1, {message}" in err, err
    assert not (tmp_path / "o").exists()
    assert cli.main(["validate", src, "--schema", "preferences"]) == 2
    assert f"{src}, row 1, {message}" in capsys.readouterr().err


def test_train_dpo_rm_ilql_given_a_file(tmp_path, policy_dir, capsys):
    src = write_jsonl(tmp_path / "prefs.jsonl", [HH, {**HH, "prompt": "Copy: 3 4",
                      "chosen": [user("Copy: 3 4"), assistant("3 4")],
                      "rejected": [user("Copy: 3 4"), assistant("4 3")]}])
    common = ["--data", src, "--policy", str(policy_dir), "--batch-size", "2", "--max-steps", "1",
              "--report-to", "none", "--quiet"]
    # DPO without reference log-probs: refused before any model loads, with the fix that fits
    assert cli.main(["train", "dpo", "--output", str(tmp_path / "d0"), *common]) == 2
    err = capsys.readouterr().err
    assert "pairs imported from a file have no reference log-probs: pass --reference MODEL" in err
    assert not (tmp_path / "d0").exists()
    # imported on the fly: chat rendered with the policy's template
    assert cli.main(["train", "dpo", "--output", str(tmp_path / "d"), "--reference", str(policy_dir),
                     *common]) == 0
    summary = json.loads((tmp_path / "d" / "train_summary.json").read_text())
    assert summary["data"]["pairs"] == 2 and summary["data"]["ref_logps_computed"] == 2
    assert cli.main(["train", "rm", "--output", str(tmp_path / "r"), "--eval-fraction", "0", *common]) == 0
    assert (tmp_path / "r" / "final" / "config.json").exists()
    assert cli.main(["train", "ilql", "--output", str(tmp_path / "i"), *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{src}: is a file; train ilql reads a generations dataset " \
        "(a directory made by `offline-rlhf generate` then `offline-rlhf score`)" in err


def test_train_dpo_suggests_what_fits_the_dataset(tmp_path, policy_dir, capsys, monkeypatch):
    """Imported pairs cannot rerun logprobs; pairs built from generations can. Refused
    before the model loads."""
    from conftest import generation_rows

    import offline_rlhf.models as models
    monkeypatch.setattr(models, "load_policy", lambda *a, **k: pytest.fail("model loaded"))
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "chosen": " a", "rejected": " b"} for i in range(2)])
    assert cli.main(["import-pairs", src, str(tmp_path / "imp")]) == 0
    rows = generation_rows(4, k=2)
    for r in rows:
        r["ref_logps_sum"] = None
    with ShardWriter(str(tmp_path / "gen"), "generations", lineage={"x": 1}) as w:
        from offline_rlhf.schemas import load_schema
        w.write(0, pa.Table.from_pylist(rows, schema=load_schema("generations").arrow))
        w.finish(total_chunks=1)
    assert cli.main(["pairs", "--generations", str(tmp_path / "gen"), "--output", str(tmp_path / "built")]) == 0
    capsys.readouterr()
    for data, fix in ((tmp_path / "imp", "pass --reference MODEL (usually the starting policy) to "
                       "compute them once before training (these pairs were imported"),
                      (tmp_path / "built", "run `offline-rlhf logprobs` on the generations and rebuild")):
        assert cli.main(["train", "dpo", "--data", str(data), "--output", str(tmp_path / "o"),
                         "--policy", str(policy_dir)]) == 2
        err = capsys.readouterr().err
        assert "pairs have no reference log-probs: " + fix in err, err
