import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_task_inputs, kill_when

from offline_rlhf.errors import InputError
from offline_rlhf.nights import NightsConfig, NightsPlan, load_plan, night_overrides, run_nights

JOB = """
name = "nights"
workdir = "{work}"
[nights]
count = 2
previous = 1
reference_refresh = {refresh}
[inputs]
policy = "{policy}"
reward_model = "{rm}"
prompts = "{prompts}"
heldout = "{heldout}"
[stages.generate]
kind = "generate"
prompts = "inputs.prompts"
policy = "inputs.policy"
num_samples = 4
max_new_tokens = 6
seed = 5
[stages.score]
kind = "score"
generations = "stages.generate"
reward_model = "inputs.reward_model"
weights = {{ reward_model = 1.0 }}
[stages.logprobs]
kind = "logprobs"
generations = "stages.score"
reference = "inputs.policy"
[stages.train]
kind = "train"
algorithm = "{algorithm}"
data = "stages.logprobs"
policy = "inputs.policy"
lr = 1e-3
max_steps = 8
batch_size = 8
micro_batch_size = 4
save_steps = 2
kl_coef = 0.05
report_to = "none"
[stages.eval]
kind = "eval"
policy = "stages.train"
baseline = "inputs.policy"
prompts = "inputs.heldout"
reward_model = "inputs.reward_model"
weights = {{ reward_model = 1.0 }}
max_new_tokens = 6
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, policy_dir, reward_dir):
    return copy_task_inputs(tmp_path_factory.mktemp("nights_inputs"), policy_dir, reward_dir, 8, 4)


def job(tmp_path, inputs, refresh=1, algorithm="grpo", name="job"):
    f = tmp_path / f"{name}.toml"
    f.write_text(JOB.format(work=tmp_path / name, refresh=refresh, algorithm=algorithm, **inputs))
    return str(f)


def test_reference_refresh_and_previous_data_per_night():
    pl = NightsPlan(NightsConfig(count=6, previous=2, reference_refresh=0), Path("w"), "train", "train",
                    "logprobs", ["logprobs"], {"generate": 3})
    policies, data = [f"pol{i}" for i in range(6)], [f"data{i}" for i in range(5)]
    fixed = night_overrides(pl, 4, policies, data, {"logprobs": "pol0"})
    assert f"workdir={Path('w') / 'night-004'}" in fixed and "inputs.policy=pol4" in fixed
    assert "stages.logprobs.reference=pol0" in fixed and "stages.generate.seed=7" in fixed
    assert 'stages.train.previous_data=["data2", "data3"]' in fixed
    every2 = NightsPlan(NightsConfig(reference_refresh=2, previous=0), Path("w"), "train", "train",
                        None, ["logprobs"], {})
    refs = [next(x for x in night_overrides(every2, n, policies, data, {"logprobs": "ref0"})
                 if x.startswith("stages.logprobs")) for n in range(1, 6)]
    assert refs == [f"stages.logprobs.reference={x}" for x in ("ref0", "pol2", "pol2", "pol4", "pol4")]
    assert not any("previous_data" in x for x in night_overrides(every2, 3, policies, data, {"logprobs": "r"}))
    assert night_overrides(pl, 0, policies, data, {}) == [f"workdir={Path('w') / 'night-000'}"]


def test_bad_nights_tables_are_refused(tmp_path, inputs):
    with pytest.raises(InputError, match=r"nights.previous: only `train grpo` reads earlier nights' data"):
        load_plan(job(tmp_path, inputs, algorithm="dpo"))
    with pytest.raises(InputError, match=r"nights.policy_input: 'model' is not defined in \[inputs\]"):
        load_plan(job(tmp_path, inputs), ["nights.policy_input=model"])
    with pytest.raises(InputError, match=r"nights.countt: unknown key"):
        load_plan(job(tmp_path, inputs), ["nights.countt=3"])
    for override, message in (("nights.drift_stage=eval", "nights.drift_stage: 'eval' decodes greedily"),
                              ("nights.guard.kl_max=1", "nights.guard.kl_max: needs an eval stage that samples"),
                              ("nights.curate=informative", "nights.curate: needs nights.prompts_per_night"),
                              ("nights.guard.stage=score", "nights.guard.stage: 'score' is not an eval stage"),
                              ("nights.replay_fraction=0.1", "nights.replay_input: 'replay' is not defined"),
                              ("nights.guard.patience=-1", "nights.guard.patience: must be >= 0")):
        with pytest.raises(InputError, match=message):
            load_plan(job(tmp_path, inputs), [override])


def test_dry_run_plans_night_zero_and_waits_for_its_policy(tmp_path, inputs):
    records = run_nights(job(tmp_path, inputs), dry_run=True)
    assert [r["action"] for r in records[0]["stages"]] == ["run"] * 5
    assert records[1] == {"night": 1, "pending": "needs night-000's policy"}
    assert not (tmp_path / "job").exists()


def test_killed_nights_run_resumes_and_keeps_every_nights_lineage(tmp_path, inputs):
    f = job(tmp_path, inputs, refresh=1)
    work = tmp_path / "job"
    cli = [sys.executable, "-m", "offline_rlhf.cli", "pipeline", "run", f]
    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_when(proc, lambda: any((work / "night-001" / "stages").glob("train-*/checkpoints/step-0000004/state.json")),
              timeout=600)
    assert not list((work / "night-001" / "stages").glob("eval-*/results.json"))
    out = subprocess.run(cli, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from" in out.stdout + out.stderr
    for n in (0, 1):   # issue 27: each night's eval table (before/after, KL) and report path
        shown = out.stdout[out.stdout.index(f"night {n} eval:"):]
        assert "KL to ref" in shown and "baseline" in shown and "report: " in shown
    log0 = (work / "night-000" / "run.log").read_text()
    assert log0.count("run generate") == 1 and log0.count("reuse ") == 5   # night 0 was not redone
    records = json.loads((work / "nights.json").read_text())
    n0, n1 = records
    assert n1["policy_in"] == n0["policy_out"] and n1["policy_in_fingerprint"] == n0["policy_out_fingerprint"]
    assert n0["policy_in"] == str(inputs["policy"]) and n0["policy_out"].endswith("/final")
    assert n0["reference"] == {"logprobs": str(inputs["policy"])}
    assert n1["reference"] == {"logprobs": n1["policy_in"]}               # refreshed every night
    assert n1["previous_data"] == [n0["data"]] and n0["previous_data"] == []
    assert n0["train"]["data"]["sources"] == 1 and n1["train"]["data"]["sources"] == 2
    assert n1["train"]["first"]["staleness_kl"] > n0["train"]["first"]["staleness_kl"]  # night 0's data is stale
    for r in records:
        assert r["evals"]["eval"]["policy_reward"] is not None and Path(r["evals"]["eval"]["report"]).exists()
        assert Path(r["policy_out"], "model.safetensors").exists() and Path(r["data"]).exists()
    resolved = json.loads((work / "night-001" / "pipeline.resolved.json").read_text())
    assert resolved["stages"]["generate"]["seed"] == 6                    # fresh samples each night
    assert "| 1 |" in (work / "nights.md").read_text()
    again = run_nights(f)                                                 # nothing left to do
    assert all(x["action"] == "reuse" for r in again for x in r["stages"])


GUARDED = JOB.replace("previous = 1\n", "previous = 0\nprompts_per_night = 3\nseed = 7\nreplay_fraction = 0.25\n").replace(
    'heldout = "{heldout}"\n', 'heldout = "{heldout}"\nreplay = "{replay}"\n').replace(
    "reference_refresh = {refresh}\n", "reference_refresh = {refresh}\n[nights.guard]\nkl_max = {kl_max}\n").replace(
    "max_steps = 8", "max_steps = 2").replace("save_steps = 2", "save_steps = 10") + """
