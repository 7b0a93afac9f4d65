"""``offline-rlhf <command>``: the command-line interface.

Every command's options are the fields of a config dataclass: each is a flag (with
its help and default), and a key of the TOML/YAML file given with ``--config FILE``
(flags given on the command line win). Bad input (an
:class:`~offline_rlhf.errors.InputError`) or a storage error (a missing file, a full
disk) is printed as one line on
stderr with exit status 2; ``--debug`` shows the traceback instead. ``--quiet`` and
``--log-level`` set what the console shows (see :mod:`offline_rlhf.console`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from .config import HelpFormatter, Parser, opt, suggest
from .console import LEVELS
from .errors import InputError
from .layouts import column_names, column_opt
from .validate import FILE_SCHEMAS, TABLE_SCHEMAS

DEMO_PIPELINE = str(Path(__file__).resolve().parent.parent / "pipelines" / "demo.toml")
DATA_FILES = (".jsonl", ".json", ".ndjson", ".parquet")


@dataclasses.dataclass
class InspectConfig:
    dataset: str = opt(help="dataset directory or URL, or a JSONL/JSON/Parquet file (its layout "
                       "and the commands that read it)")
    json: bool = opt(False, "print the summary as JSON")
    verify: bool = opt(True, "check every shard's sha256 (sizes are always checked)")


@dataclasses.dataclass
class ValidateConfig:
    file: str = opt(help="Parquet/JSONL/JSON file, or a dataset")
    schema: str = opt(help="prompts | generations | pairs: a table as stored; sft | preferences | "
                      "prompts-file: a file as `train sft`, `import-pairs` and `import-prompts` "
                      "read it (every layout they accept)")
    tokenizer: str | None = opt(None, "sft, preferences: also render chat messages with this model "
                                "directory's chat template")
    prompt_column: str = column_opt("prompt")
    chosen_column: str = column_opt("chosen")
    rejected_column: str = column_opt("rejected")
    completion_column: str = column_opt("completion")
    messages_column: str = column_opt("messages")

    def __post_init__(self):
        if self.schema not in TABLE_SCHEMAS + FILE_SCHEMAS:
            raise InputError(f"schema: must be one of {', '.join(TABLE_SCHEMAS + FILE_SCHEMAS)}, "
                             f"got {self.schema!r}")


@dataclasses.dataclass
class TinyModelConfig:
    out: str = opt(help="output model directory")
    kind: str = opt("causal", "causal (a language model) | reward (a one-label scorer)")
    hidden: int = opt(64, "hidden size")
    layers: int = opt(2, "transformer layers")
    heads: int = opt(4, "attention heads")
    seed: int = opt(0, "initialisation seed")

    def __post_init__(self):
        if self.kind not in ("causal", "reward"):
            raise InputError(f"kind: must be causal or reward, got {self.kind!r}")


@dataclasses.dataclass
class DemoConfig:
    workdir: str = opt("demo_run", "where the demo keeps everything (the start model is cached there)")
    pipeline: str = opt(DEMO_PIPELINE, "job file to run")
    overrides: list[str] = opt([], "KEY=VALUE overrides of job keys")
    seed: int = opt(0, "seeds everything: the start model's initialisation and training, the "
                    "prompt split, sampling, training and evaluation (each seed is prepared and "
                    "cached in WORKDIR/seed-N)")


@dataclasses.dataclass
class PipelineRunConfig:
    file: str = opt(help="job file (TOML or YAML)")
    overrides: list[str] = opt([], "KEY=VALUE overrides of job keys, e.g. "
                               "stages.generate.num_samples=8")
    dry_run: bool = opt(False, "print the plan (what is reused, what runs) and stop")
    only: list[str] = opt([], "run only these stages (finished ones are still reused)")
    wait: bool = opt(False, "if another run holds the workdir, wait for it (default: refuse)")
    nights: int | None = opt(None, "run the job N nights, each from the last night's policy "
                             "(see docs/grpo.md; a [nights] table in the file sets the rest)")


# --------------------------------------------------------------------------- commands

def _config(cls, args):
    """The command's config: the --config file's values (and, for `rest`, KEY=VALUE
    overrides of them), overridden by the flags given."""
    from .config import apply_overrides, from_namespace, load_file, resolve_aliases
    path = getattr(args, "config", None)
    base = resolve_aliases(cls, load_file(path), str(path)) if path else {}
    if "overrides" not in {f.name for f in dataclasses.fields(cls)}:
        base = apply_overrides(base, getattr(args, "overrides", []))
    cfg = from_namespace(cls, args, base, str(path) if path else "option")
    if hasattr(cfg, "output") or hasattr(cfg, "out"):
        from .config import check_output
        check_output(cfg)
    return cfg


def _stage(cfg, run) -> int:
    manifest = run(cfg)
    r = manifest.get("run", {})
    counts = "".join(f", {k} {v}" for k, v in sorted(manifest.get("stats", {}).items()) if v)
    print(f"{cfg.output}: {manifest['num_rows']} rows in {manifest['num_shards']} shards, "
          f"{'complete' if manifest['complete'] else 'INCOMPLETE (other workers pending)'}"
          f"{counts}; this run: {r.get('chunks_done', 0)} chunks done, "
          f"{r.get('chunks_skipped', 0)} already committed, {r.get('seconds', 0):.1f} s")
    return 0


def _train(cfg, run) -> int:
    summary = run(cfg)
    if not summary.get("is_main_process", True):
        return 0
    if summary.get("already_done"):
        print(f"{cfg.output}: already trained by an identical run ({summary.get('steps')} steps); "
              "nothing to do")
        return 0
    last = summary.get("last") or {}
    shown = "  ".join(f"{k} {v:.4g}" for k, v in last.items()
                      if isinstance(v, float) and k not in ("seconds", "epoch"))
    print(f"{cfg.output}: {summary.get('steps_run', 0)} steps in "
          f"{summary.get('train_seconds', 0):.1f} s; last training step: {shown}")
    held = summary.get("eval") or {}
    if held:
        n = (summary.get("data") or {}).get("eval_pairs")
        print("held-out" + (f" ({n} pairs)" if n else "") + ": " + "  ".join(
            f"{k.removeprefix('eval/')} {v:.4g}" for k, v in held.items() if isinstance(v, float)))
    from .train.card import card_dir
    card = card_dir(Path(cfg.output))
    if card is not None:
        print(f"model card: {card / 'README.md'}")
    return 0   # warnings were printed (once) when they were raised


def _rest(cfg, run) -> int:
    report = run(cfg)
    print(f"{cfg.output}/report.md: final model {report['final_model']}")
    for e in report["grows"]:
        for i, s in enumerate(e["improves"]):
            ev = "-" if s["eval_reward"] is None else f"{s['eval_reward']:.3f}"
            kl = "" if s.get("kl") is None else f", KL to base {s['kl']:.4g} ± {s['kl_stderr']:.2g}"
            print(f"grow {e['grow']} improve {i + 1}: kept {s['kept']} ({s['kept_fraction']:.1%}), "
                  f"held-out reward {ev}{kl}")
    return 0


def _eval(cfg, run) -> int:
    from .eval_report import figures
    results = run(cfg)
    print(f"{figures(results)}\nreport: {cfg.output}/report.md")
    return 0


def _eval_figures(stages) -> None:
    """Each finished eval stage's before/after table and report path."""
    from .eval_report import figures_of
    for s in stages:
        shown = figures_of(s.output) if s.kind == "eval" and s.output else None
        if shown:
            print(f"\neval stage {s.name}:\n{shown}")


