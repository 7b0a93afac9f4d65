"""Issue 27, items 1 and 3: a TRL user's habits. Flags spelled with underscores and TRL's
names, typo suggestions, ``--version`` and clean help (item 1); ``--stop`` escapes, stop
strings in the lineage, and a chat SFT model that learns to stop (item 3). Through the
CLI, as a user runs it."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from offline_rlhf.config import unescape
from offline_rlhf.layouts import end_of_turn

from cli_helpers import cli, one_error_line

# short answers in a chat: the tiny template ends a turn with "\n" and has no end-of-turn
# token, so training must add EOS for the model to learn to stop
ANSWERS = [(f"Copy: {a} {b}", f"{a} {b}") for a, b in
           [(1, 2), (7, 3), (9, 0), (4, 4), (5, 1), (2, 8), (6, 6), (3, 9)]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rows_of(path):
    return [r for f in sorted(path.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def chat_sft_model(tmp_path_factory, policy_dir):
    """The tiny policy after a few dozen `train sft` steps on a messages file."""
    d = tmp_path_factory.mktemp("chat_sft")
    data = write_jsonl(d / "chat.jsonl", [{"messages": [{"role": "user", "content": q},
                                                        {"role": "assistant", "content": a}]}
                                          for q, a in ANSWERS])
    out = cli("train", "sft", "--data", data, "--output", d / "run", "--policy", policy_dir,
              "--lr", "3e-3", "--max-steps", "40", "--batch-size", "8", "--report-to", "none",
              "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    prompts = write_jsonl(d / "prompts.jsonl",
                          [{"messages": [{"role": "user", "content": q}]} for q, _ in ANSWERS])
    return d / "run" / "final", prompts


def generate(tmp_path, name, model, prompts, *extra):
    out = cli("generate", "--prompts", prompts, "--output", tmp_path / name, "--policy", model,
              "--greedy", "--num-samples", "1", "--max-new-tokens", "12", "--quiet", *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((tmp_path / name / ".offline-rlhf" / "manifest.json").read_text())
    return rows_of(tmp_path / name), manifest


def test_chat_sft_model_stops_with_eos(tmp_path, chat_sft_model):
    model, prompts = chat_sft_model
    rows, manifest = generate(tmp_path, "g", model, prompts)
    assert [r["finish_reason"] for r in rows] == ["eos"] * len(ANSWERS), \
        [(r["response"], r["finish_reason"]) for r in rows]
    assert all(r["response"].endswith("\n") and len(r["response"]) < 8 for r in rows)
    assert rows[0]["decoding"]["stop"] == [] and manifest["lineage"]["decoding"]["stop"] == []


def test_stop_newline_escape_cuts_at_the_newline(tmp_path, chat_sft_model):
    model, prompts = chat_sft_model
    rows, manifest = generate(tmp_path, "g", model, prompts, "--stop", r"\n", "</x>")
    assert [r["finish_reason"] for r in rows] == ["stop"] * len(ANSWERS)
    # cut at the newline: the same greedy responses as without --stop, less the "\n"
    plain, _ = generate(tmp_path, "plain", model, prompts)
    assert [r["response"] + "\n" for r in rows] == [r["response"] for r in plain]
    # the decoding column and the manifest record the stop strings as matched
    assert all(r["decoding"]["stop"] == ["\n", "</x>"] for r in rows)
    assert manifest["lineage"]["decoding"]["stop"] == ["\n", "</x>"]
    # an escaped backslash is a backslash: '\\n' is backslash-n, which never appears
    rows, _ = generate(tmp_path, "h", model, prompts, "--stop", r"\\n")
    assert rows[0]["decoding"]["stop"] == ["\\n"] and {r["finish_reason"] for r in rows} == {"eos"}


def test_stop_in_a_config_file_is_not_unescaped_twice(tmp_path, chat_sft_model):
    model, prompts = chat_sft_model
    # TOML's "\n" is a newline already; '\n' (a literal string) stays backslash-n
    (tmp_path / "c.toml").write_text('stop = ["\\n", \'\\t\']\n')
    rows, _ = generate(tmp_path, "g", model, prompts, "--config", tmp_path / "c.toml")
    assert rows[0]["decoding"]["stop"] == ["\n", "\\t"]
    assert {r["finish_reason"] for r in rows} == {"stop"}


def test_unknown_stop_escape_is_refused(tmp_path, policy_dir):
    out = cli("generate", "--prompts", "p.jsonl", "--output", tmp_path / "g", "--policy",
              policy_dir, "--stop", r"\r")
    one_error_line(out, "offline-rlhf generate: error:", "unknown escape", r"known: \n, \t, \\")


def test_unescape_and_end_of_turn(tokenizer):
    assert unescape(r"a\nb\tc\\n") == "a\nb\tc\\n"
    eos = tokenizer.eos_token_id
    assert end_of_turn(tokenizer, tokenizer("3\n", add_special_tokens=False)["input_ids"]) == [eos]
    # a template whose turn ends with a special token trains that token, nothing added
    assert end_of_turn(tokenizer, tokenizer("3</s>\n", add_special_tokens=False)["input_ids"]) == []
