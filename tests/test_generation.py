import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import cpu_env

from offline_rlhf.errors import InputError
from offline_rlhf.generation import GenerateConfig, generate, sample_seed
from offline_rlhf.logprobs import sequence_logps
from offline_rlhf.models import load_policy, load_tokenizer
from offline_rlhf.shards import ShardWriter, open_dataset
from offline_rlhf.toy import addition_prompts

VOLATILE = ["created_at"]  # wall-clock time of generation: differs between any two runs


@pytest.fixture(scope="module")
def prompts_ds(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts"
    with ShardWriter(str(path), "prompts") as w:
        w.write(0, addition_prompts(24, seed=5, chat_fraction=0.25))
        w.finish(total_chunks=1)
    return str(path)


def cfg(prompts, out, policy, **kw):
    """float32 on whatever device the package picks (its auto dtype is bfloat16 on CUDA,
    where log-probs compared at 1e-5 and argmax ties would not hold)."""
    base = dict(prompts=prompts, output=str(out), policy=str(policy), num_samples=3,
                max_new_tokens=10, chunk_prompts=5, temperature=0.9, top_p=0.95, top_k=40,
                dtype="float32")
    base.update(kw)
    return GenerateConfig(**base)


def table(path):
    return open_dataset(str(path), require_complete=True).read().drop_columns(VOLATILE)


def test_rows_and_lineage(tmp_path, prompts_ds, policy_dir):
    m = generate(cfg(prompts_ds, tmp_path / "g", policy_dir))
    assert m["complete"] and m["num_rows"] == 24 * 3 and m["num_shards"] == 5
    t = open_dataset(str(tmp_path / "g")).read()
    keys = list(zip(t.column("prompt_id").to_pylist(), t.column("sample_index").to_pylist()))
    assert len(set(keys)) == 72 and sorted(set(k for _, k in keys)) == [0, 1, 2]
    row = t.slice(0, 1).to_pylist()[0]
    assert len(row["response_token_ids"]) == len(row["behaviour_logps"]) <= 10
    assert row["decoding"]["top_k"] == 40 and row["policy_fingerprint"] == m["lineage"]["policy_fingerprint"]
    chat = [r for r in t.to_pylist() if r["messages"] is not None]
    assert chat and all(r["prompt"].startswith("<|user|>") and r["prompt"].endswith("<|assistant|>")
                        for r in chat)


def test_token_budget_and_k_do_not_change_samples(tmp_path, prompts_ds, policy_dir):
    generate(cfg(prompts_ds, tmp_path / "big", policy_dir, token_budget=100_000))
    generate(cfg(prompts_ds, tmp_path / "small", policy_dir, token_budget=60))
    a, b = table(tmp_path / "big"), table(tmp_path / "small")
    assert a.column("response_token_ids").to_pylist() == b.column("response_token_ids").to_pylist()
    np.testing.assert_allclose(np.concatenate(a.column("behaviour_logps").to_pylist()),
                               np.concatenate(b.column("behaviour_logps").to_pylist()), atol=1e-5)
    # sample k of a prompt is the same whether 2 or 3 samples are drawn
    generate(cfg(prompts_ds, tmp_path / "k2", policy_dir, num_samples=2))
    k2 = table(tmp_path / "k2").to_pylist()
    k3 = {(r["prompt_id"], r["sample_index"]): r["response_token_ids"] for r in a.to_pylist()}
    assert all(k3[(r["prompt_id"], r["sample_index"])] == r["response_token_ids"] for r in k2)


def test_behaviour_logps_equal_fresh_forward(tmp_path, prompts_ds, policy_dir):
    c = cfg(prompts_ds, tmp_path / "g", policy_dir, temperature=0.7, top_k=20, top_p=0.8)
    generate(c)
    t = table(tmp_path / "g")
    model, tok = load_policy(policy_dir, dtype="float32"), load_tokenizer(policy_dir)
    fresh = sequence_logps(model, t.column("prompt_token_ids").to_pylist(),
                           t.column("response_token_ids").to_pylist(), pad_id=tok.pad_token_id,
                           temperature=0.7, top_k=20, top_p=0.8)
    stored = t.column("behaviour_logps").to_pylist()
    assert max(np.abs(np.array(s) - f).max() for s, f in zip(stored, fresh)) < 1e-4
    assert all(np.all(np.isfinite(f)) for f in fresh)


def test_greedy_is_argmax_and_identical_across_samples(tmp_path, prompts_ds, policy_dir):
    generate(cfg(prompts_ds, tmp_path / "g", policy_dir, greedy=True, num_samples=2))
    t = table(tmp_path / "g").to_pylist()
    by_prompt = {}
    for r in t:
        by_prompt.setdefault(r["prompt_id"], []).append(r["response_token_ids"])
    assert all(a == b for a, b in by_prompt.values())
    model = load_policy(policy_dir, dtype="float32")
    import torch
    r = t[0]
    ids = torch.tensor([r["prompt_token_ids"] + r["response_token_ids"]], device=model.device)
    logits = model(input_ids=ids).logits[0]
    start = len(r["prompt_token_ids"])
    assert logits[start - 1:-1].argmax(-1).tolist() == r["response_token_ids"]


def test_stop_strings_and_finish_reasons(tmp_path, prompts_ds, policy_dir):
    generate(cfg(prompts_ds, tmp_path / "g", policy_dir, stop=["e"], max_new_tokens=24))
    rows = table(tmp_path / "g").to_pylist()
    stopped = [r for r in rows if r["finish_reason"] == "stop"]
    assert stopped and all("e" not in r["response"] for r in stopped)
    assert {r["finish_reason"] for r in rows} <= {"stop", "eos", "length"}
    assert all(len(r["response_token_ids"]) == 24 for r in rows if r["finish_reason"] == "length")


def test_overlong_prompts(tmp_path, prompts_ds, policy_dir):
    with pytest.raises(InputError, match=r"row \d+, column 'prompt': prompt has \d+ tokens, more than "
                                         r"max_prompt_tokens=12"):
        generate(cfg(prompts_ds, tmp_path / "e", policy_dir, max_prompt_tokens=12))
    assert not (tmp_path / "e").exists()
    m = generate(cfg(prompts_ds, tmp_path / "s", policy_dir, max_prompt_tokens=12, overlong="skip"))
    assert m["stats"]["prompts_skipped"] > 0
    assert m["num_rows"] == 3 * (24 - m["stats"]["prompts_skipped"])
    m = generate(cfg(prompts_ds, tmp_path / "t", policy_dir, max_prompt_tokens=12, overlong="truncate"))
    assert m["stats"]["prompts_truncated"] > 0 and m["num_rows"] == 72
    assert max(len(x) for x in table(tmp_path / "t").column("prompt_token_ids").to_pylist()) == 12


def test_bad_prompt_files(tmp_path, policy_dir):
    p = tmp_path / "p.jsonl"
    p.write_text('{"question": "hi"}\n')
    with pytest.raises(InputError, match="p.jsonl, column 'prompt': no prompt column"):
        generate(cfg(str(p), tmp_path / "o", policy_dir))
    p.write_text('{"prompt": "hi"}\n{"prompt": ""}\n')
    with pytest.raises(InputError, match=r"p.jsonl, row 1, column 'prompt': empty prompt"):
        generate(cfg(str(p), tmp_path / "o", policy_dir))
    with pytest.raises(InputError, match="temperature: must be > 0"):
        cfg(str(p), tmp_path / "o", policy_dir, temperature=0)


def test_quantized_4bit_policy_generates_on_cpu(tmp_path, prompts_ds, policy_dir):
    m = generate(cfg(prompts_ds, tmp_path / "q", policy_dir, bits=4, num_samples=2,
                     max_new_tokens=4, device="cpu"))
    assert m["complete"] and m["num_rows"] == 48


def test_seeds_are_per_sample():
    # run seed, prompt id and sample index each change the seed: every pair differs
    seeds = [sample_seed(0, "a", 0), sample_seed(0, "a", 1), sample_seed(1, "a", 0), sample_seed(0, "b", 0)]
    assert len(set(seeds)) == len(seeds)
    assert sample_seed(3, "p", 2) == sample_seed(3, "p", 2)


# ----------------------------------------------------------------- processes

def _cli(*args):
    """A generate process on CPU: these tests compare whole tables across processes."""
    return subprocess.Popen([sys.executable, "-m", "offline_rlhf.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cpu_env())


def _gen_args(prompts, out, policy, *extra):
    return ["generate", "--prompts", prompts, "--output", str(out), "--policy", str(policy),
            "--num-samples", "3", "--max-new-tokens", "24", "--chunk-prompts", "2", *extra]


def test_two_workers_equal_one(tmp_path, prompts_ds, policy_dir):
    one = _cli(*_gen_args(prompts_ds, tmp_path / "one", policy_dir))
    w0 = _cli(*_gen_args(prompts_ds, tmp_path / "two", policy_dir, "--worker", "0", "--num-workers", "2"))
    w1 = _cli(*_gen_args(prompts_ds, tmp_path / "two", policy_dir, "--worker", "1", "--num-workers", "2"))
    for p in (one, w0, w1):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    a, b = table(tmp_path / "one"), table(tmp_path / "two")
    assert a.num_rows == 72 and a.equals(b)


def test_sigkill_and_rerun_equal_uninterrupted(tmp_path, prompts_ds, policy_dir):
    out = tmp_path / "killed"
    proc = _cli(*_gen_args(prompts_ds, out, policy_dir))
    entries = out / ".offline-rlhf" / "shards"
    deadline = time.time() + 300
    while not (entries.exists() and len(list(entries.glob("*.json"))) >= 3):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    m = json.loads((out / ".offline-rlhf" / "manifest.json").read_text())
    assert not m["complete"] and m["num_shards"] < 12
    rerun = _cli(*_gen_args(prompts_ds, out, policy_dir))
    said, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    import re
    done, skipped = map(int, re.search(r"(\d+) chunks done, (\d+) already committed", said).groups())
    assert skipped >= 3 and done + skipped == 12   # only the unfinished chunks were recomputed
    clean = _cli(*_gen_args(prompts_ds, tmp_path / "clean", policy_dir))
    clean.communicate(timeout=300)
    assert table(out).equals(table(tmp_path / "clean"))
    assert not list(out.glob(".*.tmp"))
