import json
import re
import shutil

import pytest
import torch
from cli_helpers import cli, one_error_line
from conftest import cli_on_cpu, finished, kill_when
from safetensors.torch import load_file

from offline_rlhf.errors import InputError
from offline_rlhf.train.dpo import DPOTrainConfig, train_dpo


def cfg(pairs, out, policy, **kw):
    base = dict(data=pairs, output=str(out), policy=str(policy), reference=str(policy), lr=1e-3,
                max_steps=5, batch_size=8, micro_batch_size=4, report_to="none", nll_alpha=0.0, beta=0.1)
    base.update(kw)
    return DPOTrainConfig(**base)


def test_missing_reference_logps_names_the_stage(tmp_path, pairs_ds, policy_dir):
    with pytest.raises(InputError, match=r"48 of 48 pairs have no reference log-probs: pass --reference "
                       r"MODEL .* \(these pairs were imported: there are no generations to run"):
        train_dpo(cfg(pairs_ds, tmp_path / "o", policy_dir, reference=None))


def test_five_steps_change_every_parameter_and_move_loss(tmp_path, pairs_ds, policy_dir):
    s = train_dpo(cfg(pairs_ds, tmp_path / "o", policy_dir))
    assert s["data"]["ref_logps_computed"] == 48
    before = load_file(str(policy_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "o" / "final" / "model.safetensors"))
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    hist = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 5 and hist[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["rewards/margins"] > 0
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert k in hist[-1]


def test_unset_beta_is_chosen_by_the_passes_and_recorded(tmp_path, pairs_ds, policy_dir, capsys):
    """48 pairs at batch 8 are 6 steps a pass: 12 steps are two passes, so beta 2 (train
    dpo's rule), said on stderr and recorded; the identity keeps it unset (the data decide)."""
    train_dpo(cfg(pairs_ds, tmp_path / "o", policy_dir, max_steps=12, beta=None))
    assert "beta 2 (auto: 2 passes over 48 pairs; --beta sets it)" in capsys.readouterr().err
    recorded = json.loads((tmp_path / "o" / "config.json").read_text())
    assert recorded["config"]["beta"] == 2.0 and recorded["identity"]["beta"] is None


def test_accumulation_1x8_equals_8x1(tmp_path, pairs_ds, policy_dir):
    """One step's gradient is the same from one micro-batch of 8 as from 8 of 1 (an exact
    identity, checked on CPU in float32 wherever the suite runs)."""
    from accelerate import Accelerator

    from offline_rlhf.models import load_policy, load_tokenizer
    from offline_rlhf.train.dpo import DPOTask
    from offline_rlhf.train.loop import _step
    acc = Accelerator(cpu=True)
    c = cfg(pairs_ds, tmp_path / "o", policy_dir, nll_alpha=0.5, device="cpu")
    task = DPOTask(c, load_tokenizer(policy_dir, padding_side="right"))
    model = load_policy(policy_dir, train=True, device="cpu", dtype="float32")
    task.prepare(model, acc)
    grads, sums = [], []
    for plan in ([list(range(8))], [[i] for i in range(8)]):
        model.zero_grad(set_to_none=True)
        sums.append(_step(acc, model, task, plan, 8))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4), n
    assert sums[0]["loss"].item() == pytest.approx(sums[1]["loss"].item(), abs=1e-5)
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    # and through the whole loop the loss trajectories agree
    a, b = tmp_path / "a", tmp_path / "b"
    train_dpo(cfg(pairs_ds, a, policy_dir, max_steps=3, micro_batch_size=8, device="cpu"))
    train_dpo(cfg(pairs_ds, b, policy_dir, max_steps=3, micro_batch_size=1, device="cpu"))
    la = [json.loads(x)["loss"] for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, abs=1e-5)


def _train_args(pairs, out, policy, *extra):
    return ["train", "dpo", "--data", pairs, "--output", str(out), "--policy", str(policy),
            "--reference", str(policy), "--lr", "1e-3", "--batch-size", "8", "--micro-batch-size", "2",
            "--nll-alpha", "0.5", "--report-to", "none", "--lora-r", "0", *extra]


