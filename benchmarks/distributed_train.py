"""Training throughput of 1 process vs N processes (torch.distributed, gloo on CPU / NCCL on GPU), same global batch.

Each configuration trains the same recipe for the same number of steps from the same seed; the pairs/s of
the steps after a warm-up are read from ``metrics.jsonl``. On a CPU the comparison is 1 process using all
cores vs N processes sharing them (``--threads`` per process), so the ratio says what the gather and the
all-reduce cost, not what N machines would gain. On a GPU machine each process gets one GPU (``--amp``).

    .venv/bin/python benchmarks/distributed_train.py                 # CPU, 1 vs 2 processes
    .venv/bin/python benchmarks/distributed_train.py --device cuda --amp --procs 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as tmp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vsekit.config import resolve_config  # noqa: E402
from vsekit.train.trainer import Trainer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def overrides(out: Path, args) -> list[str]:
    return [f"output_dir={out}", "seed=0", "data.format=demo", "data.regions=grid", "data.val_max_images=50",
            "model.embed_size=512", "model.image_encoder.name=precomp", "model.text_encoder.word_dim=300",
            f"train.batch_size={args.batch}", "train.epochs=1", f"train.max_steps_per_epoch={args.steps}",
            "train.progress=false", "train.log_every=1", f"device={args.device}", f"train.amp={args.amp}",
            f"loss.name={args.loss}", "loss.reduction=max" if args.loss == "hinge" else "semantics.n_components=400"]


def _worker(rank: int, world: int, port: int, ov: list[str], threads: int) -> None:
    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(threads)
    try:
        Trainer(resolve_config(None, ov)).fit()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(world: int, args, root: Path) -> dict:
    out = root / f"w{world}"
    ov = overrides(out, args)
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    tmp.spawn(_worker, args=(world, port, ov, threads), nprocs=world, join=True)
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    # pairs_per_s is rank 0's cumulative rate since the epoch began: the time at step k is
    # k * local_batch / rate_k, so the steps after the warm-up took t_last - t_warmup
    local = args.batch // world
    times = [(k + 1) * local / r["pairs_per_s"] for k, r in enumerate(train)]
    per_step = (times[-1] - times[args.warmup - 1]) / (len(times) - args.warmup)
    return {"processes": world, "threads_per_process": threads, "steps": len(train),
            "step_s": per_step, "global_pairs_per_s": args.batch / per_step, "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=256, help="global batch")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / processes)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--loss", default="lseh", choices=["hinge", "lseh", "infonce"])
    p.add_argument("--tag", default="cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        os.environ.setdefault("VSEKIT_CACHE", str(Path(tmpdir) / "cache"))
        rows = [run(w, args, Path(tmpdir)) for w in args.procs]
    base = rows[0]["global_pairs_per_s"]
    for r in rows:
        r["ratio_vs_first"] = r["global_pairs_per_s"] / base
    info = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                       f"device {args.device}{' (AMP)' if args.amp else ''}",
            "batch": args.batch, "loss": args.loss, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"distributed_train_{args.tag}.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"| processes | threads each | step (s) | global pairs/s | vs {args.procs[0]} process(es) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} | {r['threads_per_process']} | {r['step_s']:.3f} | {r['global_pairs_per_s']:.0f} | "
              f"{r['ratio_vs_first']:.2f}x |")
    print(info["machine"])


if __name__ == "__main__":
    main()
