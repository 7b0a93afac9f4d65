import numpy as np
import pytest
import torch

from offline_rlhf.generation import GenerateConfig, generate
from offline_rlhf.logprobs import LogprobsConfig, compute_logprobs, processed_logps
from offline_rlhf.models import load_reference
from offline_rlhf.shards import ShardWriter, open_dataset
from offline_rlhf.toy import addition_prompts


def test_processed_logps_closed_form():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    lp = processed_logps(logits, temperature=2.0)
    np.testing.assert_allclose(lp.exp().numpy(), torch.softmax(logits / 2, -1).numpy(), rtol=1e-6)
    lp = processed_logps(logits, top_k=2)
    assert torch.isinf(lp[0, 2:]).all()
    np.testing.assert_allclose(lp[0, :2].exp().numpy(), torch.softmax(logits[0, :2], -1).numpy(), rtol=1e-6)
    p = torch.softmax(logits, -1)[0]  # [0.644, 0.237, 0.087, 0.032]
    lp = processed_logps(logits, top_p=0.7)  # 0.644 < 0.7, so the second token is kept too
    assert torch.isfinite(lp[0, :2]).all() and torch.isinf(lp[0, 2:]).all()
    lp = processed_logps(logits, top_p=float(p[0]) - 1e-3)
    assert torch.isfinite(lp[0, 0]) and torch.isinf(lp[0, 1:]).all() and lp[0, 0] == 0


def test_logprobs_stage_matches_direct_forward(tmp_path, policy_dir):
    with ShardWriter(str(tmp_path / "p"), "prompts") as w:
        w.write(0, addition_prompts(10, seed=2))
        w.finish(total_chunks=1)
    # float32 on whatever device the package picks (auto would be bfloat16 on CUDA)
    generate(GenerateConfig(prompts=str(tmp_path / "p"), output=str(tmp_path / "g"),
                            policy=str(policy_dir), num_samples=2, max_new_tokens=6,
                            chunk_prompts=4, dtype="float32"))
    m = compute_logprobs(LogprobsConfig(generations=str(tmp_path / "g"), output=str(tmp_path / "r"),
                                        reference=str(policy_dir), token_budget=50, dtype="float32"))
    assert m["complete"] and m["num_rows"] == 20
    src = open_dataset(str(tmp_path / "g")).read()
    rows = open_dataset(str(tmp_path / "r")).read().to_pylist()
    model = load_reference(policy_dir, dtype="float32")
    for r in rows[:5]:
        ids = torch.tensor([r["prompt_token_ids"] + r["response_token_ids"]], device=model.device)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        n = len(r["prompt_token_ids"])
        want = [lp[n - 1 + j, t].item() for j, t in enumerate(r["response_token_ids"])]
        np.testing.assert_allclose(r["ref_logps"], want, atol=1e-5)
        assert r["ref_logps_sum"] == pytest.approx(sum(want), abs=1e-4)
        assert r["reference_fingerprint"] == m["lineage"]["reference_fingerprint"]
    # behaviour log-probs at temperature 1 with no filtering are the same distribution
    np.testing.assert_allclose(np.concatenate([r["ref_logps"] for r in rows]),
                               np.concatenate(src.column("behaviour_logps").to_pylist()), atol=1e-4)


def test_4bit_stage_equals_the_qlora_policy_base(tmp_path, policy_dir):
    """`logprobs --bits 4` stores what a QLoRA policy's base (adapter off) computes in
    training: the reference its adapter starts from (CPU: bitsandbytes' 4-bit layout)."""
    from conftest import generation_table

    from offline_rlhf.logprobs import sequence_logps
    from offline_rlhf.models import LoraSpec, adapter_disabled, frozen_forward, load_policy
    with ShardWriter(str(tmp_path / "g"), "generations") as w:
        w.write(0, generation_table(8, tokens=5))
        w.finish(total_chunks=1)
    compute_logprobs(LogprobsConfig(generations=str(tmp_path / "g"), output=str(tmp_path / "r"),
                                    reference=str(policy_dir), bits=4, dtype="float32", device="cpu"))
    rows = open_dataset(str(tmp_path / "r")).read().to_pylist()
    policy = load_policy(policy_dir, bits=4, lora=LoraSpec(r=4), train=True, dtype="float32", device="cpu")
    with frozen_forward(policy), adapter_disabled(policy):
        want = sequence_logps(policy, [r["prompt_token_ids"] for r in rows],
                              [r["response_token_ids"] for r in rows], pad_id=0)
    np.testing.assert_allclose(np.concatenate([r["ref_logps"] for r in rows]), np.concatenate(want),
                               atol=1e-5)
    assert policy.training    # the policy is left as it was