def _export(cfg, run) -> int:
    r = run(cfg)
    print(f"{cfg.out}: {r['algorithm']} model of {cfg.checkpoint} (step {r['step']}"
          + (", LoRA merged; adapter in " + str(Path(cfg.out) / "adapter") if r["lora"] else "")
          + ")")
    return 0


def _import_pairs(cfg, _) -> int:
    from .pairs import import_pairs
    m = import_pairs(cfg.file, cfg.out, cfg.tokenizer, cfg.chunk_rows, cfg.overwrite,
                     column_names(cfg))
    print(f"{cfg.out}: {m['num_rows']} pairs in {m['num_shards']} shards"
          + "".join(f", {k} {v}" for k, v in sorted(m["stats"].items()) if v))
    return 0


def _import_prompts(cfg, _) -> int:
    from .prompts import import_prompts
    m = import_prompts(cfg.file, cfg.out, chunk_rows=cfg.chunk_rows, overwrite=cfg.overwrite,
                       prompt_column=cfg.prompt_column, messages_column=cfg.messages_column,
                       id_column=cfg.id_column, answer_column=cfg.answer_column)
    answer = m["info"]["reference_answer_column"]
    print(f"{cfg.out}: {m['num_rows']} prompts in {m['num_shards']} shards; reference answers: "
          + (f"column '{answer}'" if answer else "none (no reference_answer or answer column; "
             "choose one with --answer-column)"))
    return 0


