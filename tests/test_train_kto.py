"""KTO: the loss against TRL's KTOTrainer and closed forms; labels; the trainer through the CLI.

Parity: as for DPO (tests/test_losses_dpo_family.py), TRL 1.16's KTO loss lives inline in
``KTOTrainer._compute_loss``; it is called unbound on a bare instance with a stand-in model
whose forward returns fixed per-token log-probs, one set for the examples and one for
their mismatched (KL) pairs, and precomputed reference sums.
"""

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch
from cli_helpers import cli, one_error_line
from conftest import generation_rows
from safetensors.torch import load_file

from offline_rlhf.losses.kto import balanced_weights, bco_delta, kto_kl, kto_loss
from offline_rlhf.train.kto_data import kl_partners, label_generations

N, T = 8, 10


def random_batch(seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(N, T, dtype=torch.long)
    for i, n in enumerate(torch.randint(1, T - 2, (N,), generator=g).tolist()):
        mask[i, 2:2 + n] = 1
    own = -torch.rand(N, T - 1, generator=g) * 2 * mask[:, 1:]
    kl = -torch.rand(N, T - 1, generator=g) * 2 * mask[:, 1:]
    ref = own.sum(1) + torch.randn(N, generator=g) * 0.7
    ref_kl = kl.sum(1) - 0.3 + torch.randn(N, generator=g) * 0.5     # a positive mean KL
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    return own, kl, mask, ref, ref_kl, labels


class FakeModel:
    training = True

    def __init__(self, by_ids):
        self.by_ids = by_ids

    def __call__(self, input_ids, **kw):
        lp = self.by_ids[id(input_ids)]
        z = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool())


