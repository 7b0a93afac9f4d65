"""Ray executor overhead: `generate --executor ray` (Ray local mode) vs the single-process
stage, on the same CPU workload.

    python bench/ray_overhead.py [--prompts 96] [--chunk-prompts 8] [--cpus 2] [--repeats 2]

A tiny model from config, prompts of 10-60 tokens, K=4 samples, enough chunks that
scheduling matters. The local run is the plain stage in this process (torch using all
--cpus threads); the Ray runs use a local instance of --cpus CPUs, with the pool as one
actor of all CPUs (the same arithmetic as local) and as one actor per CPU.

Start-up is reported apart: ``ray.init`` and the time until the first actor has loaded
its model (process start, imports, model load), against the local model load. The
overhead is the rest: Ray's stage time after its first actor is ready over the local
stage time after its model loaded (target, issue 16: <= 1.25x). Both outputs are
checked equal in their token ids. Prints a table and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from offline_rlhf.generation import GenerateConfig, plan_generate  # noqa: E402
from offline_rlhf.shards import ShardWriter, open_dataset  # noqa: E402
from offline_rlhf.stage import run_stage  # noqa: E402
from offline_rlhf.tiny import build_tiny_model, random_texts  # noqa: E402
from offline_rlhf.toy import prompt_id_for  # noqa: E402


def setup(tmp: Path, args) -> tuple[Path, str]:
    import pyarrow as pa

    from offline_rlhf.models import load_tokenizer
    model = build_tiny_model(tmp / "model", hidden=args.hidden, layers=args.layers,
                             heads=max(1, args.hidden // 64))
    prompts = random_texts(load_tokenizer(model), args.prompts, 10, 60, seed=0)
    with ShardWriter(str(tmp / "prompts"), "prompts") as w:
        w.write(0, pa.table({"prompt_id": [prompt_id_for(f"{i}:{p}") for i, p in enumerate(prompts)],
                             "prompt": prompts}))
        w.finish(total_chunks=1)
    return model, str(tmp / "prompts")


def config(args, model, prompts, out: Path, **executor) -> GenerateConfig:
    return GenerateConfig(prompts=prompts, output=str(out), policy=str(model), num_samples=4,
                          max_new_tokens=args.max_new_tokens, chunk_prompts=args.chunk_prompts,
                          device="cpu", **executor)


def local_run(args, model, prompts, out: Path) -> dict:
    plan = plan_generate(config(args, model, prompts, out))
    t = time.perf_counter()
    plan.worker.loaded  # noqa: B018  (model load, timed apart)
    load = time.perf_counter() - t
    t = time.perf_counter()
    m = run_stage(plan)
    return {"startup_s": load, "stage_s": time.perf_counter() - t, "rows": m["num_rows"]}


def ray_run(args, model, prompts, out: Path, actors: int) -> dict:
    cfg = config(args, model, prompts, out, executor="ray", ray_actors=actors,
                 ray_cpus_per_actor=args.cpus / actors)
    plan = plan_generate(cfg)
    t = time.perf_counter()
    m = run_stage(plan, cfg)
    total = time.perf_counter() - t
    ready = m["run"]["first_actor_ready_seconds"]
    return {"startup_s": ready, "actor_load_s": m["run"]["actor_load_seconds"],
            "stage_s": total - ready, "total_s": total, "rows": m["num_rows"],
            "chunks_retried": m["run"]["chunks_retried"]}


def same_tokens(a: Path, b: Path) -> bool:
    cols = ["prompt_id", "sample_index", "response_token_ids"]
    return open_dataset(str(a)).read(cols).equals(open_dataset(str(b)).read(cols))


def span(xs: list[float]) -> str:
    return f"{min(xs):.2f}" if len(xs) == 1 or max(xs) - min(xs) < 0.005 else \
        f"{min(xs):.2f}-{max(xs):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--chunk-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ray_overhead.json"))
    args = ap.parse_args()
    import ray
    import torch
    torch.set_num_threads(args.cpus)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    pools = sorted({1, args.cpus})
    runs: dict[str, list[dict]] = {"local": [], **{f"ray {n} actor(s)": [] for n in pools}}
    try:
        model, prompts = setup(tmp, args)
        t = time.perf_counter()
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.ERROR)
        ray_init = time.perf_counter() - t
        for r in range(args.repeats):
            runs["local"].append(local_run(args, model, prompts, tmp / f"local{r}"))
            for n in pools:
                out = tmp / f"ray{n}-{r}"
                runs[f"ray {n} actor(s)"].append(ray_run(args, model, prompts, out, n))
                assert same_tokens(out, tmp / f"local{r}"), "Ray and local rows differ"
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    report(args, runs, ray_init)


def report(args, runs: dict, ray_init: float) -> None:
    local = runs["local"]
    chunks = -(-args.prompts // args.chunk_prompts)
    print(f"\ngenerate: {args.prompts} prompts x K=4, {args.max_new_tokens} new tokens, "
          f"{chunks} chunks, model hidden {args.hidden} x {args.layers} layers, {args.cpus} CPUs "
          f"(load average before: {os.getloadavg()[0]:.1f}); ray.init {ray_init:.1f} s\n")
    print(f"{'':<22}{'start-up s':>12}{'stage s':>14}{'overhead':>12}")
    res = {"args": vars(args), "ray_init_s": ray_init, "runs": runs, "overhead": {}}
    for name, rs in runs.items():
        ratio = [r["stage_s"] / b["stage_s"] for r, b in zip(rs, local)]
        if name != "local":
            res["overhead"][name] = ratio
        print(f"{name:<22}{span([r['startup_s'] for r in rs]):>12}"
              f"{span([r['stage_s'] for r in rs]):>14}"
              f"{(span(ratio) + 'x') if name != 'local' else '':>12}")
    print("\nstart-up: local = model load; Ray = until its first actor has loaded the model "
          "(process, imports, model). overhead = Ray stage time after that / local stage "
          "time; target <= 1.25x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
