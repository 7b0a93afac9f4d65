"""Ray executor overhead: `generate --executor ray` (Ray local mode) vs the single-process
stage, on the same CPU workload.

    python bench/ray_overhead.py [--prompts 192] [--chunk-prompts 8] [--cpus 2] [--repeats 2]

A tiny model from config (hidden 256, 2 layers), prompts of 10-60 tokens, K=4 samples,
24 chunks. Two pairs, each a Ray pool on a local instance of --cpus CPUs against the
plain stage in this process with the same torch threads per process (so the same
arithmetic, and outputs that must be equal in every column but created_at: checked):

- one actor of --cpus CPUs vs the local stage with --cpus threads: Ray's own cost
  (scheduling, the actor's writer, the driver), nothing else differing;
- --cpus actors of 1 CPU vs the local stage with 1 thread: what the pool buys.

Start-up is reported apart: ``ray.init``, and the time until the first actor has
loaded its model (process start, imports, model load) against the local model load.
The overhead is the rest: Ray's stage time after its first actor is ready over the
local stage time after its model loaded (target, issue 16: <= 1.25x). Prints a table
and saves JSON.
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


def local_run(args, model, prompts, out: Path, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
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


def same_rows(a: Path, b: Path) -> bool:
    read = lambda p: open_dataset(str(p)).read().drop_columns(["created_at"])  # noqa: E731
    return read(a).equals(read(b))


def span(xs: list[float]) -> str:
    return f"{min(xs):.2f}" if len(xs) == 1 or max(xs) - min(xs) < 0.005 else \
        f"{min(xs):.2f}-{max(xs):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=192)
    ap.add_argument("--chunk-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ray_overhead.json"))
    args = ap.parse_args()
    import ray
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    # (threads per process, Ray actors): one actor of all CPUs, one actor per CPU
    pairs = [(args.cpus, 1), (1, args.cpus)]
    runs: dict[str, list[dict]] = {}
    try:
        model, prompts = setup(tmp, args)
        t = time.perf_counter()
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.ERROR)
        ray_init = time.perf_counter() - t
        for r in range(args.repeats):
            for threads, actors in pairs:
                local, pool = f"local, {threads} thread(s)", f"ray, {actors} actor(s)"
                runs.setdefault(local, []).append(
                    local_run(args, model, prompts, tmp / f"local{threads}-{r}", threads))
                runs.setdefault(pool, []).append(
                    ray_run(args, model, prompts, tmp / f"ray{actors}-{r}", actors))
                assert same_rows(tmp / f"ray{actors}-{r}", tmp / f"local{threads}-{r}"), \
                    f"{pool} and {local} wrote different rows"
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    report(args, runs, ray_init)


def report(args, runs: dict, ray_init: float) -> None:
    chunks = -(-args.prompts // args.chunk_prompts)
    print(f"\ngenerate: {args.prompts} prompts x K=4, {args.max_new_tokens} new tokens, "
          f"{chunks} chunks, model hidden {args.hidden} x {args.layers} layers, {args.cpus} CPUs "
          f"(load average after: {os.getloadavg()[0]:.1f}); ray.init {ray_init:.1f} s\n")
    print(f"{'':<24}{'start-up s':>12}{'stage s':>14}{'Ray / local':>14}")
    res = {"args": vars(args), "ray_init_s": ray_init, "runs": runs, "overhead": {}}
    names = list(runs)
    for local, pool in zip(names[::2], names[1::2]):
        ratio = [r["stage_s"] / b["stage_s"] for r, b in zip(runs[pool], runs[local])]
        res["overhead"][f"{pool} / {local}"] = ratio
        for name, shown in ((local, ""), (pool, span(ratio) + "x")):
            rs = runs[name]
            print(f"{name:<24}{span([r['startup_s'] for r in rs]):>12}"
                  f"{span([r['stage_s'] for r in rs]):>14}{shown:>14}")
    print("\nstart-up: local = model load; Ray = until its first actor has loaded the model "
          "(process, imports, model).\nRay / local = stage time after start-up, against the "
          "local run with the same threads per process; target <= 1.25x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