def trl_kto(own, kl, mask, ref, ref_kl, labels, loss_type="kto", beta=0.1, dw=1.0, uw=1.0):
    trl = pytest.importorskip("trl")
    ids, kl_ids = torch.zeros_like(mask), torch.ones_like(mask)
    model = FakeModel({id(ids): own, id(kl_ids): kl})
    tr = object.__new__(trl.KTOTrainer)
    tr.__dict__.update(
        model=model, aux_loss_enabled=False, precompute_ref_logps=True, calculate_KL=loss_type == "kto",
        loss_type=loss_type, beta=beta, desirable_weight=dw, undesirable_weight=uw,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                    gather_for_metrics=lambda x: x),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(mask), "completion_mask": mask,
             "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(mask), "KL_completion_mask": mask,
             "label": labels, "ref_logps": ref, "ref_KL_logps": ref_kl}
    loss = trl.KTOTrainer._compute_loss(tr, model, batch, False)
    return loss.item(), {k: v[-1] for k, v in tr._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("seed, dw, uw", [(0, 1.0, 1.0), (1, 1.33, 0.8)])
def test_kto_matches_trl(loss_type, seed, dw, uw):
    own, kl, mask, ref, ref_kl, labels = random_batch(seed)
    want, theirs = trl_kto(own, kl, mask, ref, ref_kl, labels, loss_type, 0.3, dw, uw)
    z0 = kto_kl(kl.sum(1), ref_kl)
    losses, m = kto_loss(own.sum(1), ref, labels, z0, beta=0.3, desirable_weight=dw,
                         undesirable_weight=uw, loss_type=loss_type)
    assert losses.mean().item() == pytest.approx(want, abs=1e-5)
    if loss_type == "kto":
        assert z0.item() > 0 and z0.item() == pytest.approx(theirs["kl"], abs=1e-5)
    d = m["desirable"].bool()
    assert m["rewards"][d].mean().item() == pytest.approx(theirs["rewards/chosen"], abs=1e-5)
    assert m["rewards"][~d].mean().item() == pytest.approx(theirs["rewards/rejected"], abs=1e-5)
    share = m["desirable"].mean().item()
    assert (m["rewards/desirable_sum"].mean().item() / share ==
            pytest.approx(theirs["rewards/chosen"], abs=1e-5))
    assert (m["rewards/undesirable_sum"].mean().item() / (1 - share) ==
            pytest.approx(theirs["rewards/rejected"], abs=1e-5))
    assert m["logps"][d].mean().item() == pytest.approx(theirs["logps/chosen"], abs=1e-5)
    assert torch.all(m["kl"] == z0)          # logged as given (apo_zero_unpaired does not use it)
    assert "delta" not in m                  # BCO's shift is BCO's metric


def test_kto_closed_forms():
    t = torch.tensor
    pol, ref = t([-3.0, -5.0], dtype=torch.float64), t([-3.0, -5.0], dtype=torch.float64)
    labels = t([True, False])
    # policy = reference, z0 = 0: each side is 1 - sigmoid(0) = 1/2, times its weight
    losses, _ = kto_loss(pol, ref, labels, 0.0, desirable_weight=2.0, undesirable_weight=0.5)
    assert losses.tolist() == pytest.approx([1.0, 0.25])
    # r = 1 on the desirable, -1 on the undesirable, z0 = 0.5, beta = 2
    losses, _ = kto_loss(pol + t([1.0, -1.0], dtype=torch.float64), ref, labels, 0.5, beta=2.0)
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert losses.tolist() == pytest.approx([1 - s(2 * 0.5), 1 - s(2 * 1.5)])
    # z0 never goes below 0 and carries no gradient
    p = t([-2.0, -4.0], requires_grad=True)
    z0 = kto_kl(p, t([-1.0, -1.0]))
    assert z0.item() == 0.0 and not z0.requires_grad
    assert kto_kl(t([-1.0, -2.0]), t([-2.0, -2.0])).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        kto_loss(pol, ref, labels, loss_type="bco_pair")


@pytest.mark.parametrize("seed, delta", [(0, 0.0), (1, 0.0), (0, 0.37), (1, -0.52)])
def test_bco_matches_trl_bco_pair_on_the_pairs_split_into_singles(seed, delta):
    """TRL 1.16 has BCO only as DPO's ``bco_pair`` (no shift): the pairs split into singles
    (chosen desirable, rejected undesirable) give twice its mean over 2N examples. A shift
    delta is the same as reference sums raised by delta / beta, which checks it too."""
    from test_losses_dpo_family import N as n_pairs
    from test_losses_dpo_family import random_batch as pair_batch
    from test_losses_dpo_family import trl_loss
    per_token, mask, ref_c, ref_r = pair_batch(seed)
    beta = 0.3
    want, _ = trl_loss(per_token, mask, ref_c + delta / beta, ref_r + delta / beta, ["bco_pair"], beta=beta)
    labels = torch.arange(2 * n_pairs) < n_pairs
    losses, m = kto_loss(per_token.sum(1), torch.cat([ref_c, ref_r]), labels, 0.5, beta=beta,
                         loss_type="bco", delta=delta)
    assert 2 * losses.mean().item() == pytest.approx(want, abs=1e-5)
    assert torch.all(m["delta"] == delta) and torch.all(m["kl"] == 0.5)     # z0 is not BCO's


def test_bco_closed_forms():
    t = torch.tensor
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    pol, ref, labels = t([-2.0, -3.0, -1.0]), t([-3.0, -2.5, -1.0]), t([True, False, False])
    # r = (1, -0.5, 0), beta 2: logits 2 r - delta with delta = 0.5 are 1.5, -1.5, -0.5
    losses, m = kto_loss(pol, ref, labels, beta=2.0, loss_type="bco", delta=0.5,
                         desirable_weight=3.0, undesirable_weight=0.5)
    assert losses.tolist() == pytest.approx([-3 * math.log(s(1.5)), -0.5 * math.log(s(1.5)),
                                             -0.5 * math.log(s(0.5))])
    assert m["rewards"].tolist() == pytest.approx([2.0, -1.0, 0.0])
    # at policy = reference and delta = 0 every example costs log 2
    losses, _ = kto_loss(ref, ref, labels, loss_type="bco")
    assert losses.tolist() == pytest.approx([math.log(2)] * 3)
    # the gradient pushes the desirable reward up and the undesirable one down
    p = pol.clone().requires_grad_(True)
    kto_loss(p, ref, labels, loss_type="bco", delta=0.1)[0].sum().backward()
    assert p.grad[0] < 0 < p.grad[1] and p.grad[2] > 0


def test_bco_delta_is_the_mean_of_every_reward_so_far():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, generator=g) for n in (5, 1, 8, 3)]
    mean, count = 0.0, 0
    for k, b in enumerate(batches, 1):
        mean, count = bco_delta(mean, count, b.mean().item(), len(b))
        seen = torch.cat(batches[:k])
        assert count == len(seen) and mean == pytest.approx(seen.mean().item(), abs=1e-6)
    assert bco_delta(0.0, 0, 0.7, 1) == pytest.approx((0.7, 1))            # the first batch is the mean
    assert bco_delta(0.25, 3, 9.0, 0) == (0.25, 3)                           # an empty batch changes nothing
    assert bco_delta(0.25, 0, 9.0, 0) == (0.25, 0)


