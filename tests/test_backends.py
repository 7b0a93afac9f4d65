"""Backend plumbing that needs no vLLM: options, refusals, the built-in loop's batch size
and its cache keyword. The vLLM engines themselves are tested in test_vllm.py."""

import logging
import sys
import warnings

import pytest
import torch
from transformers import LlamaConfig

from offline_rlhf.backends import Sampling
from offline_rlhf.backends.hf import (
    CPU_TOKEN_BUDGET,
    cuda_token_budget,
    default_token_budget,
    kv_bytes_per_token,
    sample_batch,
)
from offline_rlhf.errors import InputError
from offline_rlhf.evaluate import EvalConfig
from offline_rlhf.generation import GenerateConfig
from offline_rlhf.logprobs import LogprobsConfig
from offline_rlhf.models import load_policy
from offline_rlhf.rewards.score import ScoreConfig

LLAMA_1B = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)


def test_kv_bytes_and_cuda_budget_closed_form():
    # 16 layers x 2 (K, V) x 8 KV heads x 64 head dim x 2 bytes (bf16)
    assert kv_bytes_per_token(LLAMA_1B, torch.bfloat16) == 32768
    assert kv_bytes_per_token(LLAMA_1B, torch.float32) == 65536
    # per budget token: 1.25 x 32768 KV + (6 x 2048 + 3 x 5632) x 2 / K=4 prefill
    # activations + 6 x 4 x 32000 / 128 logits = 40960 + 14592 + 6000 = 61552 bytes
    free = 70 * 2**30
    assert cuda_token_budget(LLAMA_1B, torch.bfloat16, free, k=4, max_new_tokens=128) == \
        int(0.8 * free / 61552)
    # more samples per prompt share one prefill: a larger budget; fp32 halves it about
    assert cuda_token_budget(LLAMA_1B, torch.bfloat16, free, 8, 128) > \
        cuda_token_budget(LLAMA_1B, torch.bfloat16, free, 4, 128) > \
        1.9 * cuda_token_budget(LLAMA_1B, torch.float32, free, 4, 128)


def test_default_budget_is_the_cpu_constant_on_cpu(policy_dir, tmp_path):
    model = load_policy(policy_dir, device="cpu")
    cfg = GenerateConfig(prompts="p", output=str(tmp_path / "o"), policy=str(policy_dir))
    assert cfg.token_budget is None and default_token_budget(model, cfg) == CPU_TOKEN_BUDGET == 16384


def test_decode_loop_raises_no_cache_deprecation(policy_dir, tokenizer):
    """transformers 5.2x renamed the ``past_key_values`` argument ``cache`` and warns on
    the old name; the loop passes whichever name the installed version takes."""
    logging.Logger.warning_once.cache_clear()    # transformers warns once per process
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("transformers")
    log.addHandler(handler)
    model = load_policy(policy_dir, device="cpu")
    ids = [tokenizer("What is 1+2?")["input_ids"], tokenizer("Hi")["input_ids"]]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = sample_batch(model, tokenizer, ids, [[1, 2], [3, 4]], Sampling(max_new_tokens=4))
    finally:
        log.removeHandler(handler)
    assert len(out) == 2 and all(len(s["tokens"]) >= 1 for r in out for s in r)
    said = [r.getMessage() for r in records] + [str(w.message) for w in caught]
    assert not [m for m in said if "deprecated" in m], said


def test_backend_options_are_checked_in_every_stage_config(tmp_path):
    for cls, kw in ((GenerateConfig, dict(prompts="p", policy="m")),
                    (LogprobsConfig, dict(generations="g", reference="m")),
                    (ScoreConfig, dict(generations="g", weights={"format": 1.0})),
                    (EvalConfig, dict(prompts="p", policy="m"))):
        with pytest.raises(InputError, match="backend: must be one of hf, vllm, got 'tgi'"):
            cls(output=str(tmp_path), backend="tgi", **kw)
        with pytest.raises(InputError, match="vllm_kv_cache_gb: must be > 0"):
            cls(output=str(tmp_path), vllm_kv_cache_gb=0.0, **kw)
        assert cls(output=str(tmp_path), backend="vllm", **kw).backend == "vllm"


def test_missing_vllm_is_refused_in_one_line(tmp_path, policy_dir, monkeypatch, capsys):
    from offline_rlhf.cli import main
    monkeypatch.setitem(sys.modules, "vllm", None)   # `import vllm` now fails as if absent
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "What is 1+1?"}\n')
    rc = main(["generate", "--prompts", str(p), "--output", str(tmp_path / "o"),
               "--policy", str(policy_dir), "--backend", "vllm"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "vllm is not installed" in err
    assert not (tmp_path / "o").exists()


def test_backend_is_a_pipeline_option_and_keys_the_stage(tmp_path, policy_dir):
    from offline_rlhf.pipeline import load_pipeline
    job = tmp_path / "job.toml"
    job.write_text(f'workdir = "{tmp_path / "w"}"\n[inputs]\npolicy = "{policy_dir}"\n'
                   f'prompts = "{tmp_path / "p.jsonl"}"\n'
                   '[stages.generate]\nkind = "generate"\nprompts = "inputs.prompts"\n'
                   'policy = "inputs.policy"\n')
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    hf = load_pipeline(str(job)).stages[0]
    vl = load_pipeline(str(job), ["stages.generate.backend=vllm"]).stages[0]
    assert vl.options["backend"] == "vllm" and vl.key != hf.key
    with pytest.raises(InputError, match="backend: must be one of hf, vllm"):
        load_pipeline(str(job), ["stages.generate.backend=tgi"])


def test_rest_and_eval_pass_the_backend_to_generation(tmp_path, policy_dir, monkeypatch):
    from offline_rlhf import evaluate, rest
    seen = []

    class Stop(Exception):
        pass

    def fake_generate(cfg):
        seen.append((cfg.backend, cfg.vllm_kv_cache_gb))
        raise Stop
    monkeypatch.setattr(rest, "generate", fake_generate)
    monkeypatch.setattr(evaluate, "generate", fake_generate)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "What is 1+1?"}\n')
    rcfg = rest.RestConfig(policy=str(policy_dir), prompts=str(prompts), output=str(tmp_path / "r"),
                           backend="vllm", vllm_kv_cache_gb=2.0)
    with pytest.raises(Stop):
        rest._grow(rcfg, 0, str(policy_dir), tmp_path / "r")
    ecfg = EvalConfig(policy=str(policy_dir), prompts=str(prompts), output=str(tmp_path / "e"),
                      backend="vllm", vllm_kv_cache_gb=2.0, weights={"length_penalty": 1.0})
    with pytest.raises(Stop):
        evaluate.run_eval(ecfg)
    assert seen == [("vllm", 2.0), ("vllm", 2.0)]
