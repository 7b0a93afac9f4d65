import shutil

import pytest
import torch

from offline_rlhf import models
from offline_rlhf.errors import InputError


def test_tiny_models_load_and_run(policy_dir, reward_dir):
    tok = models.load_tokenizer(policy_dir)
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert "<|assistant|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    batch = tok(["What is 1+2? Answer:", "hi"], return_tensors="pt", padding=True)
    policy = models.load_policy(policy_dir)
    assert not policy.training
    assert policy(**batch.to(policy.device)).logits.shape[:2] == batch["input_ids"].shape
    rm = models.load_reward_model(reward_dir)
    assert rm(**batch.to(rm.device)).logits.shape == (2, 1)
    ref = models.load_reference(policy_dir)
    assert not any(p.requires_grad for p in ref.parameters())


def test_loading_is_safe_by_default(policy_dir, monkeypatch):
    from transformers import AutoModelForCausalLM
    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(path, **kw):
        seen.update(kw)
        return real(path, **kw)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    models.load_policy(policy_dir)
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True
    models.load_policy(policy_dir, trust_remote_code=True)
    assert seen["trust_remote_code"] is True


def test_refuses_pickles_and_missing_dirs(tmp_path, policy_dir):
    bad = tmp_path / "pickled"
    shutil.copytree(policy_dir, bad)
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(InputError, match="only pickle weights"):
        models.load_policy(bad)
    with pytest.raises(InputError, match="directory not found"):
        models.load_policy(tmp_path / "nope")


def test_reward_model_must_have_one_label(tmp_path, reward_dir):
    import json
    two = tmp_path / "two"
    shutil.copytree(reward_dir, two)
    cfg = json.loads((two / "config.json").read_text())
    cfg["id2label"] = {"0": "a", "1": "b"}
    cfg["label2id"] = {"a": 0, "b": 1}
    (two / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="has 2 labels"):
        models.load_reward_model(two)


def test_fingerprint_is_content_based(tmp_path, policy_dir):
    copy = tmp_path / "copy"
    shutil.copytree(policy_dir, copy)
    assert models.fingerprint(copy) == models.fingerprint(policy_dir)
    model = models.load_policy(copy)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    model.save_pretrained(copy, safe_serialization=True)
    assert models.fingerprint(copy) != models.fingerprint(policy_dir)


def test_lora_trains_only_adapters(policy_dir, tokenizer):
    model = models.load_policy(policy_dir, lora=models.LoraSpec(r=4), train=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_qlora_4bit_backward_on_cpu(policy_dir, tokenizer):
    import bitsandbytes as bnb
    model = models.load_policy(policy_dir, bits=4, lora=models.LoraSpec(r=4), train=True, device="cpu")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    batch = tokenizer(["What is 3+4? Answer: 7"], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    assert torch.isfinite(loss) and grads and all(g is not None for g in grads)
    # lora_B starts at zero, so the first gradient flows into B
    assert any(g.abs().sum() > 0 for g in grads)


def test_8bit_loads_on_cpu(policy_dir, tokenizer):
    import bitsandbytes as bnb
    model = models.load_policy(policy_dir, bits=8, device="cpu")
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    batch = tokenizer(["hi"], return_tensors="pt")
    assert torch.isfinite(model(**batch).logits).all()


@pytest.mark.gpu
def test_4bit_on_gpu(policy_dir, tokenizer):
    model = models.load_policy(policy_dir, bits=4, device="cuda", dtype="bfloat16")
    batch = tokenizer(["hi"], return_tensors="pt").to("cuda")
    assert torch.isfinite(model(**batch).logits.float()).all()
