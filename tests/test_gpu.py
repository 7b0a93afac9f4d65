"""What only a CUDA GPU can check (skipped elsewhere): bf16 training, QLoRA DPO with the
reference taken from the 4-bit base and prefix sharing under FlexAttention, FlexAttention
gradients, and generation from a 4-bit policy."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.gpu


def _history(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_bf16_weights_train_on_cuda(tmp_path, policy_dir):
    from offline_rlhf.train.sft import SFTTrainConfig, train_sft
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": f" answer {i}"}) + "\n"
                           for i in range(40)))
    s = train_sft(SFTTrainConfig(data=str(src), output=str(tmp_path / "o"), policy=str(policy_dir),
                                 lr=1e-3, max_steps=5, batch_size=8, dtype="bfloat16",
                                 mixed_precision="bf16", device="cuda", report_to="none"))
    hist = _history(tmp_path / "o")
    assert all(math.isfinite(h["loss"]) for h in hist) and hist[-1]["loss"] < hist[0]["loss"]
    before = load_file(str(policy_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "o" / "final" / "model.safetensors"))
    assert after["lm_head.weight" if "lm_head.weight" in after else "model.embed_tokens.weight"].dtype == torch.bfloat16
    # every weight matrix moved (norm gains near 1.0 may not: bf16 spacing there is 2**-7)
    assert all(not torch.equal(before[k].to(torch.bfloat16), after[k]) for k in before if before[k].ndim == 2)
    assert s["steps_run"] == 5


def test_qlora_dpo_on_cuda_without_a_second_model(tmp_path, pairs_ds, policy_dir):
    """QLoRA DPO on CUDA: the reference is the 4-bit base with the adapter off (no second
    model), the prompt is shared under FlexAttention (the GPU default), and the first loss
    is log 2 because policy and reference are then the same model."""
    from offline_rlhf.train.dpo import DPOTrainConfig, train_dpo
    out = tmp_path / "q"
    torch.cuda.reset_peak_memory_stats()
    s = train_dpo(DPOTrainConfig(data=pairs_ds, output=str(out), policy=str(policy_dir),
                                 reference=str(policy_dir), lora_r=8, bits=4, dtype="bfloat16",
                                 gradient_checkpointing=True, max_steps=4, batch_size=8,
                                 micro_batch_size=4, lr=5e-3, nll_alpha=0.0, device="cuda",
                                 report_to="none"))
    assert s["data"]["layout"] == "flex" and s["data"]["ref_logps_computed"] == 48
    assert s["data"]["reference"] == "the policy's base, adapter off, 4-bit"
    hist = _history(out)
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=2e-3)
    assert hist[-1]["loss"] != hist[0]["loss"] and all(h["grad_norm"] > 0 for h in hist)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    assert (out / "reference_logps.safetensors").exists()


@pytest.mark.parametrize("layout", ["flex", "mask"])
def test_shared_layouts_give_the_gradients_of_two_rows_on_cuda(tmp_path, pairs_ds, policy_dir, layout):
    from offline_rlhf.models import load_policy, load_tokenizer
    from offline_rlhf.train.dpo import DPOTask, DPOTrainConfig, use_layout
    cfg = DPOTrainConfig(data=pairs_ds, output=str(tmp_path), policy=str(policy_dir),
                         reference=str(policy_dir))
    task = DPOTask(cfg, load_tokenizer(policy_dir, padding_side="right"))
    model = load_policy(policy_dir, dtype="float32", device="cuda", train=True)
    idx = [3, 0, 7, 12, 5, 30]
    logps, grads = {}, {}
    for name in (layout, "rows"):
        task.layout = name
        use_layout(model, name)
        model.zero_grad(set_to_none=True)
        c, r, _, _ = task.completion_logps(model, task.collate(idx, "cuda"))
        (c.sum() - 0.5 * r.sum()).backward()
        logps[name] = torch.cat([c, r]).detach()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert torch.allclose(logps[layout], logps["rows"], atol=1e-4)
    for n, g in grads["rows"].items():
        assert torch.allclose(grads[layout][n], g, rtol=1e-3, atol=1e-5), n


def test_4bit_policy_generates_on_cuda(tmp_path, policy_dir):
    from offline_rlhf.generation import GenerateConfig, generate
    from offline_rlhf.logprobs import sequence_logps
    from offline_rlhf.models import load_policy, load_tokenizer
    from offline_rlhf.shards import ShardWriter, open_dataset
    from offline_rlhf.toy import addition_prompts
    with ShardWriter(str(tmp_path / "p"), "prompts") as w:
        w.write(0, addition_prompts(8, seed=3))
        w.finish(total_chunks=1)
    m = generate(GenerateConfig(prompts=str(tmp_path / "p"), output=str(tmp_path / "g"),
                                policy=str(policy_dir), bits=4, dtype="float32", device="cuda",
                                num_samples=2, max_new_tokens=6))
    assert m["complete"] and m["num_rows"] == 16
    t = open_dataset(str(tmp_path / "g")).read()
    model = load_policy(policy_dir, bits=4, dtype="float32", device="cuda")
    fresh = sequence_logps(model, t.column("prompt_token_ids").to_pylist(),
                           t.column("response_token_ids").to_pylist(),
                           pad_id=load_tokenizer(policy_dir).pad_token_id)
    stored = t.column("behaviour_logps").to_pylist()
    assert max(np.abs(np.array(s) - f).max() for s, f in zip(stored, fresh)) < 1e-3
