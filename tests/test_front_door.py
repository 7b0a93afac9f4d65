"""Issue 13: the first hour works. Model paths, --config for every command, checks
before work, trackers, the console, prompt import, help and docs; through the CLI as a
user runs it (``cli.main``, or a subprocess where exit status, stderr and time matter)."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from offline_rlhf import cli
from offline_rlhf.shards import open_dataset

ROOT = Path(__file__).resolve().parents[1]


# set by an in-process cli.main() of another test: a subprocess must show what the CLI
# does by itself, so none of them is inherited
CONSOLE_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TQDM_DISABLE")


def run_cli(*args, env=None, timeout=300):
    env = {k: v for k, v in (os.environ if env is None else env).items() if k not in CONSOLE_ENV}
    return subprocess.run([sys.executable, "-m", "offline_rlhf.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def leaf_commands(parser=None, prefix=()):
    """(command words, parser) of every runnable command of the CLI."""
    import argparse
    parser = parser or cli.build_parser()
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += leaf_commands(sub, prefix + (name,))
    return out or [(prefix, parser)]


def config_class(words):
    from offline_rlhf.train import ALGORITHMS
    if words[0] == "train":
        return ALGORITHMS[words[1]][0]
    if words[0] == "pipeline":
        return cli.PipelineRunConfig
    return next(c[1] for c in cli._commands() if c[0] == words[0])


# --------------------------------------------------------------------------- item 2: model paths

def test_mistyped_model_path_fails_fast_in_every_command(tmp_path):
    """Every option that names a model, in every command: exit 2, one line, under 2 s,
    with a hub reachable in principle (HF_HUB_OFFLINE unset)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    typo = tmp_path / "modles" / "policy"
    cases = []
    for words, parser in leaf_commands():
        for action in parser._actions:
            if action.dest in cli.MODEL_OPTIONS and action.option_strings:
                cases.append([*words, action.option_strings[0], typo])
        fields = {f.name for f in dataclasses.fields(config_class(words))}
        for name in sorted(fields & set(cli.MODEL_OPTIONS))[:1]:   # the same, from --config
            f = tmp_path / f"{'-'.join(words)}.yaml"
            f.write_text(yaml.safe_dump({name: [str(typo)] if name == "checkpoints" else str(typo)}))
            cases.append([*words, "--config", f])
    commands = {tuple(c[:2]) if c[0] in ("train", "pipeline") else (c[0],) for c in cases}
    assert commands >= {("generate",), ("score",), ("logprobs",), ("import-pairs",), ("rest",),
                        ("eval",), ("validate",), ("train", "dpo"), ("train", "rm"),
                        ("train", "sft"), ("train", "ilql")}
    for args in cases:
        t0 = time.perf_counter()
        out = run_cli(*args, env=env)
        seconds = time.perf_counter() - t0
        assert out.returncode == 2, (args, out.stderr[-2000:])
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, (args, out.stderr)
        assert f"{typo}: " in out.stderr and "directory not found" in out.stderr, out.stderr
        assert seconds < 2.0, (args, seconds)


def test_library_loads_check_model_directories_too(tmp_path, policy_dir):
    """The loaders check as well (pipelines and Python callers do not go through the CLI)."""
    from offline_rlhf.errors import InputError
    from offline_rlhf.evaluate import EvalConfig, run_eval
    from offline_rlhf.pairs import import_pairs
    from offline_rlhf.train.rm import RMTrainConfig, train_rm
    from offline_rlhf.train.sft import SFTTrainConfig, train_sft
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b", "chosen": " b",
                                               "rejected": " c"}])
    typo = str(tmp_path / "nope")
    with pytest.raises(InputError, match="nope: policy directory not found"):
        train_sft(SFTTrainConfig(data=str(data), output=str(tmp_path / "o"), policy=typo))
    with pytest.raises(InputError, match="nope: policy directory not found"):
        train_rm(RMTrainConfig(data=str(data), output=str(tmp_path / "o"), policy=typo))
    with pytest.raises(InputError, match="nope: tokenizer directory not found"):
        import_pairs(str(data), str(tmp_path / "p"), typo)
    with pytest.raises(InputError, match="nope: baseline directory not found"):
        run_eval(EvalConfig(policy=str(policy_dir), prompts=str(data), output=str(tmp_path / "e"),
                            baseline=typo, weights={"length_penalty": 1.0}))
    assert not (tmp_path / "e").exists()