def test_kto_defaults_and_float64_reference_point():
    """Defaults beta 0.1, z0 0; a float z0 is taken in the log-probs' dtype (float64 here:
    no float32 rounding of 0.3)."""
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    pol = torch.tensor([-1.0, -6.0], dtype=torch.float64)
    ref = torch.tensor([-3.0, -2.0], dtype=torch.float64)
    labels = torch.tensor([True, False])
    losses, m = kto_loss(pol, ref, labels)
    assert losses.tolist() == pytest.approx([1 - s(0.1 * 2), 1 - s(0.1 * 4)], abs=1e-12)
    losses, m = kto_loss(pol, ref, labels, 0.3)
    assert losses.tolist() == pytest.approx([1 - s(0.1 * 1.7), 1 - s(0.1 * 4.3)], abs=1e-12)
    assert m["kl"].dtype == torch.float64 and m["kl"][0].item() == 0.3


def test_balanced_weights():
    assert balanced_weights(10, 30, None, None) == (3.0, 1.0)
    assert balanced_weights(30, 10, None, None) == (1.0, 3.0)
    assert balanced_weights(10, 30, None, 2.0) == (6.0, 2.0)
    assert balanced_weights(10, 30, 1.5, None) == (1.5, 0.5)
    assert balanced_weights(10, 30, 1.0, 1.0) == (1.0, 1.0)
    assert balanced_weights(1, 3, None, None) == (3.0, 1.0)
    assert balanced_weights(0, 3, None, None) == (3.0, 1.0)     # an empty class counts as one
    assert balanced_weights(3, 1, None, None) == (1.0, 3.0)
    assert balanced_weights(3, 0, None, None) == (1.0, 3.0)


def test_labels_from_rewards():
    rows = [{"prompt_id": p, "sample_index": s, "reward": r} for p, s, r in [
        ("a", 0, 1.0), ("a", 1, 1.0), ("a", 2, 1.0), ("a", 3, 0.0),    # ties with the top: kept out
        ("b", 0, 0.2), ("b", 1, 0.9), ("b", 2, 0.5), ("b", 3, 0.1),
        ("c", 0, 0.3), ("c", 1, 0.3),                                    # no signal: dropped
        ("d", 0, 0.7)]]                                                  # alone: dropped
    got = label_generations(rows, "reward", None, 0.5, "gen")
    assert got == [(0, True), (1, True), (3, False), (4, False), (5, True), (6, True), (7, False)]
    assert label_generations(rows, "reward", 0.5, 0.5, "gen")[:5] == \
        [(0, True), (1, True), (2, True), (3, False), (4, False)]
    rows[2]["reward"] = None
    with pytest.raises(Exception, match=r"gen: row 2, column reward: None"):
        label_generations(rows, "reward", None, 0.5, "gen")


def test_kl_partners_mismatch_every_prompt():
    keys = [f"p{i // 4}" for i in range(40)]
    partner = kl_partners(keys)
    assert all(keys[partner[i]] != keys[i] for i in range(40))
    assert (kl_partners(keys) == partner).all()                 # fixed by the data alone
    with pytest.raises(Exception, match="at least two different prompts"):
        kl_partners(["same"] * 3)


# --------------------------------------------------------------------------- the trainer