def test_killed_after_checkpoint_resumes_to_identical_weights(tmp_path, pairs_ds, policy_dir):
    """LoRA with dropout: the resumed run matches the uninterrupted one only if the RNG
    state is restored along with the weights, optimizer and schedule (bit-identical on CPU:
    GPU kernels need not be deterministic). The reference log-probs are computed by the
    first run only: the resumed run reads them."""
    extra = ["--max-steps", "30", "--save-steps", "10", "--lora-r", "4", "--lora-dropout", "0.2"]
    finished(cli_on_cpu(_train_args(pairs_ds, tmp_path / "full", policy_dir, *extra)))
    killed = cli_on_cpu(_train_args(pairs_ds, tmp_path / "k", policy_dir, *extra))
    ckpts = tmp_path / "k" / "checkpoints"
    kill_when(killed, (ckpts / "step-0000010" / "state.json").exists)
    first_err = killed.communicate()[1]
    assert not (tmp_path / "k" / "final").exists(), "the run finished before it could be killed"
    assert _reference_passes(first_err) == [48]
    for later in ckpts.glob("step-*"):  # the kill may land after step 20's checkpoint: resume
        if later.name != "step-0000010":  # from step 10 whichever way, so one count holds
            shutil.rmtree(later)
    out, err = finished(cli_on_cpu(_train_args(pairs_ds, tmp_path / "k", policy_dir, *extra)))
    assert "step-0000010 at step 10" in out + err and re.search(r"(\d+) steps in", out).group(1) == "20"
    assert _reference_passes(err) == [] and "48 pairs reused from" in err
    for f in ("final/model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "full" / f)), load_file(str(tmp_path / "k" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    ha = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hb] == list(range(1, 31))
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]


def _reference_passes(stderr: str) -> list[int]:
    """Pairs each process ran through the reference model, from its progress lines."""
    return [int(n) for n in re.findall(r"reference log-probs: computing (\d+) of", stderr)]