# --------------------------------------------------------------------------- item 3: --config

def test_every_command_runs_from_a_config_file(tmp_path, policy_dir, reward_dir, capsys):
    """Each command given only --config FILE holding all its required keys (positional
    ones too); each prints the output it wrote (from the resolved config)."""
    ran = set()

    def run(words, **keys):
        cls = config_class(words)
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        assert required <= set(keys), (words, required - set(keys))
        f = tmp_path / f"{'-'.join(words)}.yaml"
        f.write_text(yaml.safe_dump(keys))
        rc = cli.main([*words, "--config", str(f), "--quiet"])
        out = capsys.readouterr()
        assert rc == 0, (words, out.err)
        ran.add(tuple(words))
        return out.out

    t = tmp_path
    assert run(["tiny-model"], out=str(t / "tm")).strip() == str(t / "tm")
    write_jsonl(t / "prompts.jsonl", [{"prompt": f"Copy: {i} {i + 1} =>", "answer": f"{i} {i + 1}"}
                                      for i in range(8)])
    assert run(["import-prompts"], file=str(t / "prompts.jsonl"), out=str(t / "p")).startswith(f"{t / 'p'}: 8 prompts")
    common = {"max_new_tokens": 4}
    assert run(["generate"], prompts=str(t / "p"), output=str(t / "g"), policy=str(policy_dir),
               num_samples=2, **common).startswith(f"{t / 'g'}: 16 rows")
    assert run(["score"], generations=str(t / "g"), output=str(t / "s"), reward_model=str(reward_dir),
               weights={"reward_model": 1.0}).startswith(f"{t / 's'}: 16 rows")
    assert run(["logprobs"], generations=str(t / "s"), output=str(t / "l"),
               reference=str(policy_dir)).startswith(f"{t / 'l'}: 16 rows")
    assert run(["pairs"], generations=str(t / "l"), output=str(t / "pairs")).startswith(f"{t / 'pairs'}: ")
    write_jsonl(t / "prefs.jsonl", [{"prompt": f"q{i}", "chosen": " a", "rejected": " b"} for i in range(4)])
    assert run(["import-pairs"], file=str(t / "prefs.jsonl"), out=str(t / "ip")).startswith(f"{t / 'ip'}: 4 pairs")
    train = dict(policy=str(policy_dir), max_steps=1, batch_size=2, report_to="none")
    for algo, data, extra in (("sft", t / "s", {}), ("dpo", t / "pairs", {}), ("ilql", t / "s", {}),
                              ("grpo", t / "s", {}), ("kto", t / "l", {}),
                              ("rm", t / "ip", {"eval_fraction": 0.0})):
        out = run(["train", algo], data=str(data), output=str(t / algo), **train, **extra)
        assert out.startswith(f"{t / algo}: 1 steps") and (t / algo / "final" / "config.json").exists()
    assert run(["eval"], policy=str(policy_dir), prompts=str(t / "p"), output=str(t / "e"),
               weights={"exact_match": 1.0}, **common).endswith(f"report: {t / 'e'}/report.md\n")
    run(["train", "sft"], data=str(t / "s"), output=str(t / "ck"), **{**train, "max_steps": 2}, save_steps=1)
    assert run(["export"], checkpoint=str(t / "ck" / "checkpoints" / "step-0000001"),
               out=str(t / "x")).startswith(f"{t / 'x'}: sft model")
    assert run(["rest"], policy=str(policy_dir), prompts=str(t / "p"), output=str(t / "rest"), grows=1,
               improve_steps=1, thresholds=[-100.0], lrs=[1e-3], num_samples=2, steps_per_improve=1,
               batch_size=2, micro_batch_size=2, weights={"length_penalty": 1.0},
               **common).startswith(f"{t / 'rest'}/report.md: final model")
    assert "generations 1.2.0" in run(["inspect"], dataset=str(t / "g"))
    assert run(["validate"], file=str(t / "prompts.jsonl"), schema="prompts-file").startswith(
        f"{t / 'prompts.jsonl'}: 8 rows valid")
    job = t / "job.toml"
    job.write_text(f'workdir = "{t / "w"}"\n[inputs]\nprompts = "{t / "p"}"\npolicy = "{policy_dir}"\n'
                   '[stages.generate]\nkind = "generate"\nprompts = "inputs.prompts"\npolicy = "inputs.policy"\n')
    assert "generate  generate  run" in run(["pipeline", "run"], file=str(job), dry_run=True)
    # `demo --config` runs in test_pipeline.py (its output is checked there too)
    assert ran | {("demo",)} == {tuple(w) for w, _ in leaf_commands()}


