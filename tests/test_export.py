"""`offline-rlhf export`: training checkpoints become model directories, through the CLI;
`eval --checkpoints` takes them and labels every model."""

import json
import shutil

import pytest
import torch
from cli_helpers import cli, one_error_line
from safetensors.torch import load_file, save_file

from offline_rlhf.evaluate import model_labels

SMALL = ["--batch-size", "8", "--report-to", "none", "--schedule", "constant", "--quiet"]


def sft_file(directory):
    path = directory / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Copy: {i} {i + 1} =>", "completion": f" {i} {i + 1}"})
                            + "\n" for i in range(24)))
    return path


def train(*args):
    out = cli("train", *args, *SMALL)
    assert out.returncode == 0, out.stderr[-3000:]


def weights(directory):
    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, policy_dir):
    """Run A: 4 steps, a checkpoint at step 2. Run B: the same command stopped at step 2
    (constant schedule: the first two steps are the same), so B's final/ is A's step 2."""
    d = tmp_path_factory.mktemp("sft")
    data = sft_file(d)
    common = ["sft", "--data", data, "--policy", policy_dir, "--lr", "1e-3"]
    train(*common, "--output", d / "a", "--max-steps", "4", "--save-steps", "2")
    train(*common, "--output", d / "b", "--max-steps", "2")
    return d


def test_export_full_fine_tuning_is_the_model_at_that_step(sft_runs, policy_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    ckpt = sft_runs / "a" / "checkpoints" / "step-0000002"
    out = cli("export", ckpt, tmp_path / "m")
    assert out.returncode == 0, out.stderr
    assert "step 2" in out.stdout
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), use_safetensors=True)
    trained = load_file(str(ckpt / "trainable.safetensors"))
    state = model.state_dict()
    assert set(trained) <= set(state)
    assert all(torch.equal(state[n], t) for n, t in trained.items())
    base, final = weights(policy_dir), weights(sft_runs / "b" / "final")
    exported = weights(tmp_path / "m")
    assert set(exported) == set(final)
    assert all(torch.equal(exported[n], final[n]) for n in final)          # B's final/ exactly
    assert any(not torch.equal(exported[n], base[n]) for n in base)        # and not the base
    record = json.loads((tmp_path / "m" / "export.json").read_text())
    assert record["step"] == 2 and record["algorithm"] == "sft" and not record["lora"]
    assert (tmp_path / "m" / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]                   # no temporary left


def test_export_refusals_in_one_line(sft_runs, tmp_path):
    from offline_rlhf.tiny import build_tiny_model
    ckpt = sft_runs / "a" / "checkpoints" / "step-0000002"
    one_error_line(cli("export", sft_runs / "a", tmp_path / "x"), "not a training checkpoint")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    one_error_line(cli("export", ckpt, tmp_path / "full"), "not empty", "--overwrite")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    one_error_line(cli("export", ckpt, ckpt / "model"), "collides with the checkpoint")

    def planted(name, **changes):
        """A copy of the checkpoint with ``changes`` to its state (and no recorded base
        fingerprint unless given one)."""
        copy = tmp_path / name / "step-0000002"
        shutil.copytree(ckpt, copy)
        state = json.loads((copy / "state.json").read_text())
        for holder in (state, state.get("identity") or {}, state["config"]):
            holder.pop("policy_fingerprint", None)
        (state.get("identity") or {}).pop("policy", None)   # the identity's fingerprint too
        state["config"].update(changes.pop("config", {}))
        state.update(changes)
        (copy / "state.json").write_text(json.dumps(state))
        return copy
    one_error_line(cli("export", planted("moved", config={"policy": str(tmp_path / "gone")}),
                       tmp_path / "x"), "base policy", "not found", "--policy")
    other = build_tiny_model(tmp_path / "wide", hidden=32, seed=1)
    # recorded in the run's identity: the base is checked by its fingerprint
    one_error_line(cli("export", ckpt, tmp_path / "x", "--policy", other),
                   "is not the one this run trained", "--policy")
    one_error_line(cli("export", planted("other"), tmp_path / "x", "--policy", other),
                   "do not fit the base policy", "first differing parameter")
    one_error_line(cli("export", planted("fp", policy_fingerprint="0" * 64), tmp_path / "x"),
                   "not the one this run trained", "fingerprint")
    broken = planted("broken")
    (broken / "trainable.safetensors").unlink()
    one_error_line(cli("export", broken, tmp_path / "x"), "incomplete checkpoint", "trainable.safetensors")
    assert not (tmp_path / "x").exists()
    # an existing export is replaced only when asked
    assert cli("export", ckpt, tmp_path / "full", "--overwrite").returncode == 0
    assert not (tmp_path / "full" / "keep.txt").exists() and (tmp_path / "full" / "export.json").exists()