def _inspect(cfg, _) -> int:
    from .shards import is_dataset, open_dataset
    from .summary import describe_file, render, render_file, summarize
    if not is_dataset(cfg.dataset) and cfg.dataset.lower().endswith(DATA_FILES):
        d = describe_file(cfg.dataset)
        print(json.dumps(d, indent=1) if cfg.json else render_file(d))
        return 0
    summary = summarize(open_dataset(cfg.dataset), verify=cfg.verify)
    print(json.dumps(summary, indent=1, default=str) if cfg.json else render(summary))
    return 0


def _validate(cfg, _) -> int:
    from .validate import validate_file
    n, note = validate_file(cfg.file, cfg.schema, cfg.tokenizer, column_names(cfg))
    print(f"{cfg.file}: {n} rows valid against schema '{cfg.schema}'{note}")
    return 0


def _tiny_model(cfg, _) -> int:
    from .tiny import build_tiny_model
    print(build_tiny_model(cfg.out, kind=cfg.kind, hidden=cfg.hidden, layers=cfg.layers,
                           heads=cfg.heads, seed=cfg.seed))
    return 0


def _pipeline(cfg, _) -> int:
    from .nights import has_nights
    from .pipeline import load_pipeline, render_plan, run_pipeline
    if cfg.nights is not None or has_nights(cfg.file, cfg.overrides):
        return _nights(cfg)
    p = load_pipeline(cfg.file, cfg.overrides)
    if cfg.only:
        unknown = set(cfg.only) - {s.name for s in p.stages}
        if unknown:
            raise InputError(f"{cfg.file}: --only: no stage named {sorted(unknown)[0]}")
        p.stages = [s for s in p.stages if s.name in cfg.only or s.done()]
    rows = run_pipeline(p, dry_run=cfg.dry_run, wait=cfg.wait)
    print(render_plan(rows))
    if not cfg.dry_run:
        _eval_figures(p.stages)
        print(f"\nresolved config: {p.workdir / 'pipeline.resolved.json'}; log: {p.workdir / 'run.log'}")
    return 0


def _nights(cfg) -> int:
    from .nights import render_nights, run_nights
    if cfg.only:
        raise InputError(f"{cfg.file}: --only: cannot be combined with nights")
    records = run_nights(cfg.file, cfg.overrides, cfg.nights, cfg.dry_run)
    for r in records:
        print(f"night {r['night']}: " + (r["pending"] if "pending" in r else
              ", ".join(f"{x['stage']} {x['action']}" for x in r["stages"])))
    print("\n" + render_nights(records))
    from .eval_report import figures_of
    for r in records:   # every eval stage of every night: its before/after table and report
        for stage, figs in (r.get("evals") or {}).items():
            shown = figures_of(Path(figs["report"]).parent) if figs.get("report") else None
            if shown:
                print(f"\nnight {r['night']} {stage}:\n{shown}")
    return 1 if records and records[-1].get("stopped") else 0   # the guard's patience ran out


def _demo(cfg, _) -> int:
    from .demo import run_demo
    return run_demo(cfg.workdir, cfg.pipeline, cfg.overrides, cfg.seed)


# --------------------------------------------------------------------------- the parser

def _global_flags(on_subcommand: bool) -> argparse.ArgumentParser:
    """--debug, --quiet and --log-level: before the command or after it."""
    g = argparse.ArgumentParser(add_help=False)
    default = (lambda v: argparse.SUPPRESS) if on_subcommand else (lambda v: v)
    g.add_argument("--debug", action="store_true", default=default(False),
                   help="show tracebacks for input errors (default: off)")
    g.add_argument("--quiet", action="store_true", default=default(False),
                   help="no progress bars or lines; warnings, errors and results only (default: off)")
    g.add_argument("--log-level", choices=LEVELS, default=default("warning"),
                   help="what is logged: ours at this level; libraries (transformers, accelerate, "
                   "...) show errors only unless info or debug (default: warning)")
    return g