def test_checks_before_work(tmp_path, policy_dir, capsys, monkeypatch):
    """Output collisions and bad --metrics are refused before a model loads or a step runs."""
    import offline_rlhf.evaluate as evaluate
    import offline_rlhf.models as models
    monkeypatch.setattr(models, "load_policy", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: pytest.fail("generation ran"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b"}])
    cases = [
        (["train", "sft", "--data", data, "--output", policy_dir, "--policy", policy_dir],
         f"output {policy_dir}: collides with the policy {policy_dir}"),
        (["train", "sft", "--data", data, "--output", data, "--policy", policy_dir],
         f"output {data}: is an existing file"),
        (["eval", "--policy", policy_dir, "--prompts", data, "--output", tmp_path / "e",
          "--weights", "exact_match=1", "--metrics", tmp_path],
         f"metrics: {tmp_path}: neither a metrics.jsonl file nor a training output directory"),
        (["import-prompts", data, tmp_path / "x", "--answer-column", "solution"],
         f"{data}, column 'solution': answer column not found"),
    ]
    for args, message in cases:
        assert cli.main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "e").exists()


# --------------------------------------------------------------------------- item 4: trackers

def test_default_training_run_writes_tensorboard_scalars(tmp_path, policy_dir, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Copy: {i} =>", "completion": f" {i}"}
                                              for i in range(8)])
    assert cli.main(["train", "sft", "--data", str(data), "--output", str(tmp_path / "o"),
                     "--policy", str(policy_dir), "--batch-size", "4", "--max-steps", "3",
                     "--lr", "1e-3", "--quiet"]) == 0
    logged = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    runs = [p.parent for p in (tmp_path / "o" / "tensorboard").rglob("events.out.tfevents.*")]
    scalars = {}
    for run in runs:
        acc = EventAccumulator(str(run))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    for key in ("loss", "lr", "grad_norm", "logps"):
        assert scalars[key] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in logged], key
    assert len(logged) == 3 and logged[-1]["loss"] != logged[0]["loss"]


def test_requested_tracker_that_is_missing_fails_before_training(tmp_path, policy_dir):
    import importlib.util
    missing = next((name for name in ("wandb", "mlflow", "trackio", "aim", "swanlab")
                    if importlib.util.find_spec(name) is None), None)
    if missing is None:
        pytest.skip("every tracker package is installed here")
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b"}])
    for value, message in ((f"tensorboard,{missing}", f"report_to: {missing} is requested but its "
                            "package is not installed"),
                           ("tensorbord", "report_to: unknown tracker 'tensorbord'")):
        out = run_cli("train", "sft", "--data", data, "--output", tmp_path / "o", "--policy",
                      policy_dir, "--report-to", value)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
        assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- item 5: the console