def test_export_lora_writes_adapter_and_merged_model(tmp_path, policy_dir):
    """The merged weight is W + (alpha / r) B A of the checkpoint's factors, and the merged
    model computes what the base with the exported adapter computes."""
    import peft
    from transformers import AutoModelForCausalLM
    train("sft", "--data", sft_file(tmp_path), "--policy", policy_dir, "--output", tmp_path / "o",
          "--lr", "1e-2", "--lora-r", "4", "--lora-alpha", "8", "--max-steps", "2", "--save-steps", "1")
    ckpt = tmp_path / "o" / "checkpoints" / "step-0000001"
    out = cli("export", ckpt, tmp_path / "m")
    assert out.returncode == 0, out.stderr
    assert "LoRA merged" in out.stdout
    trained = load_file(str(ckpt / "trainable.safetensors"))
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = trained[f"{name}.lora_A.default.weight"], trained[f"{name}.lora_B.default.weight"]
    assert b.abs().sum() > 0
    w = weights(policy_dir)["model.layers.0.self_attn.q_proj.weight"]
    merged = weights(tmp_path / "m")["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(merged, w + (8 / 4) * b @ a, rtol=0, atol=1e-6)
    adapter_cfg = json.loads((tmp_path / "m" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(policy_dir.resolve())
    ids = torch.tensor([[5, 17, 33, 8, 90, 41]])
    base = AutoModelForCausalLM.from_pretrained(str(policy_dir), use_safetensors=True)
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(base, str(tmp_path / "m" / "adapter")).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), use_safetensors=True)(ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_export_reward_model_is_what_score_loads(tmp_path, policy_dir):
    from offline_rlhf.models import load_reward_model
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "chosen": f" {i + 1}",
                                         "rejected": f" {i} maybe"}) + "\n" for i in range(16)))
    train("rm", "--data", prefs, "--policy", policy_dir, "--output", tmp_path / "o", "--lr", "1e-3",
          "--eval-fraction", "0", "--max-steps", "2", "--save-steps", "1")
    ckpt = tmp_path / "o" / "checkpoints" / "step-0000001"
    assert cli("export", ckpt, tmp_path / "m").returncode == 0
    model = load_reward_model(tmp_path / "m", dtype="float32", device="cpu")
    assert model.config.num_labels == 1
    assert torch.equal(model.score.weight, load_file(str(ckpt / "trainable.safetensors"))["score.weight"])


def test_rm_training_refuses_a_two_label_model_in_one_line(tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification

    from offline_rlhf.tiny import tiny_config
    cfg = tiny_config(tokenizer)
    cfg.num_labels = 2
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "rm2")
    tokenizer.save_pretrained(tmp_path / "rm2")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}) + "\n")
    out = cli("train", "rm", "--data", prefs, "--policy", tmp_path / "rm2", "--output", tmp_path / "o",
              "--report-to", "none")
    one_error_line(out, str(tmp_path / "rm2"), "2 labels", "exactly one")
    assert not (tmp_path / "o").exists()