def _commands() -> list[tuple]:
    """(name, config class, runner, run function, positional fields, help, description)."""
    from .evaluate import EvalConfig, run_eval
    from .export import ExportConfig, run_export
    from .generation import GenerateConfig, generate
    from .logprobs import LogprobsConfig, compute_logprobs
    from .pairs import ImportPairsConfig, PairsConfig, build_pairs
    from .prompts import ImportPromptsConfig
    from .rest import RestConfig, run_rest
    from .rewards.score import ScoreConfig, score
    return [
        ("generate", GenerateConfig, _stage, generate, (), "sample K responses per prompt with behaviour log-probs into shards",
         "Sample K responses per prompt with the policy (token-budget batches, shared prefill, "
         "per-sample seeds) and write response tokens, behaviour log-probs, finish reasons and "
         "lineage as shards. Rerunning skips finished shards; --worker/--num-workers split the work."),
        ("score", ScoreConfig, _stage, score, (), "add reward-model, judge and rule rewards (and group-normalised reward)",
         "Score every response with a reward model, an LLM judge (--judge: the expected "
         "value of its verdict distribution, docs/rlaif.md) and/or rule rewards (exact_match, "
         "numeric_match, format, length_penalty), store each component by name, their weighted "
         "total and the reward normalised within each prompt's group, in a new dataset. Only "
         "the reward columns change, so rescoring with a new reward model never regenerates."),
        ("logprobs", LogprobsConfig, _stage, compute_logprobs, (), "add reference-model log-probs (per token and summed)",
         "Compute each response's per-token and summed log-probs under the reference model, "
         "so that no optimiser needs to load it."),
        ("pairs", PairsConfig, _stage, build_pairs, (), "build preference pairs from scored generations",
         "Pair each prompt's responses by reward (best_worst, margin, top_bottom) or by an LLM "
         "judge asked in both orders (--strategy judge --judge MODEL, docs/rlaif.md). Identical "
         "responses are de-duplicated, ties and single-response prompts dropped and counted; "
         "reference log-probs are carried when present."),
        ("import-pairs", ImportPairsConfig, _import_pairs, None, ("file", "out"),
         "import preference data (every common layout) as a pairs dataset",
         "Import preference data as a pairs dataset (JSONL, JSON or Parquet): prompt/chosen/"
         "rejected as text or chat messages; chosen/rejected as whole conversations that repeat "
         "the prompt (HH, UltraFeedback style); or chosen/rejected only, sharing their beginning "
         "(implicit prompt). Chat messages are rendered with --tokenizer's chat template. "
         "Optional score_chosen/score_rejected/margin columns are kept."),
        ("rest", RestConfig, _rest, run_rest, (), "ReST / ReST-EM grow-improve loop",
         "Run (or resume) a ReST job: grow (sample K per prompt and score) then improve steps "
         "(SFT on samples over a rising threshold, with a falling learning rate); writes "
         "report.md/json and reward histograms. Options come from --config FILE (see "
         "docs/rest.md), KEY=VALUE overrides of its keys, and flags."),
        ("eval", EvalConfig, _eval, run_eval, (), "held-out reward, win rate, KL and a report with plots",
         "Generate on held-out prompts, score, and compare with a baseline: mean reward and "
         "components, win rate, KL to the reference (estimated on samples from the policy), "
         "response length; results.json and report.md with plots."),
        ("export", ExportConfig, _export, run_export, ("checkpoint", "out"),
         "write a training checkpoint as a transformers model directory",
         "Write the model of a training checkpoint (OUTPUT/checkpoints/step-0000005) as a "
         "transformers directory that every command loads: the base policy with the trained "
         "weights (LoRA: merged, and the peft adapter in OUT/adapter; train rm: the one-label "
         "reward model; ILQL: with its heads). Refused when the base policy is missing or not "
         "the run's, or OUT is not empty (without --overwrite)."),
        ("inspect", InspectConfig, _inspect, None, ("dataset",),
         "schema version, rows, shards, lineage and reward statistics of a dataset",
         "Print schema version, row and shard counts, lineage and reward statistics of a "
         "dataset (local path or fsspec URL); of a JSONL/JSON/Parquet file, its columns, "
         "layout and the commands that read it."),
        ("validate", ValidateConfig, _validate, None, ("file",),
         "check a file against a table schema or an importer's layouts",
         "Validate a file or a dataset against a table schema (prompts, generations, pairs) or "
         "against what an importer reads (sft, preferences, prompts-file); the first bad row "
         "is named with its column."),
        ("import-prompts", ImportPromptsConfig, _import_prompts, None, ("file", "out"),
         "turn a JSONL/JSON/Parquet prompt file into a prompts dataset",
         "Read prompts from JSONL/JSON/Parquet (text or chat messages), derive stable ids where "
         "missing, validate, and write a prompts dataset. A reference_answer (else answer) "
         "column becomes the reference answer; extra columns are kept as JSON metadata."),
        ("tiny-model", TinyModelConfig, _tiny_model, None, ("out",),
         "build a tiny model + tokenizer from config (tests, demos; no hub)",
         "Write a randomly initialised tiny Llama-style model and a tokenizer trained in memory "
         "(safetensors; no hub)."),
        ("demo", DemoConfig, _demo, None, ("overrides",),
         "the main job on the embedded default (the README's first command)",
         "The nightly loop on the embedded default, on CPU: a tiny model trained here to a "
         "mediocre start on a copy task (cached under WORKDIR), then generate -> score -> "
         "logprobs -> pairs -> DPO -> eval -> report (pipelines/demo.toml). Prints held-out "
         "reward before and after."),
    ]