def test_progress_is_plain_lines_when_not_a_terminal(tmp_path, policy_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Copy: {i} =>", "completion": f" {i}"}
                                              for i in range(8)])
    args = ["train", "sft", "--data", data, "--policy", policy_dir, "--batch-size", "4",
            "--max-steps", "3", "--report-to", "none"]
    env = {**os.environ, "OFFLINE_RLHF_PROGRESS_SECONDS": "0"}
    out = run_cli(*args, "--output", tmp_path / "a", env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert [line.split(",")[0] for line in lines if line.startswith("train sft")] == \
        ["train sft: 1/3 step (33%)", "train sft: 2/3 step (67%)", "train sft: 3/3 step (100%)",
         "train sft: 3/3 step (100%) done"]
    for noise in ("\r", "Loading weights", "Writing model shards", "it/s]"):
        assert noise not in out.stderr, noise
    quiet = run_cli(*args, "--output", tmp_path / "b", "--quiet", env=env)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    disabled = subprocess.run([sys.executable, "-m", "offline_rlhf.cli", *map(str, args), "--output",
                               tmp_path / "c"], capture_output=True, text=True, timeout=300,
                              env={**env, "TQDM_DISABLE": "1"})
    # no progress lines; what remains is the run's account of the defaults it chose
    assert disabled.returncode == 0 and disabled.stderr.strip(), disabled.stderr
    assert all("(auto: " in x for x in disabled.stderr.splitlines()), disabled.stderr


def test_each_warning_is_printed_once_on_one_line(tmp_path, policy_dir):
    """The DPO warning (printed twice before), the BOS warning (at every load before) and
    a warning raised for the data: each once, as one line."""
    import shutil

    import pyarrow as pa

    from offline_rlhf.pairs import pairs_table
    from offline_rlhf.shards import ShardWriter
    bos = tmp_path / "bos_model"
    shutil.copytree(policy_dir, bos)
    cfg = json.loads((bos / "config.json").read_text())
    (bos / "config.json").write_text(json.dumps({**cfg, "bos_token_id": 1}))
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Q{i}:", "chosen": f" {i} a b c",
                                              "rejected": f" {i} a b d"} for i in range(16)])
    # settings under which DPO lowers the chosen log-probs too (nll_alpha 0, a high rate)
    out = run_cli("train", "dpo", "--data", src, "--output", tmp_path / "o", "--policy", bos,
                  "--reference", bos, "--lr", "0.05", "--beta", "0.5", "--nll-alpha", "0",
                  "--max-steps", "15", "--batch-size", "8", "--report-to", "none", "--quiet")
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert sum("chosen log-probs fell from" in line for line in lines) == 1, out.stderr
    assert sum("names a BOS token (id 1) but the tokenizer does not add it" in line
               for line in lines) == 1, out.stderr
    assert all(line.startswith("warning: ") for line in lines), out.stderr
    # stored reference log-probs that truncation invalidates: those pairs are dropped, said once
    t, _ = pairs_table(str(src))
    t = t.set_column(t.schema.get_field_index("chosen"), "chosen",
                     pa.array([c if i % 2 else " 1" for i, c in enumerate(t.column("chosen").to_pylist())]))
    t = t.set_column(t.schema.get_field_index("rejected"), "rejected",
                     pa.array([c if i % 2 else " 2" for i, c in enumerate(t.column("rejected").to_pylist())]))
    for side in ("chosen_ref_logps_sum", "rejected_ref_logps_sum"):
        t = t.set_column(t.schema.get_field_index(side), side, pa.array([-5.0] * t.num_rows))
    with ShardWriter(str(tmp_path / "pairs"), "pairs") as w:
        w.write(0, t)
        w.finish(total_chunks=1)
    out = run_cli("train", "dpo", "--data", tmp_path / "pairs", "--output", tmp_path / "o2",
                  "--policy", policy_dir, "--max-completion-tokens", "3", "--batch-size", "4",
                  "--max-steps", "2", "--report-to", "none", "--quiet")
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == ["warning: dropped 8 truncated pairs whose stored reference "
                                       "log-probs no longer match; pass --reference to recompute "
                                       "them instead"], out.stderr


def test_library_deprecations_are_chatter_ours_are_not(capsys):
    import warnings

    from offline_rlhf import console
    console.setup("warning")
    lib = "/venv/site-packages/peft/tuners.py"
    ours = str(Path(console.__file__).parent / "generation.py")
    warnings.showwarning("`x` is deprecated", FutureWarning, lib, 1)
    warnings.showwarning("`y` is deprecated", FutureWarning, ours, 1)
    warnings.showwarning("`y` is deprecated", FutureWarning, ours, 2)
    warnings.showwarning("a library says so", UserWarning, lib, 1)
    assert capsys.readouterr().err.splitlines() == ["warning: `y` is deprecated",
                                                    "warning: a library says so"]
    console.setup("info")
    warnings.showwarning("`x` is deprecated", FutureWarning, lib, 1)
    assert capsys.readouterr().err == "warning: `x` is deprecated\n"
    console.setup("warning")


# --------------------------------------------------------------------------- item 7: prompts