def _generations(tmp_path, n=32, stored_ref=False):
    from offline_rlhf.schemas import load_schema
    from offline_rlhf.shards import ShardWriter
    rows = generation_rows(n, k=4)
    for i, r in enumerate(rows):
        r["response_token_ids"] = [(3 * i + j) % 40 + 5 for j in range(2 + i % 4)]
        r["prompt_token_ids"] = [5 + i // 4, 9, 12]
        r["behaviour_logps"] = [-0.5] * len(r["response_token_ids"])
        r["ref_logps"] = None if not stored_ref else [-0.5] * len(r["response_token_ids"])
        r["ref_logps_sum"] = None if not stored_ref else -0.5 * len(r["response_token_ids"])
    path = tmp_path / "gen"
    with ShardWriter(str(path), "generations") as w:
        w.write(0, pa.Table.from_pylist(rows, schema=load_schema("generations").arrow))
        w.finish(total_chunks=1)
    return str(path)


def _args(data, out, policy, *extra):
    return ["train", "kto", "--data", data, "--output", str(out), "--policy", str(policy), "--lr", "1e-3",
            "--batch-size", "8", "--micro-batch-size", "4", "--report-to", "none", "--max-steps", "4", *extra]


def test_cli_trains_kto_on_scored_generations(tmp_path, policy_dir):
    gen = _generations(tmp_path)
    out = tmp_path / "o"
    r = cli(*_args(gen, out, policy_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    data = summary["data"]
    assert data["source"] == "generations" and data["desirable"] == data["undesirable"] == 16
    assert data["ref_logps_computed"] == 32 and data["kl_pairs_computed"] == 32
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 4 and all(math.isfinite(h["loss"]) for h in hist)
    # first step: policy = reference, z0 = 0, balanced weights 1: every loss is 1/2
    assert hist[0]["loss"] == pytest.approx(0.5, abs=1e-4) and hist[0]["kl"] == pytest.approx(0, abs=1e-4)
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["rewards/margins"] > 0
    before = load_file(str(policy_dir / "model.safetensors"))
    after = load_file(str(out / "final" / "model.safetensors"))
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2


def test_stored_reference_is_used_and_threshold_labels(tmp_path, policy_dir):
    from offline_rlhf.train.kto import KTOTrainConfig, train_kto
    gen = _generations(tmp_path, stored_ref=True)
    cfg = KTOTrainConfig(data=gen, output=str(tmp_path / "o"), policy=str(policy_dir), lr=1e-3,
                         batch_size=8, micro_batch_size=8, max_steps=1, report_to="none",
                         desirable_threshold=0.0)
    s = train_kto(cfg)
    data = s["data"]
    assert data["ref_logps_stored"] == 32 and data["ref_logps_computed"] == 0
    # rewards float(i % 7) - 3 >= 0 for i % 7 in 3..6
    n_good = sum(i % 7 >= 3 for i in range(32))
    assert data["desirable"] == n_good
    assert data["undesirable_weight"] == pytest.approx(n_good / (32 - n_good))


def test_cli_trains_on_a_trl_unpaired_file_and_on_pairs(tmp_path, policy_dir, pairs_ds):
    src = tmp_path / "kto.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "completion": f" {i + 1 + (i % 3 > 0)}",
                                       "label": i % 3 == 0}) + "\n" for i in range(24)))
    r = cli(*_args(src, tmp_path / "o", policy_dir, "--max-steps", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "o" / "train_summary.json").read_text())["data"]
    assert data["source"] == "unpaired" and data["desirable"] == 8 and data["desirable_weight"] == 2.0
    r = cli(*_args(pairs_ds, tmp_path / "p", policy_dir, "--max-steps", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "p" / "train_summary.json").read_text())["data"]
    assert data["source"] == "pairs" and data["desirable"] == data["undesirable"] == 48


@pytest.mark.parametrize("row, parts", [
    ({"prompt": "x", "completion": "y", "label": 1}, ("row 1, column label: expected true or false, got 1",)),
    ({"prompt": "", "completion": "y", "label": True}, ("row 1, column prompt: expected non-empty text",)),
    ({"prompt": "x", "label": True}, ("row 1, column completion: expected text, got None",)),
])
def test_bad_unpaired_rows_refused_in_one_line(tmp_path, policy_dir, row, parts):
    src = tmp_path / "kto.jsonl"
    src.write_text(json.dumps({"prompt": "a", "completion": "b", "label": False}) + "\n" + json.dumps(row) + "\n")
    one_error_line(cli(*_args(src, tmp_path / "o", policy_dir)), str(src), *parts)


def test_refusals_in_one_line(tmp_path, policy_dir):
    gen = _generations(tmp_path)
    one_error_line(cli(*_args(gen, tmp_path / "o", policy_dir, "--loss", "orpo")), "loss: must be one of kto")
    one_error_line(cli(*_args(gen, tmp_path / "o", policy_dir, "--group-fraction", "0.7")),
                   "group_fraction: must be in (0, 0.5]")
    src = tmp_path / "kto.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a", "label": True}) + "\n"
                           for i in range(4)))
    one_error_line(cli(*_args(src, tmp_path / "o", policy_dir)), "every labelled example is desirable")
    src.write_text(json.dumps({"prompt": "q", "completion": "a", "label": True}) + "\n")
    one_error_line(cli(*_args(src, tmp_path / "o", policy_dir, "--desirable-threshold", "0")),
                   "desirable_threshold:", "has labels, not rewards")


