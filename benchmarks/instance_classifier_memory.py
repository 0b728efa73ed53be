"""Memory and time of one Dual-Path training step with a COCO-sized shared instance classifier, on CPU.

The classifier has one row per training image: 113,287 x 2048 on COCO (with restval), 29,783 x 2048 on the
paper's Flickr30K split. Each measurement runs in a fresh subprocess (so the peak RSS, ``ru_maxrss``, belongs
to that configuration alone) and reports the resident memory after set-up, the peak over the measured steps,
and the median step time (forward + backward + SGD Nesterov step with weight decay, the recipe's optimiser).

Configurations:
- ``head``: the instance-loss part alone: 2048-d features of both paths (leaf tensors standing in for the
  encoders) -> dropout -> the shared classifier -> cross-entropy on both paths, for K = 113,287 / 29,783 and
  K = 0 (no classifier: the baseline of the same process).
- ``full-stage1`` / ``full-stage2``: the whole model of `configs/dualpath_coco.yaml` (ResNet-50 at 224 px with
  random weights: weights do not change memory or time; dualpath head; the paper-size text CNN over a 20K-word
  vocabulary) at batch 32. Stage I: CNN frozen, instance loss only. Stage II: CNN trained, plus mining (eval
  forward of the batch's images and of 256 pool captions) and the ranking loss, weights 2 : 1 : 0.1.

    .venv/bin/python benchmarks/instance_classifier_memory.py            # everything (~10 min on 2 cores)
    .venv/bin/python benchmarks/instance_classifier_memory.py --only head
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

COCO_CLASSES, F30K_CLASSES, DIM, BATCH = 113_287, 29_783, 2048, 32


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


def worker_head(num_classes: int, steps: int) -> dict:
    from vsekit.losses.instance import InstanceLoss

    torch.manual_seed(0)
    img = torch.randn(BATCH, DIM).relu_().requires_grad_(True)
    txt = torch.randn(BATCH, DIM).relu_().requires_grad_(True)
    labels = torch.randint(max(num_classes, 1), (BATCH,))
    if num_classes:
        loss_fn = InstanceLoss(DIM, num_classes, dropout=0.5, bias=False)
        opt = sgd(loss_fn.parameters())
    rest = rss_mib()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        if num_classes:
            l_img, l_txt = loss_fn.pair(img, txt, labels)
            loss = l_img + 0.1 * l_txt
            opt.zero_grad(set_to_none=True)
        else:
            loss = (img.sum() + txt.sum()) * 0.0
        loss.backward()
        if num_classes:
            opt.step()
        times.append(time.perf_counter() - t0)
    return {"rss_after_setup_mib": rest, "peak_rss_mib": peak_mib(), "step_s": times}


class _RandomPool:
    """Stands in for the training corpus's CaptionPool: random 12-word captions of random images."""

    def __init__(self, vocab: int, num_images: int) -> None:
        self.vocab, self.num_images = vocab, num_images

    def sample(self, n: int) -> torch.Tensor:
        return torch.arange(n)

    def text(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(4, self.vocab, (len(idx), 14)), torch.full((len(idx),), 14)

    def image_ids(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.randint(self.num_images, (len(idx),))


def worker_full(stage: int, steps: int, num_classes: int) -> dict:
    from vsekit.config import resolve_config
    from vsekit.data.batch import Batch
    from vsekit.losses import build_loss
    from vsekit.models import build_model
    from vsekit.train.objective import build_objective
    from vsekit.train.stages import StagePlan

    torch.manual_seed(0)
    recipe = Path(__file__).resolve().parents[1] / "vsekit" / "configs" / "dualpath_coco.yaml"
    cfg = resolve_config(recipe, ["model.image_encoder.pretrained=false"])
    plan = StagePlan(cfg)
    scfg = plan.config(stage)
    vocab = 20_000
    model = build_model(cfg.model, vocab_size=vocab)
    model.image_encoder.set_finetune(bool(scfg.model.image_encoder["finetune"]))
    objective = build_objective(plan.configs(), build_loss(cfg.loss), feature_dim=DIM,
                                corpus=SimpleNamespace(num_images=num_classes))
    objective.set_weights(scfg.objective)
    if "mined" in objective.terms:
        objective.terms["mined"].pool = _RandomPool(vocab, num_classes)
    opt = sgd([*model.parameters(), *objective.terms.parameters()])
    images = torch.randn(BATCH, 3, 224, 224)
    tokens, lengths = torch.randint(4, vocab, (BATCH, 14)), torch.full((BATCH,), 14)
    ids = torch.randperm(num_classes)[:BATCH]
    model.train()
    rest = rss_mib()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = objective.prepare(model, Batch(images, (tokens, lengths), ids), model.train)
        neg = batch.negatives
        out = model.embed(images, (tokens, lengths), neg.text if neg else None)
        loss, parts = objective(out, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    n_model = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"rss_after_setup_mib": rest, "peak_rss_mib": peak_mib(), "step_s": times,
            "terms": sorted(parts), "model_params_m": n_model / 1e6, "trained_model_params_m": n_trained / 1e6}


def run_worker(args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", *args, "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="measured steps of the full model (the first is warm-up)")
    p.add_argument("--head-steps", type=int, default=12)
    p.add_argument("--only", choices=["head", "full"], default=None)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "instance_classifier_memory.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        kind = args.worker[0]
        if kind == "head":
            r = worker_head(int(args.worker[1]), args.head_steps)
        else:
            r = worker_full(int(args.worker[1]), args.steps, COCO_CLASSES)
        print(json.dumps(r))
        return 0

    rows = []
    if args.only in (None, "head"):
        for k in (0, F30K_CLASSES, COCO_CLASSES):
            r = run_worker(["head", str(k)], args.threads)
            rows.append({"config": f"head, K = {k:,}", **r})
            print(rows[-1]["config"], {k2: v for k2, v in r.items() if k2 != "step_s"}, flush=True)
    if args.only in (None, "full"):
        for stage in (0, 1):
            r = run_worker(["full", str(stage)], args.threads)
            rows.append({"config": f"full ResNet-50 + text CNN, stage {'I' if stage == 0 else 'II'}, K = 113,287", **r})
            print(rows[-1]["config"], {k2: v for k2, v in r.items() if k2 != "step_s"}, flush=True)

    lines = ["| configuration (batch 32, 2048-d, CPU fp32) | RSS after set-up (MiB) | peak RSS (MiB) | "
             "step time, median (s) |", "|---|---|---|---|"]
    for r in rows:
        steps = r["step_s"][1:] or r["step_s"]
        lines.append(f"| {r['config']} | {r['rss_after_setup_mib']:,.0f} | {r['peak_rss_mib']:,.0f} | "
                     f"{statistics.median(steps):.3f} |")
    w = COCO_CLASSES * DIM * 4 / 2**20
    lines += ["", f"Analytical, K = 113,287: W = {w:,.0f} MiB; its gradient and SGD momentum buffer {w:,.0f} MiB each "
              f"(Adam would add a second {w:,.0f} MiB moment); logits {BATCH * COCO_CLASSES * 4 / 2**20:.1f} MiB per "
              "path (and as much again for their gradient).",
              f"Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), torch "
              f"{torch.__version__}, {args.threads} threads."]
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "threads": args.threads}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