def test_import_prompts_maps_answer_and_refuses_to_overwrite(tmp_path, capsys):
    src = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "1+1?", "answer": "2"},
                                               {"question": "2+2?", "answer": 4}])
    out = tmp_path / "p"
    assert cli.main(["import-prompts", str(src), str(out), "--prompt-column", "question"]) == 0
    assert "reference answers: column 'answer'" in capsys.readouterr().out
    rows = open_dataset(str(out)).read().to_pylist()
    assert [r["reference_answer"] for r in rows] == ["2", "4"] and rows[0]["metadata"] is None
    # an existing dataset is never replaced silently, and not lost to bad input
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "x"}])
    assert cli.main(["import-prompts", str(other), str(out)]) == 2
    assert f"{out}: already exists (a prompts dataset); pass --overwrite" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "answer": [1, 2]}])
    assert cli.main(["import-prompts", str(bad), str(out), "--overwrite"]) == 2
    assert f"{bad}, row 0, column 'answer': reference answer must be text or a number, got list" \
        in capsys.readouterr().err
    assert open_dataset(str(out)).read().num_rows == 2
    assert cli.main(["import-prompts", str(other), str(out), "--overwrite"]) == 0
    assert "reference answers: none (no reference_answer or answer column" in capsys.readouterr().out
    assert open_dataset(str(out)).read().column("prompt").to_pylist() == ["x"]


def test_bos_check(tmp_path, policy_dir, capsys):
    """No warning for the tiny model (its config names no BOS); one when it names one."""
    import shutil

    from offline_rlhf import console
    from offline_rlhf.models import load_tokenizer
    console.setup("warning")
    load_tokenizer(policy_dir)
    shutil.copytree(policy_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "bos_token_id": 1}))
    for _ in range(3):
        load_tokenizer(tmp_path / "m")
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {tmp_path / 'm'}: the model config names a BOS token (id 1) but the tokenizer "
        "does not add it: prompts are fed without it. If the model was trained with a BOS at the "
        "start, put it in the prompt text or fix the tokenizer's post-processor."]


# --------------------------------------------------------------------------- item 8: help and docs

def test_help_lists_every_algorithm_and_every_option_shows_its_default():
    from offline_rlhf.train import ALGORITHMS
    out = run_cli("--help")
    assert out.returncode == 0
    assert f"train on stored shards: {', '.join(ALGORITHMS)}" in out.stdout
    missing = []
    for words, parser in leaf_commands():
        for a in parser._actions:
            if a.dest == "help":
                continue
            text = a.help or ""
            required = not a.option_strings and a.dest != "overrides"
            if not text.strip() or not (required or "(default:" in text or text.startswith("required.")):
                missing.append((words, a.dest, text))
    assert not missing, missing
    sft = dict((w, p) for w, p in leaf_commands())[("train", "sft")]
    data_help = next(a.help for a in sft._actions if a.dest == "data")
    for layout in ("prompt + completion", "messages", "text", "generations"):
        assert layout in data_help


def test_command_names_known_before_the_parser_is_built():
    """The early model-path check names the command from a constant: it must match."""
    assert set(cli.COMMAND_NAMES) == {w[0] for w, _ in leaf_commands()}


def test_docs_link_only_inside_the_repository():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "data_schemas" / "README.md"]
    assert (ROOT / "docs" / "architecture.md") in docs
    for doc in docs:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
            assert not target.startswith(("http:", "https:", "/")), (doc, target)
            path = (doc.parent / target).resolve()
            assert ROOT in path.parents and path.exists(), (doc, target)
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()


def test_pipeline_overrides_before_or_after_flags(tmp_path, policy_dir, capsys):
    job, prompts = tmp_path / "job.toml", tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')   # (a job file is not prompts: refused at --dry-run)
    job.write_text(f'workdir = "{tmp_path / "w"}"\n[inputs]\npolicy = "{policy_dir}"\n'
                   f'prompts = "{prompts}"\n[stages.generate]\nkind = "generate"\n'
                   'prompts = "inputs.prompts"\npolicy = "inputs.policy"\nnum_samples = 4\n')
    plans = []
    for args in (["pipeline", "run", str(job), "--dry-run", "stages.generate.num_samples=8"],
                 ["pipeline", "run", str(job), "stages.generate.num_samples=8", "--dry-run"],
                 ["pipeline", "run", "--dry-run", str(job), "stages.generate.num_samples=8"]):
        assert cli.main(args) == 0
        plans.append(capsys.readouterr().out)
    assert plans[0] == plans[1] == plans[2]
    assert cli.main(["pipeline", "run", str(job), "--dry-run"]) == 0
    assert capsys.readouterr().out != plans[0]       # the override changed the stage's key
    with pytest.raises(SystemExit):
        cli.main(["pipeline", "run", str(job), "--dry-run", "--bogus"])