def _epilog(commands: list[tuple]) -> str:
    from .train import ALGORITHMS
    rows = [(c[0], c[5]) for c in commands]
    rows.insert(5, ("train ALGO", f"train on stored shards: {', '.join(ALGORITHMS)}"))
    rows.append(("pipeline run", "run a job file (nightly, rescore, train_from_shards, demo)"))
    return "commands (offline-rlhf COMMAND --help for each):\n" + \
        "\n".join(f"  {name:<15} {text}" for name, text in rows) + \
        "\n\nEvery command takes --config FILE (TOML or YAML) holding any of its options. " \
        "Options may\nbe spelled with underscores (--max_steps) and TRL's names (--learning_rate): " \
        "docs/cli.md."


def _add(sub, name, cls, runner, run, positional, short, long, parents, required=True):
    from .config import add_arguments, add_config_file_argument
    s = sub.add_parser(name, help=short, description=long, parents=parents,
                       formatter_class=HelpFormatter)
    add_config_file_argument(s)
    add_arguments(s, cls, positional, required)
    if name == "rest":
        s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", default=argparse.SUPPRESS,
                       help="override keys of the --config file (default: none)")
    s.set_defaults(fn=lambda args: runner(_config(cls, args), run), command_parser=s,
                   takes_overrides=name == "rest" or "overrides" in positional)
    return s


def build_parser(required: bool = True) -> argparse.ArgumentParser:
    """The CLI's parser; ``required``: options without a default are required flags
    (off when a --config file may give them)."""
    from .lineage import code_version
    commands = _commands()
    p = Parser(
        prog="offline-rlhf", usage="%(prog)s [-h] [--version] [--debug] [--quiet] "
        "[--log-level {debug,info,warning,error}] COMMAND ...", description="Offline / batch preference optimisation over Parquet "
        "shards.", epilog=_epilog(commands), formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_flags(False)])
    p.add_argument("--version", action="version", version=f"offline-rlhf {code_version()}")
    # the epilog lists the commands (with `train ALGO` and `pipeline run`): not argparse too
    sub = p.add_subparsers(dest="command", metavar="COMMAND", help=argparse.SUPPRESS,
                           prog="offline-rlhf")
    flags = [_global_flags(True)]
    for name, cls, runner, run, positional, short, long in commands:
        _add(sub, name, cls, runner, run, positional, short, long, flags, required)

    train = sub.add_parser("train", help="train on stored shards", parents=flags,
                           description="Train a model on stored shards with the shared loop "
                           "(accelerate, checkpoints with exact resume, metrics, LoRA/QLoRA). "
                           "Run under `accelerate launch` or `torchrun` for several processes.")
    algos = train.add_subparsers(dest="algorithm", metavar="ALGO", required=True)
    from .train import ALGORITHMS
    for algo, (cls, run, short) in ALGORITHMS.items():
        _add(algos, algo, cls, _train, run, (), short, short, flags, required)

    s = sub.add_parser("pipeline", help="run a job file (stages keyed by fingerprints)", parents=flags,
                       description="Run a pipeline job file stage by stage. A stage whose inputs "
                       "and options are unchanged is reused; the rest run (and resume).")
    psub = s.add_subparsers(dest="pipeline_command", metavar="run", required=True)
    _add(psub, "run", PipelineRunConfig, _pipeline, None, ("file", "overrides"),
         "run (or --dry-run: plan) a job file", "Run (or, with --dry-run, plan) a job file; "
         "KEY=VALUE overrides may come before or after the flags.", flags, required)
    return p


