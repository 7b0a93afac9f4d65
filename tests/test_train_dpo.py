import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from offline_rlhf.errors import InputError
from offline_rlhf.pairs import import_pairs
from offline_rlhf.train.dpo import DPOTrainConfig, train_dpo


@pytest.fixture(scope="module")
def pairs_ds(tmp_path_factory, policy_dir):
    """Imported text pairs, with reference log-probs filled by a first short run."""
    d = tmp_path_factory.mktemp("pairs")
    src = d / "prefs.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"What is {i}+{i % 5}? Answer:",
                                       "chosen": f" {i + i % 5}", "rejected": f" {i * 3} maybe"}) + "\n"
                           for i in range(48)))
    import_pairs(str(src), str(d / "pairs"))
    return str(d / "pairs")


def cfg(pairs, out, policy, **kw):
    base = dict(data=pairs, output=str(out), policy=str(policy), reference=str(policy), lr=1e-3,
                max_steps=5, batch_size=8, micro_batch_size=4, report_to="none", nll_alpha=0.0)
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


def test_accumulation_1x8_equals_8x1(tmp_path, pairs_ds, policy_dir):
    """One step's gradient is the same from one micro-batch of 8 as from 8 of 1."""
    from accelerate import Accelerator

    from offline_rlhf.models import load_policy, load_tokenizer
    from offline_rlhf.train.dpo import DPOTask
    from offline_rlhf.train.loop import _step
    acc = Accelerator(cpu=True)
    c = cfg(pairs_ds, tmp_path / "o", policy_dir, nll_alpha=0.5)
    task = DPOTask(c, load_tokenizer(policy_dir, padding_side="right"), "cpu")
    model = load_policy(policy_dir, train=True)
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
    train_dpo(cfg(pairs_ds, a, policy_dir, max_steps=3, micro_batch_size=8))
    train_dpo(cfg(pairs_ds, b, policy_dir, max_steps=3, micro_batch_size=1))
    la = [json.loads(x)["loss"] for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, abs=1e-5)


def _run(args, **kw):
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _train_args(pairs, out, policy, *extra):
    return ["train", "dpo", "--data", pairs, "--output", str(out), "--policy", str(policy),
            "--reference", str(policy), "--lr", "1e-3", "--batch-size", "8", "--micro-batch-size", "2",
            "--nll-alpha", "0.5", "--report-to", "none", "--lora-r", "0", *extra]


def test_killed_after_checkpoint_resumes_to_identical_weights(tmp_path, pairs_ds, policy_dir):
    """LoRA with dropout: the resumed run matches the uninterrupted one only if the RNG
    state is restored along with the weights, optimizer and schedule."""
    extra = ["--max-steps", "30", "--save-steps", "10", "--lora-r", "4", "--lora-dropout", "0.2"]
    cli = [sys.executable, "-m", "offline_rlhf.cli"]
    full = _run(cli + _train_args(pairs_ds, tmp_path / "full", policy_dir, *extra))
    assert full.wait(timeout=300) == 0, full.stderr.read()
    killed = _run(cli + _train_args(pairs_ds, tmp_path / "k", policy_dir, *extra))
    ckpts = tmp_path / "k" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts / "step-0000010" / "state.json").exists():
        assert killed.poll() is None and time.time() < deadline
        time.sleep(0.005)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "k" / "final").exists(), "the run finished before it could be killed"
    for later in ckpts.glob("step-*"):  # the kill may land after step 20's checkpoint: resume
        if later.name != "step-0000010":  # from step 10 whichever way, so one count holds
            shutil.rmtree(later)
    resumed = _run(cli + _train_args(pairs_ds, tmp_path / "k", policy_dir, *extra))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "step-0000010 at step 10" in out + err and re.search(r"(\d+) steps in", out).group(1) == "20"
    for f in ("final/model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "full" / f)), load_file(str(tmp_path / "k" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    ha = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hb] == list(range(1, 31))
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]


def test_two_gloo_processes_match_one(tmp_path, pairs_ds, policy_dir):
    """Same losses, gradients and weights from one process as from two. Clipping is out of
    reach (it would rescale a wrongly scaled gradient back), and the checkpoint's Adam
    moments are compared: they hold the gradient itself, where the weights (Adam divides
    by the gradient's own scale) would hide a wrong scale."""
    extra = ["--max-steps", "4", "--save-steps", "2", "--max-grad-norm", "1e6"]
    one = _run([sys.executable, "-m", "offline_rlhf.cli"] + _train_args(pairs_ds, tmp_path / "one", policy_dir, *extra))
    assert one.wait(timeout=300) == 0, one.stderr.read()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "-m", "offline_rlhf.cli"] + _train_args(pairs_ds, tmp_path / "two", policy_dir, *extra),
               env=env)
    try:
        out, err = two.communicate(timeout=300)  # must not hang at exit
    except subprocess.TimeoutExpired:
        two.kill()
        pytest.fail("two-process run hung")
    assert two.returncode == 0, err
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
    s = train_dpo(cfg(pairs_ds, out, policy_dir, lora_r=4, bits=4, max_steps=3, lr=5e-3))
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
                           max_completion_tokens=2), load_tokenizer(policy_dir), "cpu")
    assert task.stats["pairs_dropped_truncated"] > 0 and len(task.prompts) == len(task.ref_chosen)


def test_shared_prompt_packing_equals_separate_rows(tmp_path, pairs_ds, policy_dir):
    """Prefix sharing gives the same completion log-probs as two separate rows."""
    from offline_rlhf.models import load_policy, load_tokenizer
    from offline_rlhf.train.dpo import DPOTask
    tok = load_tokenizer(policy_dir, padding_side="right")
    model = load_policy(policy_dir)
    idx = [3, 0, 7, 12, 5]
    out = []
    for share in (True, False):
        task = DPOTask(cfg(pairs_ds, tmp_path / "o", policy_dir, share_prompt=share), tok, "cpu")
        with torch.no_grad():
            out.append(task.completion_logps(model, task.collate(idx, "cpu")))
    for a, b in zip(*out):
        assert torch.allclose(a, b, atol=1e-4), (a, b)
    assert out[0][2].tolist() == [float(len(task.chosen[i])) for i in idx]
