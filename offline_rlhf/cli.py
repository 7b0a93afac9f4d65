"""``offline-rlhf <command>``: the command-line interface.

Bad input (an :class:`~offline_rlhf.errors.InputError`, a missing file) is printed as
one line on stderr with exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import InputError

COMMANDS_HELP = """\
commands (offline-rlhf COMMAND --help for each):
  generate        sample K responses per prompt with behaviour log-probs into shards
  score           add reward-model and rule rewards (and group-normalised reward)
  logprobs        add reference-model log-probs (per token and summed)
  pairs           build preference pairs from scored generations
  import-pairs    import prompt/chosen/rejected data (text or chat) as a pairs dataset
  train ALGO      train on stored shards: dpo, rm, sft
  rest            ReST / ReST-EM grow-improve loop from a config file
  eval            held-out reward, win rate, KL and a report with plots
  pipeline run    run a job file (nightly, rescore, train_from_shards, demo)
  inspect         schema version, rows, shards, lineage and reward statistics of a dataset
  validate        check a data file against a schema (prompts, generations, pairs)
  import-prompts  turn a JSONL/JSON/Parquet prompt file into a prompts dataset
  tiny-model      build a tiny model + tokenizer from config (tests, demos; no hub)
  demo            the main job on the embedded default (the README's first command)
"""


def _config_from_args(cls, args):
    """The command's config: the --config file's values, overridden by the flags given."""
    from .config import from_namespace, load_file
    return from_namespace(cls, args, load_file(args.config) if args.config else None)


def _stage(cls, run):
    def command(args) -> int:
        manifest = run(_config_from_args(cls, args))
        r = manifest.get("run", {})
        counts = "".join(f", {k} {v}" for k, v in sorted(manifest.get("stats", {}).items()) if v)
        print(f"{args.output if hasattr(args, 'output') else ''}: {manifest['num_rows']} rows in "
              f"{manifest['num_shards']} shards, "
              f"{'complete' if manifest['complete'] else 'INCOMPLETE (other workers pending)'}"
              f"{counts}; this run: {r.get('chunks_done', 0)} chunks done, "
              f"{r.get('chunks_skipped', 0)} already committed, {r.get('seconds', 0):.1f} s")
        return 0
    return command


def _train(cls, run):
    def command(args) -> int:
        summary = run(_config_from_args(cls, args))
        if not summary.get("is_main_process", True):
            return 0
        last = summary.get("last") or {}
        shown = "  ".join(f"{k} {v:.4g}" for k, v in last.items()
                          if isinstance(v, float) and k not in ("seconds", "epoch"))
        print(f"{args.output}: {summary.get('steps_run', 0)} steps in "
              f"{summary.get('train_seconds', 0):.1f} s; last step: {shown}")
        if summary.get("warning"):
            print(f"warning: {summary['warning']}", file=sys.stderr)
        return 0
    return command


def _cmd_rest(args) -> int:
    from .rest import load_rest_config, run_rest
    report = run_rest(load_rest_config(args.config, args.overrides))
    out = load_rest_config(args.config, args.overrides).output
    print(f"{out}/report.md: final model {report['final_model']}")
    for e in report["grows"]:
        for i, s in enumerate(e["improves"]):
            ev = "-" if s["eval_reward"] is None else f"{s['eval_reward']:.3f}"
            print(f"grow {e['grow']} improve {i + 1}: kept {s['kept']} ({s['kept_fraction']:.1%}), "
                  f"held-out reward {ev}")
    return 0


def _cmd_import_pairs(args) -> int:
    from .pairs import import_pairs
    m = import_pairs(args.file, args.out, args.tokenizer, args.chunk_rows)
    print(f"{args.out}: {m['num_rows']} pairs in {m['num_shards']} shards"
          + "".join(f", {k} {v}" for k, v in sorted(m["stats"].items()) if v))
    return 0


def _cmd_inspect(args) -> int:
    from .shards import open_dataset
    from .summary import render, summarize
    summary = summarize(open_dataset(args.dataset), verify=not args.no_verify)
    print(json.dumps(summary, indent=1, default=str) if args.json else render(summary))
    return 0


def _cmd_validate(args) -> int:
    from .schemas import validate
    from .shards import read_table_file
    table = validate(read_table_file(args.file), args.schema, args.file)
    print(f"{args.file}: {table.num_rows} rows valid against schema '{args.schema}'")
    return 0


def _cmd_import_prompts(args) -> int:
    from .prompts import import_prompts
    m = import_prompts(args.file, args.out, chunk_rows=args.chunk_rows,
                       prompt_column=args.prompt_column, messages_column=args.messages_column,
                       id_column=args.id_column, answer_column=args.answer_column)
    print(f"{args.out}: {m['num_rows']} prompts in {m['num_shards']} shards")
    return 0


def _cmd_tiny_model(args) -> int:
    from .tiny import build_tiny_model
    out = build_tiny_model(args.out, kind=args.kind, hidden=args.hidden, layers=args.layers,
                           heads=args.heads, seed=args.seed)
    print(out)
    return 0


def _cmd_demo(args) -> int:
    """Prepare the embedded default (cached) and run pipelines/demo.toml end to end."""
    import time
    from pathlib import Path

    from .pipeline import load_pipeline, render_plan, run_pipeline
    from .toy import pretrain_to, setup_copy_task
    root = Path(args.workdir)
    start = root / "models" / "start"
    t0 = time.perf_counter()
    if not (start / "model.safetensors").exists():
        print("preparing the demo model: a tiny model trained here on a copy task "
              "(4 digits) until it is mediocre (~20% held-out exact match)...")
        setup_copy_task(root / "prep")
        model, steps, em = pretrain_to(root / "prep", 0.15)
        import shutil
        shutil.copytree(model, start)
        (root / "data").mkdir(parents=True, exist_ok=True)
        for src, dst in (("train_prompts", "train_prompts"), ("test_prompts", "heldout_prompts")):
            if not (root / "data" / dst).exists():
                shutil.copytree(root / "prep" / src, root / "data" / dst)
        shutil.rmtree(root / "prep")
        print(f"  {steps} SFT steps, held-out exact match {em:.0%} ({time.perf_counter() - t0:.0f} s)")
    overrides = [f"workdir={root / 'pipeline'}", f"inputs.policy={start}",
                 f"inputs.prompts={root / 'data' / 'train_prompts'}",
                 f"inputs.heldout={root / 'data' / 'heldout_prompts'}"] + list(args.overrides)
    p = load_pipeline(args.pipeline, overrides)
    print("\n" + render_plan(run_pipeline(p, dry_run=True)) + "\n")
    run_pipeline(p)
    import json
    ev = next(s for s in p.stages if s.kind == "eval").output
    results = json.loads((ev / "results.json").read_text())
    b, pol = results["baseline"], results["policy"]
    print(f"\nheld-out ({pol['samples']} prompts, greedy)   before (start)   after (DPO)")
    print(f"mean reward (exact match)          {b['reward_mean']:>14.3f}   {pol['reward_mean']:>11.3f}")
    kl_b, kl_p = (0.0 if abs(x) < 5e-4 else x for x in (b["kl_to_reference"], pol["kl_to_reference"]))
    print(f"KL to the start model (nats)       {kl_b:>14.3f}   {kl_p:>11.3f}")
    print(f"response tokens                    {b['response_tokens_mean']:>14.2f}   {pol['response_tokens_mean']:>11.2f}")
    print(f"win rate of after over before      {results['win_rate']:>29.1%}")
    print(f"\nreport: {ev / 'report.md'}   ({time.perf_counter() - t0:.0f} s in all)")
    return 0


def _eval_command(cls, run):
    def command(args) -> int:
        results = run(_config_from_args(cls, args))
        p = results["policy"]
        line = f"{args.output}/report.md: policy mean reward {p['reward_mean']:.4g}"
        if "baseline" in results:
            line += f", baseline {results['baseline']['reward_mean']:.4g}, win rate {results['win_rate']:.1%}"
        print(line)
        return 0
    return command


def _cmd_pipeline(args) -> int:
    from .nights import has_nights
    if args.nights is not None or has_nights(args.file, args.overrides):
        return _cmd_nights(args)
    from .pipeline import load_pipeline, render_plan, run_pipeline
    p = load_pipeline(args.file, args.overrides)
    if args.only:
        unknown = set(args.only) - {s.name for s in p.stages}
        if unknown:
            raise InputError(f"{args.file}: --only: no stage named {sorted(unknown)[0]}")
        p.stages = [s for s in p.stages if s.name in args.only or s.done()]
    rows = run_pipeline(p, dry_run=args.dry_run)
    print(render_plan(rows))
    if not args.dry_run:
        print(f"\nresolved config: {p.workdir / 'pipeline.resolved.json'}; log: {p.workdir / 'run.log'}")
    return 0


def _cmd_nights(args) -> int:
    from .nights import render_nights, run_nights
    if args.only:
        raise InputError(f"{args.file}: --only: cannot be combined with nights")
    records = run_nights(args.file, args.overrides, args.nights, args.dry_run)
    for r in records:
        print(f"night {r['night']}: " + (r["pending"] if "pending" in r else
              ", ".join(f"{x['stage']} {x['action']}" for x in r["stages"])))
    print("\n" + render_nights(records))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="offline-rlhf", description="Offline / batch preference optimisation over Parquet "
        "shards.", epilog=COMMANDS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    from .config import add_arguments, add_config_file_argument
    from .generation import GenerateConfig, generate
    from .logprobs import LogprobsConfig, compute_logprobs
    from .rewards.score import ScoreConfig, score
    stages = [
        ("generate", GenerateConfig, generate, "sample responses into a generations dataset",
         "Sample K responses per prompt with the policy (token-budget batches, shared prefill, "
         "per-sample seeds) and write response tokens, behaviour log-probs, finish reasons and "
         "lineage as shards. Rerunning skips finished shards; --worker/--num-workers split the work."),
        ("score", ScoreConfig, score, "add rewards to a generations dataset",
         "Score every response with a reward model and/or rule rewards (exact_match, "
         "numeric_match, format, length_penalty), store each component by name, their weighted "
         "total and the reward normalised within each prompt's group, in a new dataset. Only "
         "the reward columns change, so rescoring with a new reward model never regenerates."),
        ("logprobs", LogprobsConfig, compute_logprobs, "add reference log-probs",
         "Compute each response's per-token and summed log-probs under the reference model, "
         "so that no optimiser needs to load it."),
    ]
    from .pairs import PairsConfig, build_pairs
    stages.append(("pairs", PairsConfig, build_pairs, "build preference pairs from scored generations",
                   "Pair each prompt's responses by reward (best_worst, margin, top_bottom). "
                   "Identical responses are de-duplicated, ties and single-response prompts "
                   "dropped and counted; reference log-probs are carried when present."))
    for name, cls, run, short, long in stages:
        s = sub.add_parser(name, help=short, description=long)
        add_config_file_argument(s)
        add_arguments(s, cls)
        s.set_defaults(fn=_stage(cls, run))

    s = sub.add_parser("import-pairs", help="import prompt/chosen/rejected data",
                       description="Import preference data in the usual prompt/chosen/rejected "
                       "layout (plain strings or chat message lists; JSONL, JSON or Parquet) as a "
                       "pairs dataset. Chat messages are rendered with --tokenizer's chat template. "
                       "Optional score_chosen/score_rejected/margin columns are kept.")
    s.add_argument("file")
    s.add_argument("out")
    s.add_argument("--tokenizer", help="model directory whose chat template renders chat messages")
    s.add_argument("--chunk-rows", type=int, default=10_000)
    s.set_defaults(fn=_cmd_import_pairs)

    s = sub.add_parser("rest", help="ReST grow / improve loop",
                       description="Run (or resume) a ReST job: grow (sample K per prompt and "
                       "score) then improve steps (SFT on samples over a rising threshold, with a "
                       "falling learning rate); writes report.md/json and reward histograms.")
    s.add_argument("--config", required=True, help="TOML or YAML job file (keys: see docs/rest.md)")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys")
    s.set_defaults(fn=_cmd_rest)

    train = sub.add_parser("train", help="train on stored shards",
                           description="Train a model on stored shards with the shared loop "
                           "(accelerate, checkpoints with exact resume, metrics, LoRA/QLoRA). "
                           "Run under `accelerate launch` or `torchrun` for several processes.")
    algos = train.add_subparsers(dest="algorithm", metavar="ALGO", required=True)
    from .train import ALGORITHMS
    for algo, (cls, run, short) in ALGORITHMS.items():
        s = algos.add_parser(algo, help=short, description=short)
        add_config_file_argument(s)
        add_arguments(s, cls)
        s.set_defaults(fn=_train(cls, run))

    s = sub.add_parser("inspect", help="summarize a dataset",
                       description="Print schema version, row and shard counts, lineage and "
                       "reward statistics of a dataset (local path or fsspec URL).")
    s.add_argument("dataset")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of every shard (sizes are still checked)")
    s.set_defaults(fn=_cmd_inspect)

    s = sub.add_parser("validate", help="check a data file against a schema",
                       description="Validate a Parquet/JSONL/JSON file or a dataset against a "
                       "schema; the first bad row is named with its column.")
    s.add_argument("file")
    s.add_argument("--schema", required=True, choices=["prompts", "generations", "pairs"])
    s.set_defaults(fn=_cmd_validate)

    s = sub.add_parser("import-prompts", help="import a prompt file as a prompts dataset",
                       description="Read prompts from JSONL/JSON/Parquet (text or chat "
                       "messages), derive stable ids where missing, validate, and write a "
                       "prompts dataset. Extra columns are kept as JSON metadata.")
    s.add_argument("file")
    s.add_argument("out", help="output dataset directory or URL")
    s.add_argument("--prompt-column", default="prompt")
    s.add_argument("--messages-column", default="messages")
    s.add_argument("--id-column", default="prompt_id")
    s.add_argument("--answer-column", default="reference_answer")
    s.add_argument("--chunk-rows", type=int, default=10_000, help="rows per shard")
    s.set_defaults(fn=_cmd_import_prompts)

    s = sub.add_parser("tiny-model", help="build a tiny model from config",
                       description="Write a randomly initialised tiny Llama-style model and a "
                       "tokenizer trained in memory (safetensors; no hub).")
    s.add_argument("out")
    s.add_argument("--kind", choices=["causal", "reward"], default="causal")
    s.add_argument("--hidden", type=int, default=64)
    s.add_argument("--layers", type=int, default=2)
    s.add_argument("--heads", type=int, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_cmd_tiny_model)

    s = sub.add_parser("demo", help="run the main job on the embedded default",
                       description="The nightly loop on the embedded default, on CPU: a tiny "
                       "model trained here to a mediocre start on a copy task (cached under "
                       "WORKDIR), then generate -> score -> logprobs -> pairs -> DPO -> eval -> "
                       "report (pipelines/demo.toml). Prints held-out reward before and after.")
    s.add_argument("--workdir", default="demo_run", help="where the demo keeps everything")
    s.add_argument("--pipeline", default=str(Path(__file__).resolve().parent.parent / "pipelines" / "demo.toml"),
                   help="job file to run")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override job keys")
    s.set_defaults(fn=_cmd_demo)

    s = sub.add_parser("pipeline", help="run a job file (stages keyed by fingerprints)",
                       description="Run a pipeline job file stage by stage. A stage whose inputs "
                       "and options are unchanged is reused; the rest run (and resume).")
    psub = s.add_subparsers(dest="pipeline_command", metavar="run", required=True)
    r = psub.add_parser("run", help="run (or --dry-run: plan) a job file")
    r.add_argument("file")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override keys, e.g. stages.generate.num_samples=8")
    r.add_argument("--dry-run", action="store_true", help="print the plan: what is reused, what runs")
    r.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
    r.add_argument("--nights", type=int, metavar="N", default=None,
                   help="run the job N nights, each from the last night's policy (see docs/grpo.md; "
                        "a [nights] table in the file sets the rest)")
    r.set_defaults(fn=_cmd_pipeline)

    from .evaluate import EvalConfig, run_eval
    s = sub.add_parser("eval", help="evaluate a policy on held-out prompts",
                       description="Generate on held-out prompts, score, and compare with a "
                       "baseline: mean reward and components, win rate, KL to the reference, "
                       "response length; results.json and report.md with plots.")
    add_config_file_argument(s)
    add_arguments(s, EvalConfig)
    s.set_defaults(fn=_eval_command(EvalConfig, run_eval))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    try:
        return args.fn(args)
    except (InputError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        if args.debug:
            raise
        msg = str(e).replace("\n", " ")
        print(f"offline-rlhf {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