COMMAND_NAMES = ("generate", "score", "logprobs", "pairs", "import-pairs", "train", "rest", "eval",
                 "export", "inspect", "validate", "import-prompts", "tiny-model", "demo", "pipeline")
# options that name a model directory (and what it is called in messages)
MODEL_OPTIONS = {"policy": "policy", "reference": "reference model", "reward_model": "reward model",
                 "baseline": "baseline", "checkpoints": "checkpoint", "tokenizer": "tokenizer",
                 "judge": "judge model"}


def check_model_paths(argv: list[str]) -> None:
    """Model directories named by flags or in a --config file, checked before torch and
    transformers are imported, so that a mistyped path fails at once (the loaders check
    them again: this is the early, fast copy of the same check)."""
    from .config import ALIASES, alias_target, flag_spellings, load_file
    from .export import is_checkpoint
    from .models import check_model_dir, check_tokenizer_dir
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    for name in MODEL_OPTIONS:
        pre.add_argument(*flag_spellings(name, MODEL_OPTIONS), dest=name,
                         nargs="*" if name == "checkpoints" else None)
    given, _ = pre.parse_known_args(argv)
    keys = {**{a: alias_target(a, MODEL_OPTIONS) for a in ALIASES if alias_target(a, MODEL_OPTIONS)},
            **{m: m for m in MODEL_OPTIONS}}
    values = {keys[k.replace("-", "_")]: v for k, v in load_file(given.config).items()
              if isinstance(k, str) and k.replace("-", "_") in keys} if given.config else {}
    values.update({k: getattr(given, k) for k in MODEL_OPTIONS if getattr(given, k) is not None})
    for name, value in values.items():
        for path in value if isinstance(value, list) else [value]:
            if name == "checkpoints" and isinstance(path, str) and is_checkpoint(path):
                continue   # a training checkpoint: eval checks it (and exports it)
            if isinstance(path, str) and "://" not in path:
                (check_tokenizer_dir if name == "tokenizer" else check_model_dir)(path, MODEL_OPTIONS[name])


def _fail(command: str, error: BaseException) -> int:
    print(f"offline-rlhf {command}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


# bad input, or storage (missing, full, denied): one line, exit 2
INPUT_ERRORS = (InputError, OSError)


def _early_console(argv: list[str]) -> None:
    """The console set up from --quiet/--log-level before the parser is built, so that
    libraries imported on the way (bitsandbytes' kernel notices) stay quiet, --help too."""
    from .console import setup
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--quiet", action="store_true")
    pre.add_argument("--log-level", default="warning")
    given, _ = pre.parse_known_args(argv)
    try:
        setup(given.log_level, given.quiet)
    except InputError:
        setup()   # the parser refuses the bad level in one line


def _check_extra(parser, args, extra: list[str]) -> None:
    """Arguments the command does not know: KEY=VALUE overrides where it takes them, else
    one line from the command's own parser, with the closest option."""
    if getattr(args, "takes_overrides", False) and \
            not any(x.startswith("-") or "=" not in x for x in extra):
        return
    own = getattr(args, "command_parser", parser)
    flag = next((x for x in extra if x.startswith("-")), None)
    own.error(f"unrecognized arguments: {' '.join(extra)}" + (suggest(own, flag) if flag else ""))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # models are local directories, always
    argv = sys.argv[1:] if argv is None else list(argv)
    if not {"-h", "--help"} & set(argv):
        try:
            check_model_paths(argv)
        except INPUT_ERRORS as e:
            if "--debug" in argv:
                raise
            return _fail(next((a for a in argv if a in COMMAND_NAMES), ""), e)
    _early_console(argv)
    parser = build_parser(required=not any(a == "--config" or a.startswith("--config=")
                                           for a in argv))
    args, extra = parser.parse_known_args(argv)
    if extra:   # KEY=VALUE overrides given after flags (argparse stops at the first flag)
        _check_extra(parser, args, extra)
        args.overrides = list(getattr(args, "overrides", [])) + extra
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    try:
        from .console import setup
        from .extras import check_vision_packages
        setup(args.log_level, args.quiet)
        check_vision_packages()
        return args.fn(args)
    except INPUT_ERRORS as e:
        if args.debug:
            raise
        return _fail(args.command, e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
