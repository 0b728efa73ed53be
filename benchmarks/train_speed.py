"""Where a training step's time goes, and whether the training loop runs at the speed of the bare step.

One process, one machine, arms interleaved (min and median of the repeats), on a real collection
(``real_data.py``, emoji at 64 px: ``scratch_small``'s setting) or on precomputed features; batch 128:

  bare        the model step alone on batches loaded beforehand: forward, loss, backward, optimizer step
  step        ``Trainer.train_step`` on the same batches: the bare step + the trainer's bookkeeping
              (diagnostics, the collapse detector's value, gradient clipping, the non-finite checks)
  loop/...    ``Trainer.train_one_epoch`` for the same number of steps, data loading included, for each data
              option: ``w0`` (decoding in series with the step, no cache), ``w0+cache`` (the decoded-image
              cache, warm: the steady state of epochs after the first), ``w1`` (one loader worker)

    .venv/bin/python benchmarks/train_speed.py                      # emoji 64 px, scratch_small
    .venv/bin/python benchmarks/train_speed.py --features emoji_224_pooled --recipe pretrained_small
    .venv/bin/python benchmarks/train_speed.py --profile            # cProfile of the loop: time per phase
    .venv/bin/python benchmarks/train_speed.py --quick              # smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval_speed import load, machine_line  # noqa: E402

from vsekit.config import resolve_config  # noqa: E402
from vsekit.train.trainer import Trainer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = Path(__file__).resolve().parents[1] / "vsekit" / "configs"

# functions whose cumulative time makes up a step (cProfile names: file suffix, function)
PHASES = {
    "data (loader: decode, transform, collate)": [("dataloader.py", "__next__")],
    "forward (model.embed)": [("vse.py", "embed")],
    "objective (loss terms)": [("objective.py", "forward")],
    "backward": [("_tensor.py", "backward")],
    "optimizer step (+ grad scaler)": [("grad_scaler.py", "step")],
    "gradient clipping": [("clip_grad.py", "_clip_grads_with_norm_"), ("clip_grad.py", "_get_total_norm")],
    "diagnostics (batch_diagnostics)": [("monitor.py", "batch_diagnostics")],
    "collapse detector (collapse_value)": [("monitor.py", "collapse_value")],
    "logging (metrics.jsonl)": [("trainer.py", "_log")],
    "checkpoint hook": [("checkpointing.py", "after_step")],
}


def make_trainer(args: argparse.Namespace, out: Path, cache_mb: int = 0, extra: tuple[str, ...] = ()) -> Trainer:
    over = [*extra, f"output_dir={out}", f"data.image_cache_mb={cache_mb}", "seed=0", f"train.batch_size={args.batch}", "train.progress=false",
            "train.log_every=10", f"train.max_steps_per_epoch={args.steps}", "data.num_workers=0"]
    if args.features:
        over += ["data.format=precomp", f"data.path={Path(os.path.expanduser(args.cache)) / args.features}"]
    else:
        from real_data import prepare

        info = prepare(args.collection)
        over += ["data.format=karpathy", f"data.path={info['path']}", f"data.image_root={info['image_root']}"]
    return Trainer(resolve_config(CONFIGS / f"{args.recipe}.yaml", over))


def bare_step(tr: Trainer, batch: dict) -> None:
    """The model step with nothing around it (what a minimal hand-written loop does)."""
    b = batch.to(tr.device)
    out = tr.model.embed(b.images, b.text)
    loss = tr.loss_fn(out.sim, b.image_ids)
    tr.optim.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    tr.optim.optimizer.step()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def loop(tr: Trainer, workers: int) -> None:
    tr.cfg.data.num_workers = workers
    tr.batches_done = 0
    tr.train_one_epoch()


def speed(args: argparse.Namespace, tr: Trainer, cached: Trainer | None, bf16: Trainer | None = None) -> dict:
    n_pairs = args.steps * args.batch
    batches = list(b for _, b in zip(range(args.steps), tr.loader()))
    arms = {"bare": lambda: [bare_step(tr, b) for b in batches], "step": lambda: [tr.train_step(b) for b in batches],
            "loop/w0": lambda: loop(tr, 0)}
    if cached is not None:
        arms["loop/w0+cache"] = lambda: loop(cached, 0)  # warm after the warm-up pass: later epochs' state
    if bf16 is not None:
        arms["loop/w0+bf16"] = lambda: loop(bf16, 0)
    if args.reference:
        from reference_vsepp import ReferenceLoop

        m = tr.cfg.model
        ref = ReferenceLoop(Path(os.path.expanduser(args.cache)) / args.features, args.batch,
                            m.text_encoder["word_dim"], m.embed_size)
        arms["reference"] = lambda: ref.epoch(args.steps)
    arms["loop/w1"] = lambda: loop(tr, 1)
    times = {k: [] for k in arms}
    for fn in arms.values():  # warm-up: allocator, thread pools, the first worker start
        fn()
    for _ in range(args.repeats):
        for k, fn in arms.items():
            times[k].append(timed(fn))
    rate = {k: n_pairs / min(v) for k, v in times.items()}
    med = {k: n_pairs / statistics.median(v) for k, v in times.items()}
    return {"pairs_per_s_best": rate, "pairs_per_s_median": med, "steps": args.steps, "batch": args.batch}


def profile(args: argparse.Namespace, tr: Trainer) -> dict:
    loop(tr, 0)  # warm: the cache holds these steps' images, as in every epoch after the first
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(loop, tr, 0)
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats
    out = {}
    for phase, keys in PHASES.items():
        out[phase] = sum(v[3] for (file, _, fn), v in stats.items() if any(file.endswith(f) and fn == name
                                                                            for f, name in keys))
    out["other (python around the step, profiler overhead)"] = wall - sum(out.values())
    return {"wall_s": wall, "phases_s": out, "steps": args.steps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--collection", default="emoji", choices=["emoji", "tabler"])
    ap.add_argument("--features", help="precomputed features under --cache instead (e.g. emoji_224_pooled)")
    ap.add_argument("--cache", default="~/.cache/vsekit/benchmarks")
    ap.add_argument("--recipe", default=None, help="default: scratch_small, or pretrained_small with --features")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="also the loop with train.cpu_bf16=true")
    ap.add_argument("--reference", action="store_true",
                    help="also reference_vsepp.py's loop (VSE++ reference style; --features with a VSE++ recipe)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    args.recipe = args.recipe or ("pretrained_small" if args.features else "scratch_small")
    if args.quick:
        args.steps, args.repeats, args.batch = 2, 1, 32
    torch.manual_seed(0)
    print(f"# training speed: {args.recipe} on {args.features or args.collection}, batch {args.batch}, "
          f"{args.steps} steps per arm, {args.repeats} interleaved repeats")
    print(f"machine: {machine_line()}; load average at start: {load()}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.profile:
            result = profile(args, make_trainer(args, Path(tmp) / "run", cache_mb=512))
        else:
            cached = None if args.features else make_trainer(args, Path(tmp) / "cached", cache_mb=512)
            bf16 = make_trainer(args, Path(tmp) / "bf16", extra=("train.cpu_bf16=true",)) if args.bf16 else None
            result = speed(args, make_trainer(args, Path(tmp) / "run"), cached, bf16)
    print(f"load average at end: {load()}\n")
    if args.profile:
        print("| phase | seconds | share |")
        print("|---|---:|---:|")
        for k, v in result["phases_s"].items():
            print(f"| {k} | {v:.2f} | {100 * v / result['wall_s']:.0f} % |")
        print(f"| total ({args.steps} steps, warm cache) | {result['wall_s']:.2f} | 100 % |")
    else:
        best, med = result["pairs_per_s_best"], result["pairs_per_s_median"]
        base = "reference" if args.reference else "bare"
        print(f"| arm | pairs/s (best) | pairs/s (median) | vs {base} (best) | vs {base} (median) |")
        print("|---|---:|---:|---:|---:|")
        for k in best:
            print(f"| {k} | {best[k]:.0f} | {med[k]:.0f} | {best[k] / best[base]:.2f} | "
                  f"{med[k] / med[base]:.2f} |")
    result |= {"machine": machine_line(), "recipe": args.recipe, "data": args.features or args.collection}
    RESULTS.mkdir(exist_ok=True)
    tag = "_profile" if args.profile else "_reference" if args.reference else ""
    name = f"train_speed_{args.features or args.collection}{tag}.json"
    if not args.quick:
        (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