[stages.eval_sampled]
kind = "eval"
policy = "stages.train"
baseline = "inputs.policy"
prompts = "inputs.heldout"
reward_model = "inputs.reward_model"
weights = {{ reward_model = 1.0 }}
max_new_tokens = 6
greedy = false
num_samples = 2
temperature = 1.0
"""


def test_guarded_nights_draw_keep_history_and_fall_back_to_the_best(tmp_path, inputs, monkeypatch):
    """Nights of 3 prompts from a pool of 8; night 1 trains with a huge lr (forced to regress):
    it is not promoted, night 2 (planned) starts from night 0's policy, best/ is night 0's."""
    import offline_rlhf.nights as nights
    from offline_rlhf.models import fingerprint
    from offline_rlhf.shards import open_dataset
    plain = nights.night_overrides
    monkeypatch.setattr(nights, "night_overrides", lambda pl, n, *a: plain(pl, n, *a) + (
        ["stages.train.lr=0.1"] if n == 1 else []))
    f = tmp_path / "guarded.toml"
    replay = tmp_path / "human.jsonl"
    replay.write_text("".join(json.dumps({"prompt": f"copy {i}{i}", "completion": f" {i}{i}"}) + "\n"
                              for i in range(3)))
    f.write_text(GUARDED.format(work=tmp_path / "g", refresh=0, algorithm="grpo", kl_max=0.5,
                                replay=replay, **inputs))
    n0, n1 = run_nights(str(f), count=2)
    n2 = run_nights(str(f), count=3, dry_run=True)[2]    # night 2 is planned, not run
    records, work = [n0, n1, n2], tmp_path / "g"
    # the draw: disjoint until the pool of 8 is used up, then a new pass; recorded and fed to generate
    ids = [r["draw"]["prompt_ids"] for r in records]
    assert len(set(ids[0]) | set(ids[1])) == 6 and n2["draw"]["replayed"] == 1
    assert set(ids[0] + ids[1] + ids[2]) == set(open_dataset(str(inputs["prompts"])).read(
        columns=["prompt_id"]).column("prompt_id").to_pylist())
    for r, drawn in zip(records[:2], ids):
        gen = open_dataset(r["data"]).read(columns=["prompt_id", "reward"])
        assert set(gen.column("prompt_id").to_pylist()) == set(drawn)
        # the history's figures are the night's own scores
        hist = open_dataset(r["history"]["history"]).read().to_pylist()
        by = {}
        for pid, rew in zip(gen.column("prompt_id").to_pylist(), gen.column("reward").to_pylist()):
            by.setdefault(pid, []).append(rew)
        assert {h["prompt_id"]: (h["samples"], h["reward_mean"], h["informative"]) for h in hist} == {
            p: (len(v), pytest.approx(sum(v) / len(v)), max(v) > min(v)) for p, v in by.items()}
    # replay: 12 sampled examples + 4 human rows = 25% of the trained examples (one epoch of 2 steps)
    assert n0["train"]["data"]["examples"] == 12 and n0["train"]["data"]["replay_examples"] == 4
    steps = [json.loads(x) for x in (Path(n0["policy_out"]).parent / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in steps if "replay_fraction" in x]
    assert len(steps) == 2 and sum(x["replay_fraction"] for x in steps) / 2 == pytest.approx(0.25)
    assert all(x["replay_nll"] > 0 for x in steps if x["replay_fraction"] > 0), steps
    # two eval stages kept by name, greedy and sampled
    assert n0["evals"]["eval"]["decoding"] == "greedy" and n0["evals"]["eval"]["responses"] == 4
    assert n0["evals"]["eval_sampled"]["decoding"] == "sampled"
    assert n0["evals"]["eval_sampled"]["samples_per_prompt"] == 2 and n0["evals"]["eval_sampled"]["responses"] == 8
    assert n0["drift"]["responses"] == 8 and 0 < n0["drift"]["distinct_1"] <= 1
    # the guard: night 1 regressed (KL to the start far above the bound), night 2 starts from night 0
    assert n0["guard"]["promoted"] and n0["drift"]["kl"] < 0.5 < n1["drift"]["kl"]
    assert not n1["guard"]["promoted"] and "kl_max" in n1["guard"]["message"]
    assert n2["policy_in"] == n0["policy_out"] and n2["stages"][0]["action"] == "run"
    assert fingerprint(work / "best") == n0["policy_out_fingerprint"]
    assert json.loads((work / "best.json").read_text())["night"] == 0
    # each night's baseline is the previous night's policy: its figures are reused, not remade
    for e in ("eval", "eval_sampled"):
        assert n1["evals"][e]["baseline_reused_from"] == str(Path(n0["evals"][e]["report"]).parent)
        assert n1["evals"][e]["baseline_reward"] == n0["evals"][e]["policy_reward"]
    md = (work / "nights.md").read_text()
    assert "night 1: not promoted" in md and "eval_sampled" in md and (work / "nights.png").stat().st_size > 0
    # patience 1: the failed night stops the run, exit status 1, night 2 never runs (nights 0-1 reused)
    from offline_rlhf.cli import main
    assert main(["pipeline", "run", str(f), "--nights", "3", "nights.guard.patience=1"]) == 1
    assert "stopped after night 1" in (work / "nights.md").read_text() and not (work / "night-002").exists()


def test_plain_draws_are_disjoint_until_the_pool_is_used_up_and_depend_on_seed_and_night_only():
    from offline_rlhf.nights_draw import plain_draws
    ids = [f"p{i}" for i in range(10)]
    draws = plain_draws(ids, 4, seed=3, nights=5)
    assert draws[:2] == plain_draws(ids, 4, seed=3, nights=2)           # night n: (seed, n) only
    assert len(set(draws[0] + draws[1])) == 8 and set(draws[0] + draws[1] + draws[2][:2]) == set(ids)
    assert all(len(set(d)) == 4 for d in draws)                           # no prompt twice a night
    assert set(draws[2] + draws[3] + draws[4][:2]) == set(ids)            # the second pass
    assert plain_draws(ids, 4, seed=4, nights=1) != draws[:1]
    with pytest.raises(InputError, match="nights.prompts_per_night: 11 is more than the pool's 10"):
        plain_draws(ids, 11, 0, 1)


def test_curated_draw_prefers_unseen_and_informative_and_skips_settled_prompts():
    from offline_rlhf.nights_draw import curated_draw
    ids = [f"p{i}" for i in range(8)]
    history = {"p0": [(0, False), (1, False)],     # settled: skipped
               "p1": [(0, True), (1, False)],      # last uninformative, once: last class
               "p2": [(1, True)],                  # last informative: first class
               "p3": [(0, False)]}                 # uninformative once (skip_after 2): last class
    draw, counts = curated_draw(ids, 5, 0, 2, history, skip_after=2)
    assert set(draw) == {"p2", "p4", "p5", "p6", "p7"}
    assert counts == {"skipped": 1, "replayed": 1, "unseen": 4}
    draw, counts = curated_draw(ids, 7, 0, 2, history, skip_after=2)
    assert set(draw) == set(ids) - {"p0"} and counts["replayed"] == 3
    draw, counts = curated_draw(ids, 8, 0, 2, history, skip_after=2)   # too few left: p0 fills
    assert draw[-1] == "p0" and counts["skipped"] == 0
    draw, _ = curated_draw(ids, 4, 0, 2, history, skip_after=1)
    assert not {"p0", "p1", "p3"} & set(draw)
    # fill = false: a night draws only what is not skipped, fewer than asked when fewer remain
    draw, counts = curated_draw(ids, 8, 0, 2, history, skip_after=2, fill=False)
    assert set(draw) == set(ids) - {"p0"} and counts["skipped"] == 1
    draw, counts = curated_draw(ids, 8, 0, 2, history, skip_after=1, fill=False)
    assert set(draw) == {"p2", "p4", "p5", "p6", "p7"} and counts["skipped"] == 3
    settled = {i: [(0, False)] for i in ids}               # nothing left: the skipped ones retested
    draw, counts = curated_draw(ids, 3, 0, 1, settled, skip_after=1, fill=False)
    assert len(draw) == 3 and counts == {"skipped": 5, "replayed": 3, "unseen": 0}


@pytest.mark.parametrize("name", ["nightly_grpo.toml", "nightly_grpo_small.toml"])
def test_shipped_nights_jobs_plan(tmp_path, inputs, name):
    root = Path(__file__).resolve().parents[1]
    ov = [f"inputs.{k}={v}" for k, v in (("policy", inputs["policy"]), ("prompts", inputs["prompts"]),
                                         ("heldout", inputs["heldout"]))] + [f"workdir={tmp_path}"]
    pl = load_plan(str(root / "pipelines" / name), ov)
    assert pl.guard_stage == "eval" and pl.train_stage == "train"
    if name == "nightly_grpo_small.toml":
        assert pl.cfg.curate == "informative" and pl.cfg.prompts_per_night == 500
        assert pl.drift_stage == "eval_sampled" and pl.reuse_baseline == ["eval", "eval_sampled"]
        assert pl.cfg.guard.patience == 3 and pl.cfg.guard.reward_margin == 0.01