def test_eval_takes_a_checkpoint_and_labels_every_model(sft_runs, policy_dir, tmp_path):
    """The checkpoint is exported under the eval output and evaluated; it is the same
    model as run B's final/, so its greedy rewards are the policy's."""
    heldout = tmp_path / "h.jsonl"
    heldout.write_text("".join(json.dumps({"prompt": f"Copy: {i} {i + 1} =>",
                                           "reference_answer": f"{i} {i + 1}"}) + "\n" for i in range(4)))
    ckpt = sft_runs / "a" / "checkpoints" / "step-0000002"
    args = ["eval", "--policy", sft_runs / "b" / "final", "--baseline", policy_dir,
            "--checkpoints", ckpt, "--prompts", heldout, "--weights", "exact_match=1",
            "length_penalty=0.1", "--max-new-tokens", "4", "--output", tmp_path / "e", "--quiet"]
    out = cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "e" / "results.json").read_text())
    (c,) = r["checkpoints"]
    assert c["label"] == "step-0000002" and c["checkpoint"] == str(ckpt)
    assert json.loads((tmp_path / "e" / "checkpoint-0" / "model" / "export.json").read_text())["step"] == 2
    assert r["policy"]["label"] == "policy" and r["baseline"]["label"] == "baseline"
    assert c["reward_mean"] == r["policy"]["reward_mean"] and "rewards" not in c
    report = (tmp_path / "e" / "report.md").read_text()
    assert "| | baseline | step-0000002 | policy |" in report
    assert f"- step-0000002: `{tmp_path / 'e' / 'checkpoint-0' / 'model'}`" in report

    # another checkpoint in the same place: exported again, its responses not the old ones
    from offline_rlhf.shards import open_dataset
    scored = str(tmp_path / "e" / "checkpoint-0" / "scored")
    before = open_dataset(scored).read(columns=["response_token_ids"]).column(0).to_pylist()
    other = tmp_path / "other" / "step-0000002"
    shutil.copytree(ckpt, other)
    trained = load_file(str(other / "trainable.safetensors"))
    save_file({n: t.flip(0).contiguous() for n, t in trained.items()}, str(other / "trainable.safetensors"))
    args[args.index(ckpt)] = other
    # the same OUTPUT with another checkpoint is refused, naming it; --overwrite starts afresh
    one_error_line(cli(*args), "checkpoints:", "--overwrite")
    out = cli(*args, "--overwrite")
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "e" / "checkpoint-0" / "model" / "export.json").read_text())
    assert record["checkpoint"] == str(other)
    after = open_dataset(scored).read(columns=["response_token_ids"]).column(0).to_pylist()
    assert after != before


def test_model_labels_are_directory_names_made_distinct(tmp_path):
    paths = [tmp_path / "a" / "checkpoints" / "step-0000002", tmp_path / "b" / "checkpoints" / "step-0000002",
             tmp_path / "a" / "checkpoints" / "step-0000004", tmp_path / "x" / "policy"]
    labels = model_labels([str(p) for p in paths] + [str(paths[2])])
    assert labels == ["a/checkpoints/step-0000002", "b/checkpoints/step-0000002", "step-0000004",
                      "x/policy", "step-0000004 #2"]