def test_two_gloo_processes_match_one(tmp_path, pairs_ds, policy_dir):
    """Same losses, gradients and weights from one process as from two. Clipping is out of
    reach (it would rescale a wrongly scaled gradient back), and the checkpoint's Adam
    moments are compared: they hold the gradient itself, where the weights (Adam divides
    by the gradient's own scale) would hide a wrong scale. Two gloo processes on CPU (even
    where a GPU is visible: two NCCL ranks on one GPU fail); they share the reference pass,
    each pair computed once."""
    extra = ["--max-steps", "4", "--save-steps", "2", "--max-grad-norm", "1e6"]
    finished(cli_on_cpu(_train_args(pairs_ds, tmp_path / "one", policy_dir, *extra)))
    out, err = finished(cli_on_cpu(_train_args(pairs_ds, tmp_path / "two", policy_dir, *extra), nproc=2))
    assert sorted(_reference_passes(err)) == [24, 24]    # 48 pairs, each computed once
    assert (tmp_path / "two" / "reference_logps.safetensors").exists()
    la = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 4
    for x, y in zip(la, lb):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], abs=1e-5)
    ma, mb = (torch.load(d / "checkpoints" / "step-0000002" / "optimizer.pt", weights_only=True)["state"]
              for d in (tmp_path / "one", tmp_path / "two"))
    assert ma.keys() == mb.keys() and len(ma) > 0
    for i in ma:
        for k in ("exp_avg", "exp_avg_sq"):
            a, b = ma[i][k], mb[i][k]
            assert (a - b).norm() <= 1e-5 * a.norm(), (i, k)
    wa, wb = (load_file(str(d / "final" / "model.safetensors")) for d in (tmp_path / "one", tmp_path / "two"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_lora_saves_adapter_and_merged_model(tmp_path, pairs_ds, policy_dir):
    out = tmp_path / "lora"
    train_dpo(cfg(pairs_ds, out, policy_dir, lora_r=4, max_steps=3, lr=5e-3))
    import peft
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(str(policy_dir))
    with_adapter = peft.PeftModel.from_pretrained(base, str(out / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        a, b = with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits
        c = AutoModelForCausalLM.from_pretrained(str(policy_dir))(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(b, c, atol=1e-4)


def test_qlora_trains_on_cpu(tmp_path, pairs_ds, policy_dir):
    out = tmp_path / "qlora"
    s = train_dpo(cfg(pairs_ds, out, policy_dir, lora_r=4, bits=4, max_steps=3, lr=5e-3,
                      gradient_checkpointing=True, device="cpu"))
    assert s["data"]["reference"] == "the policy's base, adapter off, 4-bit"
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(h["grad_norm"] > 0 for h in hist) and hist[-1]["loss"] != hist[0]["loss"]
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    assert s["steps_run"] == 3


def test_truncation_is_counted(tmp_path, pairs_ds, policy_dir):
    s = train_dpo(cfg(pairs_ds, tmp_path / "t", policy_dir, max_steps=1, max_prompt_tokens=8,
                      max_completion_tokens=2))
    assert s["data"]["prompts_truncated"] > 0 and s["data"]["completions_truncated"] > 0
    with pytest.warns(UserWarning, match="dropped .* truncated pairs"):
        import pyarrow as pa

        from offline_rlhf.shards import ShardWriter, open_dataset
        from offline_rlhf.train.dpo import DPOTask
        t = open_dataset(pairs_ds).read()
        t = t.set_column(t.schema.get_field_index("chosen_ref_logps_sum"), "chosen_ref_logps_sum",
                         pa.array([-1.0] * t.num_rows))
        t = t.set_column(t.schema.get_field_index("rejected_ref_logps_sum"), "rejected_ref_logps_sum",
                         pa.array([-2.0] * t.num_rows))
        with ShardWriter(str(tmp_path / "withref"), "pairs") as w:
            w.write(0, t)
            w.finish(total_chunks=1)
        from offline_rlhf.models import load_tokenizer
        task = DPOTask(cfg(str(tmp_path / "withref"), tmp_path / "x", policy_dir, reference=None,
                           max_completion_tokens=2), load_tokenizer(policy_dir))
    assert task.stats["pairs_dropped_truncated"] > 0 and len(task.prompts) == len(task.ref_chosen)


def _layout_logps(pairs_ds, policy_dir, tmp_path, layouts, idx, **kw):
    from offline_rlhf.models import load_policy, load_tokenizer
    from offline_rlhf.train.dpo import DPOTask, use_layout
    tok = load_tokenizer(policy_dir, padding_side="right")
    model = load_policy(policy_dir, dtype="float32")   # on the package's device
    task = DPOTask(cfg(pairs_ds, tmp_path / "o", policy_dir, **kw), tok)
    out = {}
    for layout in layouts:
        task.layout = layout
        use_layout(model, layout)
        with torch.no_grad():
            out[layout] = task.completion_logps(model, task.collate(idx, model.device))
    return task, out


def test_shared_prompt_packing_equals_separate_rows(tmp_path, pairs_ds, policy_dir):
    """Prefix sharing under a dense mask gives the completion log-probs of two rows."""
    idx = [3, 0, 7, 12, 5]
    task, out = _layout_logps(pairs_ds, policy_dir, tmp_path, ("mask", "rows"), idx)
    for a, b in zip(out["mask"], out["rows"]):
        assert torch.allclose(a, b, atol=1e-4), (a, b)
    assert out["mask"][2].tolist() == [float(len(task.chosen[i])) for i in idx]


def test_flex_packed_layout_equals_separate_rows(tmp_path, pairs_ds, policy_dir):
    """The FlexAttention layout (pairs packed into one row, chosen hidden from rejected by
    a block mask) gives the log-probs of two rows. Forward only here: FlexAttention has no
    backward pass on CPU (the gpu tests train with it)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    idx = [3, 0, 7, 12, 5]
    task, out = _layout_logps(pairs_ds, policy_dir, tmp_path, ("rows", "flex"), idx)
    batch = task.collate(idx, "cpu")
    assert batch["input_ids"].shape == (1, sum(len(task.prompts[i]) + len(task.chosen[i]) +
                                               len(task.rejected[i]) for i in idx))   # no padding
    for a, b in zip(out["flex"], out["rows"]):
        assert torch.allclose(a, b, atol=1e-4), (a, b)


def test_layout_follows_the_device(tmp_path, pairs_ds, policy_dir):
    from offline_rlhf.models import load_policy
    from offline_rlhf.train.dpo import resolve_layout
    model = load_policy(policy_dir, device="cpu")
    assert resolve_layout(cfg(pairs_ds, tmp_path, policy_dir), "cpu", model) == "mask"
    assert resolve_layout(cfg(pairs_ds, tmp_path, policy_dir, share_prompt=False), "cpu", model) == "rows"
    with pytest.raises(InputError, match="flex trains only on a GPU"):
        resolve_layout(cfg(pairs_ds, tmp_path, policy_dir, prefix_attention="flex"), "cpu", model)
    with pytest.raises(InputError, match="prefix_attention: must be one of"):
        cfg(pairs_ds, tmp_path, policy_dir, prefix_attention="dense")


@pytest.mark.parametrize("bits", [None, 4])
def test_adapter_off_reference_equals_a_separate_base(tmp_path, pairs_ds, policy_dir, bits):
    """The reference without a second model: the LoRA (QLoRA) policy with its adapter
    switched off gives the log-probs of a separately loaded base of the same dtype and bits."""
    import numpy as np
    from accelerate import Accelerator

    from offline_rlhf.models import adapter_disabled, frozen_forward, load_reference, load_tokenizer
    from offline_rlhf.train.dpo import DPOTask
    from offline_rlhf.train.loop import load_model_for_training
    c = cfg(pairs_ds, tmp_path / "o", policy_dir, lora_r=4, bits=bits, device="cpu")
    acc = Accelerator(cpu=True)
    policy = load_model_for_training(c, "cpu")
    with torch.no_grad():   # as if trained: the adapted model is no longer its base
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    task = DPOTask(c, load_tokenizer(policy_dir, padding_side="right"))
    idx = list(range(16))
    with frozen_forward(policy):
        with adapter_disabled(policy):
            off = task.reference_sums(policy, idx, acc)
        adapted = task.reference_sums(policy, idx, acc)
    base = load_reference(policy_dir, bits=bits, dtype="float32", device="cpu")
    with frozen_forward(base):
        separate = task.reference_sums(base, idx, acc)
    assert np.abs(off - separate).max() < 1e-5
    assert np.abs(adapted - separate).max() > 1e-2


def test_reference_pass_runs_once_and_is_keyed_by_content(tmp_path, pairs_ds, policy_dir, monkeypatch):
    """Reference log-probs are computed once per output and key (reference content, data,
    truncation, numerics); a rerun reads them, a change recomputes; the policy serves as
    its own reference without a second model, and a separate reference is freed before
    the first training step."""
    import shutil
    import weakref

    from safetensors.torch import save_file

    from offline_rlhf.train import reference
    from offline_rlhf.train.dpo import DPOTask
    passes, loaded, alive_in_training = [], [], []
    real_sums, real_load, real_loss = DPOTask.reference_sums, reference.load_reference, DPOTask.loss

    def counting(self, model, indices, acc, bar=None):
        passes.append(len(indices))
        return real_sums(self, model, indices, acc, bar)

    def tracked(*a, **kw):
        model = real_load(*a, **kw)
        loaded.append(weakref.ref(model))
        return model

    def loss(self, model, batch):
        alive_in_training.append(sum(w() is not None for w in loaded))
        return real_loss(self, model, batch)
    monkeypatch.setattr(DPOTask, "reference_sums", counting)
    monkeypatch.setattr(DPOTask, "loss", loss)
    monkeypatch.setattr(reference, "load_reference", tracked)

    def run(**kw):   # overwrite: trains again each time (it keeps the content-keyed cache)
        return train_dpo(cfg(pairs_ds, tmp_path / "o", policy_dir, max_steps=1, overwrite=True,
                             **kw))["data"]
    first = run()
    assert passes == [48] and first["ref_logps_computed"] == 48 and not loaded
    assert first["reference"] == "the policy before its first step"
    again = run()
    assert passes == [48] and again["ref_logps_reused"] == 48 and again["ref_logps_computed"] == 0
    run(max_completion_tokens=3)       # other sequences: recomputed
    assert passes == [48, 48]
    other = tmp_path / "ref2"
    shutil.copytree(policy_dir, other)
    weights = load_file(str(other / "model.safetensors"))
    weights = {k: v + 0.01 for k, v in weights.items()}
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    s = run(max_completion_tokens=3, reference=str(other))   # another reference: recomputed
    assert passes == [48, 48, 48] and s["reference"] == str(other) and len(loaded) == 1
    assert alive_in_training and not any(alive_in_training)   # freed before training


def test_computed_reference_trains_like_a_stored_one(tmp_path, pairs_ds, policy_dir):
    """QLoRA on CPU: a run that computes its reference (the policy's 4-bit base, adapter
    off) takes the same steps as a run on pairs that carry those values, so the reference
    pass leaves the policy as it was (an eval-mode CPU pass would let bitsandbytes repack
    the 4-bit weights into a layout with no backward pass, losing gradients)."""
    from offline_rlhf.train.reference import pairs_with_reference
    kw = dict(lora_r=4, bits=4, max_steps=2, lr=5e-3, device="cpu")
    a = train_dpo(cfg(pairs_ds, tmp_path / "a", policy_dir, **kw))
    assert a["data"]["ref_logps_computed"] == 48
    pairs_with_reference(pairs_ds, str(tmp_path / "a"), str(tmp_path / "withref"))
    b = train_dpo(cfg(str(tmp_path / "withref"), tmp_path / "b", policy_dir, reference=None, **kw))
    assert b["data"]["ref_logps_computed"] == 0
    ha = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert ha[0]["loss"] == pytest.approx(0.6931, abs=1e-4)      # reference = policy at step 0
    for x, y in zip(ha, hb):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    assert ha[-1]["loss"] != ha[0]["loss"]


def test_ld_dpo_sums_agree_across_layouts_and_weigh_the_tail(tmp_path, pairs_ds, policy_dir):
    """LD-DPO sums: the same in a shared row as in two rows; alpha 1 is the plain sum, and
    with alpha 0 each sum covers only the shorter completion's length."""
    idx = [3, 0, 7, 12, 5]
    task, half = _layout_logps(pairs_ds, policy_dir, tmp_path, ("mask", "rows"), idx, ld_alpha=0.5)
    for a, b in zip(half["mask"], half["rows"]):
        assert torch.allclose(a, b, atol=1e-4), (a, b)
    _, one = _layout_logps(pairs_ds, policy_dir, tmp_path, ("rows",), idx, ld_alpha=1.0)
    _, zero = _layout_logps(pairs_ds, policy_dir, tmp_path, ("rows",), idx, ld_alpha=0.0)
    pc, pr, lc, lr, full = one["rows"]
    assert torch.allclose(pc, full) and torch.equal(zero["rows"][4], full)   # sft/nll: unweighted
    longer = lr > lc          # every rejected here is longer: its tail is cut at alpha 0
    assert longer.all() and (zero["rows"][1] > pr).all()
    assert torch.allclose(half["rows"][1], (zero["rows"][1] + pr) / 2, atol=1e-5)


def test_metrics_log_the_loss_parts(tmp_path, pairs_ds, policy_dir):
    """Issue 23 item 7, through the CLI: metrics.jsonl has loss/dpo (TRL's loss: the
    weighted --loss terms), loss/nll and each term beside the total, which is their sum
    with --nll-alpha; at the first step (policy = reference) the sigmoid term is log 2."""
    out = tmp_path / "o"
    args = _train_args(pairs_ds, out, policy_dir, "--max-steps", "2", "--loss", "sigmoid,bco_pair,sft",
                       "--loss-weights", "0.8,0.2,1")
    finished(cli_on_cpu(args))
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 2
    for h in hist:
        assert h["loss"] == pytest.approx(h["loss/dpo"] + 0.5 * h["loss/nll"], rel=1e-5)
        parts = 0.8 * h["loss/sigmoid"] + 0.2 * h["loss/bco_pair"] + h["loss/sft"]
        assert h["loss/dpo"] == pytest.approx(parts, rel=1e-5)
        assert h["loss/nll"] > 0
    assert hist[0]["loss/sigmoid"] == pytest.approx(0.6931, abs=1e-3)
    assert hist[0]["loss/bco_pair"] == pytest.approx(2 * 0.6931, abs=2e-3)


def test_plain_dpo_logs_its_parts_too(tmp_path, pairs_ds, policy_dir):
    s = train_dpo(cfg(pairs_ds, tmp_path / "o", policy_dir, max_steps=1, nll_alpha=0.0))
    first = s["first"]
    assert first["loss/dpo"] == pytest.approx(first["loss"]) and first["loss/nll"] > 0


@pytest.mark.parametrize("extra, parts", [
    (["--loss", "sigmoid,bco_pair", "--f-divergence", "js_divergence"],
     ("f_divergence: js_divergence is defined only for", "not bco_pair")),
    (["--loss", "sigmoid,ipo", "--loss-weights", "1"], ("loss_weights: loss_weights has 1 weights for 2 losses",)),
    (["--loss", "sigmoid,kto"], ("loss: loss_type must be one of",)),
    (["--loss", "exo_pair"], ("label_smoothing: exo_pair needs it > 0",)),
    (["--ld-alpha", "1.5"], ("ld_alpha: must be in [0, 1]",)),
])
def test_refused_loss_settings_in_one_line(tmp_path, pairs_ds, policy_dir, extra, parts):
    out = cli("train", "dpo", "--data", pairs_ds, "--output", tmp_path / "o", "--policy", policy_dir,
              "--reference", policy_dir, *extra)
    one_error_line(out, *parts)


def test_ld_alpha_needs_a_reference(tmp_path, pairs_ds, policy_dir):
    out = cli("train", "dpo", "--data", pairs_ds, "--output", tmp_path / "o", "--policy", policy_dir,
              "--ld-alpha", "0.5")
    one_error_line(out, "ld_alpha: LD-DPO weighs reference tokens too", "--reference MODEL")


def test_ld_dpo_trains_from_a_weighted_reference(tmp_path, pairs_ds, policy_dir):
    """The reference sums are recomputed with the LD weights: at the first step (policy =
    reference) DPO is log 2, which unweighted reference sums would not give."""
    s = train_dpo(cfg(pairs_ds, tmp_path / "o", policy_dir, max_steps=2, ld_alpha=0.3))
    assert s["data"]["ref_logps_computed"] == 48
    assert s["first"]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert s["last"]["loss"] < s["first"]["loss"]