def test_pipeline_runs_a_kto_stage(tmp_path, policy_dir):
    """`algorithm = "kto"` in a job file is a train stage like any other (ALGORITHMS)."""
    gen = _generations(tmp_path)
    job = tmp_path / "job.toml"
    job.write_text(f'''name = "kto"
workdir = "{tmp_path / 'w'}"
[inputs]
policy = "{policy_dir}"
scored = "{gen}"
[stages.kto]
kind = "train"
algorithm = "kto"
data = "inputs.scored"
policy = "inputs.policy"
max_steps = 1
batch_size = 8
report_to = "none"
''')
    r = cli("pipeline", "run", job)
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = list((tmp_path / "w").rglob("train_summary.json"))
    assert len(summaries) == 1 and json.loads(summaries[0].read_text())["data"]["source"] == "generations"


def test_lora_policy_is_its_own_reference_adapter_off(tmp_path, policy_dir):
    """With LoRA the default reference is the policy's base (adapter off), no second model:
    at the first step the policy equals it, z0 is 0 and every loss is 1/2."""
    from offline_rlhf.train.kto import KTOTrainConfig, train_kto
    cfg = KTOTrainConfig(data=_generations(tmp_path), output=str(tmp_path / "o"), policy=str(policy_dir),
                         lr=1e-2, batch_size=8, micro_batch_size=4, max_steps=3, report_to="none",
                         lora_r=4)
    s = train_kto(cfg)
    assert "adapter off" in s["data"]["reference"]
    assert s["first"]["loss"] == pytest.approx(0.5, abs=1e-5) and s["first"]["kl"] == pytest.approx(0, abs=1e-5)
    assert s["last"]["loss"] < s["first"]["loss"]
    assert (tmp_path / "o" / "adapter" / "adapter_model.safetensors").exists()


def test_bco_trains_with_a_running_shift_and_resumes_it_exactly(tmp_path, policy_dir):
    """`--loss bco`: at the first step (policy = reference, delta 0) every loss is log 2; the
    delta of each step is the mean reward of all the steps before it; a run resumed from
    its step-2 checkpoint continues with that step's delta, as if never stopped."""
    import shutil

    from offline_rlhf.train.kto import KTOTrainConfig, train_kto
    cfg = dict(data=_generations(tmp_path), output=str(tmp_path / "o"), policy=str(policy_dir), lr=1e-2,
               batch_size=8, micro_batch_size=8, max_steps=4, save_steps=2, report_to="none", loss="bco",
               beta=0.5)
    s = train_kto(KTOTrainConfig(**cfg))
    assert s["data"]["ref_logps_computed"] == 32 and s["data"]["kl_pairs_computed"] == 0   # no partners
    hist = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-4) and hist[0]["delta"] == 0
    for k in range(1, 4):
        seen = hist[:k]
        want = sum(h["rewards"] * h["examples"] for h in seen) / sum(h["examples"] for h in seen)
        assert hist[k]["delta"] == pytest.approx(want, abs=1e-6)
    assert hist[3]["delta"] != 0 and hist[-1]["rewards/margins"] > 0
    saved = json.loads((tmp_path / "o" / "bco_delta.json").read_text())
    assert list(saved) == ["2", "4"] and saved["2"][1] == 16
    for done in ("final", "train_summary.json"):
        shutil.rmtree(tmp_path / "o" / done) if done == "final" else (tmp_path / "o" / done).unlink()
    again = train_kto(KTOTrainConfig(**cfg))
    assert again["resumed_from"].endswith("step-0000002") and again["steps_run"] == 2
    for key in ("loss", "delta", "rewards"):
        assert again["last"][key] == pytest.approx(s["last"][key], abs=1e-6), key


def test_unset_beta_is_chosen_by_the_passes_and_recorded(tmp_path, policy_dir, capsys):
    """Six steps of 8 over the few dozen examples of 32 generations are more than one pass,
    so beta 1 (train kto's rule), said on stderr and recorded; the identity keeps it unset."""
    import re

    from offline_rlhf.train.kto import KTOTrainConfig, train_kto
    train_kto(KTOTrainConfig(data=_generations(tmp_path), output=str(tmp_path / "o"), policy=str(policy_dir),
                             lr=1e-3, batch_size=8, micro_batch_size=8, max_steps=6, report_to="none"))
    said = re.search(r"beta (\S+) \(auto: (\S+) passes over (\d+) examples; --beta sets it\)",
                     capsys.readouterr().err)
    assert said and float(said[2]) == pytest.approx(6 / -(-int(said[3]) // 8), abs=0.01) and float(said[2]) > 1
    assert said[1] == "1"
    recorded = json.loads((tmp_path / "o" / "config.json").read_text())
    assert recorded["config"]["beta"] == 1.0 and recorded["identity"]["beta"] is None