def test_export_ilql_saves_heads_beside_the_policy(tmp_path, policy_dir):
    """The policy with its V/Q heads as `generate --ilql-heads` loads them: a checkpoint
    holds the whole heads state (the target Q heads too, which decoding uses), and the
    exported heads are exactly the checkpoint's. A heads file without them is refused."""
    import pyarrow as pa
    from conftest import generation_rows

    from offline_rlhf.ilql import load_heads
    from offline_rlhf.schemas import load_schema
    from offline_rlhf.shards import ShardWriter
    with ShardWriter(str(tmp_path / "g"), "generations") as w:
        w.write(0, pa.Table.from_pylist(generation_rows(16), schema=load_schema("generations").arrow))
        w.finish(total_chunks=1)
    train("ilql", "--data", tmp_path / "g", "--policy", policy_dir, "--output", tmp_path / "o",
          "--lr", "1e-3", "--max-steps", "2", "--save-steps", "1")
    ckpt = tmp_path / "o" / "checkpoints" / "step-0000001"
    extras = load_file(str(ckpt / "extras.safetensors"))
    assert any(k.startswith("target_") for k in extras)
    out = cli("export", ckpt, tmp_path / "m")
    assert out.returncode == 0, out.stderr
    want = load_file(str(ckpt / "extras.safetensors"))
    heads = load_heads(tmp_path / "m")
    assert set(heads.state_dict()) == set(want)
    assert all(torch.equal(heads.state_dict()[k], v) for k, v in want.items())
    trained = load_file(str(ckpt / "trainable.safetensors"))
    assert all(torch.equal(weights(tmp_path / "m")[n], t) for n, t in trained.items())
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    save_file({k: v for k, v in extras.items() if not k.startswith("target_")},
              str(bad / "extras.safetensors"))
    one_error_line(cli("export", bad, tmp_path / "x"), "target Q heads")


def test_report_labels_every_model_in_table_and_plots(tmp_path, monkeypatch):
    import matplotlib.figure

    from offline_rlhf.evaluate import write_report
    figs = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: (figs.append(self), save(self, *a, **k))[1])

    def model(label, reward, kl):
        return {"label": label, "model": f"/m/{label}", "reward_mean": reward, "reward_stderr": 0.1,
                "reward_std": 0.3, "kl_to_reference": kl, "kl_stderr": 0.01, "kl_note": "k3",
                "response_tokens_mean": 4.0, "samples": 3, "components": {"exact_match": reward},
                "rewards": [reward] * 3}
    results = {"policy": model("policy", 0.9, 0.5), "baseline": model("baseline", 0.1, 0.0),
               "checkpoints": [model("a/step-0000002", 0.4, 0.2), model("b/step-0000002", 0.6, 0.3)]}
    write_report(results, tmp_path, [])
    labels = ["baseline", "a/step-0000002", "b/step-0000002", "policy"]
    report = (tmp_path / "report.md").read_text()
    assert "| | " + " | ".join(labels) + " |" in report
    assert "| exact_match | 0.1 | 0.4 | 0.6 | 0.9 |" in report
    hist, kl = figs
    assert [t.get_text().split(" (n=")[0] for t in hist.legends[0].get_texts()] == labels
    assert [t.get_text() for t in kl.legends[0].get_texts()] == labels
    assert [t.get_text() for t in kl.axes[0].texts] == labels        # beside each point too


def test_pipeline_eval_stage_takes_a_checkpoint_and_dry_run_checks_it(sft_runs, tmp_path):
    ckpt = sft_runs / "a" / "checkpoints" / "step-0000002"
    broken = tmp_path / "broken" / "step-0000002"
    shutil.copytree(ckpt, broken)
    state = json.loads((broken / "state.json").read_text())
    state["config"]["policy"] = str(tmp_path / "gone")
    (broken / "state.json").write_text(json.dumps(state))
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Copy: 1 2 =>"}) + "\n")
    for name, checkpoint in (("ok", ckpt), ("bad", broken)):
        job = tmp_path / f"{name}.toml"
        job.write_text(f'workdir = "{tmp_path / name}"\n[stages.ev]\nkind = "eval"\n'
                       f'policy = "{sft_runs / "b" / "final"}"\nprompts = "{tmp_path / "p.jsonl"}"\n'
                       f'checkpoints = ["{checkpoint}"]\nweights = {{ length_penalty = 1.0 }}\n')
        out = cli("pipeline", "run", job, "--dry-run")
        if name == "ok":
            assert out.returncode == 0, out.stderr[-2000:]
        else:
            one_error_line(out, f"{job}: stages.ev.checkpoints: {broken}: {tmp_path / 'gone'}: base "
                           "policy directory not found")
