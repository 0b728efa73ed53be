"""The networks LSEH was evaluated on, each with the VSE++ loss and with LSEH, on the same real data.

Real data without downloadable region features: the emoji collection (``real_data.py``: npm packages, licences
there) is turned into precomputed *grid* features by a CNN trained here -- ``scratch_small`` (small CNN, InfoNCE,
from scratch) for ``--cnn-epochs`` on the raw images, then ``vsekit features extract --backbone vsekit:CKPT
--pool grid`` at twice the training resolution, which gives a 4 x 4 map = 16 regions of 256-d per image (the
SCAN/VSRN layout, memory-mapped), 2 captions per image. Every network then trains on those features for the
same number of epochs, per seed:

  network    image side / text side / similarity
  vsepp      region features flattened, one linear layer (the LSEH code's VSE++) / GRU / cosine
  vseinf     fc + MLP per region, GPO / bi-GRU + GPO / cosine
  vsrn       GCN region reasoning + GRU / GRU / cosine, + the caption-decoder term (weight 1)
  sgr, saf   regions / words / the learned SGR or SAF similarity network (sim_dim 32, as the demo recipes:
             at the paper's 256 one run would take most of an hour on these 2 cores), batch 32

Losses: ``vsepp`` = VSE++ max of hinges (margin 0.2), ``lseh`` = LSEH (alpha 0.185, lambda 0.025), both after one
epoch of the sum of hinges (with hardest negatives from the first step, the max of hinges collapsed here from
random weights: VSE++ test rsum 25.6 in a first run; see "Training from scratch on real data" for the same
finding on raw images). Reported: test rsum of the best-validation checkpoint, epochs to reach
95 % of the run's best validation rsum (the LSEH paper's "fewer epochs" claim), median step time and the
process's peak memory (each run is a subprocess).

    python benchmarks/networks.py prepare                       # CNN + grid features (cached)
    python benchmarks/networks.py run --seeds 0 1 2 --epochs 4  # every network x loss x seed, 2 at a time
    python benchmarks/networks.py report                        # the table for benchmarks/README.md
    python benchmarks/networks.py convergence --features emoji_224   # epochs to 95 % of the VSE++ arm's best
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _jobs import (
    RESULTS,
    ROOT,
    job_commands,
    mean_sd,
    print_result,
    read_results,
    run_jobs,
    train_keeping_best,
)
from real_data import cache_dir, prepare

OUT = RESULTS / "networks.jsonl"
# issue 22: the same networks on pretrained EfficientNet-Lite0 features (7 x 7 = 49 regions x 1280, and their mean)
# of two collections rendered at 224 px from vector sources (``pretrained_features.py prepare``)
PRETRAINED_OUT = RESULTS / "pretrained_networks.jsonl"
FEATURES = ("emoji_cnn", "emoji_224", "tabler_224")

# every (image, caption) pair of a batch goes through SGRAF's network: B^2 pairs a step, 23 pairs/s at B = 128
# on one core here (a 4-epoch run would take 17 min), so SGR and SAF train on batches of 32 (sgr_demo's size)
SGRAF_BATCH = ["train.batch_size=32"]
NETWORKS: dict[str, list[str]] = {
    "vsepp": ["model.image_encoder={name: precomp, pooling: flatten}", "model.text_encoder={name: gru}"],
    "vseinf": ["model.image_encoder={name: vse_infty}", "model.text_encoder={name: bigru_gpo}"],
    "vsrn": ["model.image_encoder={name: vsrn}", "model.text_encoder={name: gru}",
             "objective.terms.caption={weight: 1.0, condition: context, mode: xe}"],
    "sgr": ["model.image_encoder={name: sgraf_regions}", "model.text_encoder={name: sgraf_words}",
            "model.similarity={name: sgr, sim_dim: 32, sgr_step: 3}", *SGRAF_BATCH],
    "saf": ["model.image_encoder={name: sgraf_regions}", "model.text_encoder={name: sgraf_words}",
            "model.similarity={name: saf, sim_dim: 32}", *SGRAF_BATCH],
    # issue 22 only: the VSE++ paper's setting (one pooled vector per image, a linear map) and VSE-infinity with
    # the pretrained MiniLM sentence encoder (BERT, its learning rate x0.1, as VSE-infinity's BERT recipes)
    "vsepp_pooled": ["model.image_encoder={name: precomp}", "model.text_encoder={name: gru}"],
    # the VSE++ paper's schedule: lr 2e-4 for 15 epochs, then 2e-5 for 15 (run with --epochs 30)
    "vsepp_pooled_lr15": ["model.image_encoder={name: precomp}", "model.text_encoder={name: gru}",
                          "optim.lr_decay_every=15"],
    "vsepp_pooled_const": ["model.image_encoder={name: precomp}", "model.text_encoder={name: gru}",
                           "optim.lr_decay_every=1000"],  # its counterpart: lr 2e-4 throughout
    "vseinf_minilm": ["model.image_encoder={name: vse_infty}", "model.text_encoder={name: bert, pretrained: MINILM}",
                      "optim.lr_mult={text_encoder.bert: 0.1}"],
    # the same with MiniLM kept fixed (its outputs cached per caption: GRU-speed steps after the first epoch); a
    # deviation from VSE-infinity, which fine-tunes BERT
    "vseinf_minilm_frozen": ["model.image_encoder={name: vse_infty}",
                             "model.text_encoder={name: bert, pretrained: MINILM, finetune: false}"],
    # between the two: MiniLM's top two layers learning (x0.1) above its fixed, cached lower four
    "vseinf_minilm_top2": ["model.image_encoder={name: vse_infty}",
                           "model.text_encoder={name: bert, pretrained: MINILM, finetune: false, train_top_layers: 2}",
                           "optim.lr_mult={text_encoder.top: 0.1}"],
}
LOSSES = {  # both after one epoch of sum of hinges (from random weights the max of hinges collapses here)
    "vsepp": ["loss={name: hinge_warmup, margin: 0.2, warmup_epochs: 1}"],
    "lseh": ["loss={name: lseh, alpha: 0.185, lam: 0.025, reduction: max, warmup_epochs: 1}"],
    # the sum over negatives throughout (VSE0, and LSEH's per-pair margins summed): what the SGRAF demo recipes
    # train with, since SGRAF's scores collapsed under the max here
    "vse0": ["loss={name: hinge, margin: 0.2, reduction: sum}"],
    "lseh_sum": ["loss={name: lseh, alpha: 0.185, lam: 0.025, reduction: sum}"],
    # issue 22: on pretrained features, as the papers train: the max of hinges from the first step, no warm-up
    "vsepp_nw": ["loss={name: hinge, margin: 0.2, reduction: max}"],
    "lseh_nw": ["loss={name: lseh, alpha: 0.185, lam: 0.025, reduction: max}"],
    # issue 22's alpha/lambda sweep around the paper's (0.185, 0.025), max of hinges from the first step; lambda 0
    # is the control: a constant margin of alpha, the semantics switched off
    "lseh_nw_a185_l0": ["loss={name: lseh, alpha: 0.185, lam: 0.0, reduction: max}"],
    "lseh_nw_a185_l100": ["loss={name: lseh, alpha: 0.185, lam: 0.1, reduction: max}"],
    "lseh_nw_a100_l100": ["loss={name: lseh, alpha: 0.1, lam: 0.1, reduction: max}"],
    "lseh_nw_a100_l200": ["loss={name: lseh, alpha: 0.1, lam: 0.2, reduction: max}"],
    # the max of hinges with the trainer's default collapse handling (fallback), as a user runs it
    "vsepp_default": ["loss={name: hinge, margin: 0.2, reduction: max}", "train.collapse.action=fallback"],
}


def features_dir(features: str = "emoji_cnn", network: str = "") -> Path:
    if features == "emoji_cnn":
        return cache_dir() / "emoji_grid"
    return cache_dir() / f"{features}_{'pooled' if network.startswith('vsepp_pooled') else 'grid'}"


def results_file(features: str) -> Path:
    return OUT if features == "emoji_cnn" else PRETRAINED_OUT


def cmd_prepare(args) -> None:
    info = prepare("emoji")
    cnn = cache_dir() / "emoji_cnn"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if not (cnn / "best.pt").is_file():
        subprocess.run([sys.executable, "-m", "vsekit", "train", "scratch_small", "data.format=karpathy",
                        f"data.path={info['path']}", f"data.image_root={info['image_root']}",
                        f"train.epochs={args.cnn_epochs}", "train.progress=false", f"output_dir={cnn}"],
                       check=True, env=env, cwd=ROOT)
    feats = features_dir()
    if not (feats / "test_ims.npy").is_file():
        subprocess.run([sys.executable, "-m", "vsekit", "features", "extract", "--backbone", f"vsekit:{cnn / 'best.pt'}",
                        "--data", info["path"], "--image-root", info["image_root"], "--out", str(feats),
                        "--pool", "grid", "--image-size", "128", "--resize", "128", "--captions-per-image", "2"],
                       check=True, env=env, cwd=ROOT)
    print(f"grid features in {feats}")


def one_run(network: str, loss: str, seed: int, epochs: int, features: str, minutes: float, out_dir: str) -> dict:
    """Train one network x loss x seed (in this process) and return its numbers."""
    import torch

    from vsekit.config import resolve_config
    from vsekit.data.sources import load_split
    from vsekit.inference import Embedder

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    net = NETWORKS[network]
    if network.startswith("vseinf_minilm"):
        from pretrained_text_check import minilm_folder
        net = [o.replace("MINILM", str(minilm_folder())) for o in net]
    overrides = ["data.format=precomp", f"data.path={features_dir(features, network)}", "data.train_split=train",
                 "data.val_split=val", "data.test_split=test", "data.val_max_images=300", "text.min_count=2",
                 "model.embed_size=256", "train.batch_size=128", f"train.epochs={epochs}", "train.progress=false",
                 "optim.lr=2e-4", f"optim.lr_decay_every={max(1, epochs * 3 // 4)}", f"seed={seed}",
                 f"output_dir={out_dir}", *net, *LOSSES[loss]]
    if features != "emoji_cnn":
        # each arm trains with its own loss throughout: the collapse detector reports, it does not switch a run
        # to the sum of hinges (its default fallback), which would mix the two losses a claim compares; an arm
        # may set its own action (vsepp_default: what a user gets)
        overrides.insert(0, "train.collapse.action=warn")
    if network in ("sgr", "saf") and features != "emoji_cnn":
        # every validation scores 100 x 100 x captions pairs through the network (not 300: a third of the run's time
        # went to validating 300 images of 49 regions on one thread); the test still scores every pair
        overrides.append("data.val_max_images=100")
    if minutes > 0:  # equal time: the budget ends the run (mid-epoch too: that partial epoch is validated)
        overrides.append(f"train.max_minutes={minutes}")
    cfg = resolve_config(ROOT / "vsekit" / "configs" / "vsepp_base.yaml", overrides)
    train_s, stopped = train_keeping_best(cfg)
    emb = Embedder.from_checkpoint(Path(out_dir) / "best.pt")
    t1 = time.perf_counter()
    test = emb.evaluate(load_split(cfg.data, "test"))
    eval_s = time.perf_counter() - t1
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["pairs_per_s"] for r in records if r["kind"] == "train"]
    vals = [r["rsum"] for r in records if r["kind"] == "val"]
    best = max(vals)
    to95 = next(i + 1 for i, v in enumerate(vals) if v >= 0.95 * best)
    return {"network": network, "loss": loss, "seed": seed, "epochs": epochs, "features": features,
            "minutes": minutes, "epochs_run": len(vals),
            "test_rsum": test["rsum"],
            "test": test, "val_rsum": vals, "best_val_rsum": best, "epochs_to_95": to95,
            "step_s": cfg.train.batch_size / statistics.median(rates) if rates else None,
            "batch_size": cfg.train.batch_size, "train_s": train_s, "test_eval_s": eval_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "collapse_events": sum(r["kind"] == "collapse" for r in records), "stopped": stopped}


def cmd_one(args) -> None:
    print_result(one_run, args.network, args.loss, args.seed, args.epochs, args.features, args.minutes)


def _summary(r: dict) -> str:
    return (f"{r['network']:7s} {r['loss']:6s} seed {r['seed']}: test rsum {r['test_rsum']:.1f}, best val "
            f"{r['best_val_rsum']:.1f} at 95% after {r['epochs_to_95']} ep, step {r['step_s']:.3f}s, "
            f"{r['peak_rss_mb']:.0f} MB, {r['train_s']:.0f} s")


def _rows(features: str) -> list[dict]:
    return [r for r in read_results(results_file(features)) if r.get("features", "emoji_cnn") == features]


def cmd_run(args) -> None:
    done = {(r["network"], r["loss"], r["seed"], r["epochs"], r.get("minutes", 0)) for r in _rows(args.features)}
    jobs = [(n, lo, s, args.epochs, args.features, args.minutes) for s in args.seeds for n in args.networks
            for lo in args.losses if (n, lo, s, args.epochs, args.minutes) not in done]
    run_jobs(__file__, jobs, results_file(args.features), threads=args.threads, parallel=args.jobs,
             summary=_summary, cwd=ROOT)


def cmd_report(args) -> None:
    rows = _rows(args.features)
    longest = {n: max(r["epochs"] for r in rows if r["network"] == n) for n in {r["network"] for r in rows}}
    rows = [r for r in rows if r["epochs"] == longest[r["network"]]]  # each network's longest schedule
    print("| network | loss | epochs (or budget) | seeds | test rsum (mean ± sd) | best val rsum | epochs to 95 % of best | step (s) | "
          "peak RSS (MB) | collapse events | runs stopped by the collapse detector |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for network in NETWORKS:
        for loss in LOSSES:
            rs = [r for r in rows if r["network"] == network and r["loss"] == loss]
            if not rs:
                continue
            budget = (f"{rs[0]['minutes']:g} min ({statistics.mean(r['epochs_run'] for r in rs):.1f} ep)"
                      if rs[0].get("minutes") else rs[0]["epochs"])
            print(f"| {network} | {loss} | {budget} | {len(rs)} | {mean_sd([r['test_rsum'] for r in rs])} | "
                  f"{statistics.mean(r['best_val_rsum'] for r in rs):.1f} | "
                  f"{statistics.mean(r['epochs_to_95'] for r in rs):.1f} | "
                  f"{statistics.median(r['step_s'] for r in rs):.3f} | "
                  f"{max(r['peak_rss_mb'] for r in rs):.0f} | {sum(r['collapse_events'] for r in rs)} | "
                  f"{sum(bool(r.get('stopped')) for r in rs)} |")


def cmd_paired(args) -> None:
    """LSEH minus the VSE++ loss, seed by seed (the same seed: the same initial weights and batch order)."""
    rows = _rows(args.features)
    print("| network | losses | epochs (or budget) | test rsum difference per seed | mean | "
          "seeds where the first is ahead |")
    print("|---|---|---|---|---|---|")
    for network in NETWORKS:
        by = {(r["loss"], r["seed"], r["epochs"]): r["test_rsum"] for r in rows if r["network"] == network}
        for base, lseh in (("vsepp", "lseh"), ("vse0", "lseh_sum"), ("vsepp_nw", "lseh_nw"), ("vse0", "vsepp_nw")):
            pairs = sorted((s, e, by[(lseh, s, e)] - by[(base, s, e)]) for (lo, s, e) in by
                           if lo == base and (lseh, s, e) in by)
            if not pairs:
                continue
            epochs = max(e for _, e, _ in pairs)
            d = [x for _, e, x in pairs if e == epochs]
            minutes = {r.get("minutes") for r in rows if r["network"] == network and r["epochs"] == epochs}
            budget = f"{minutes.pop():g} min" if len(minutes) == 1 and None not in minutes and 0 not in minutes \
                else epochs
            print(f"| {network} | {lseh} − {base} | {budget} | {', '.join(f'{x:+.1f}' for x in d)} | "
                  f"{statistics.mean(d):+.1f} | {sum(x > 0 for x in d)} of {len(d)} |")


def cmd_convergence(args) -> None:
    """The LSEH paper's "fewer epochs" claim, per seed: the epochs each loss needs to reach 95 % of the VSE++ arm's
    best validation rsum (one target for both, the baseline's; "-" if never reached), at each network's longest
    equal-epoch schedule."""
    rows = [r for r in _rows(args.features) if not r.get("minutes")]
    print("| network | epochs | seed | VSE++ best val rsum (epoch) | target (95 %) | epochs to target: VSE++ / LSEH | "
          "LSEH best val rsum (epoch) |")
    print("|---|---|---|---|---|---|---|")
    for network in NETWORKS:
        by = {(r["loss"], r["seed"], r["epochs"]): r for r in rows if r["network"] == network}
        pairs = [(s, e) for (lo, s, e) in by if lo == "vsepp_nw" and ("lseh_nw", s, e) in by]
        if not pairs:
            continue
        epochs = max(e for _, e in pairs)
        for seed in sorted(s for s, e in pairs if e == epochs):
            base, lseh = by[("vsepp_nw", seed, epochs)], by[("lseh_nw", seed, epochs)]
            target = 0.95 * base["best_val_rsum"]

            def reach(vals: list[float], target: float = target) -> str:
                return next((str(i + 1) for i, v in enumerate(vals) if v >= target), "-")

            def peak(r: dict) -> str:
                return f"{r['best_val_rsum']:.1f} ({r['val_rsum'].index(r['best_val_rsum']) + 1})"

            print(f"| {network} | {epochs} | {seed} | {peak(base)} | {target:.1f} | "
                  f"{reach(base['val_rsum'])} / {reach(lseh['val_rsum'])} | {peak(lseh)} |")


def main() -> None:
    p, sub, r = job_commands(__doc__, run=cmd_run, one=cmd_one, report=cmd_report,
                             one_args=[("network", {}), ("loss", {}), ("seed", {"type": int}),
                                       ("epochs", {"type": int}), ("features", {"choices": FEATURES}),
                                       ("minutes", {"type": float})])
    sub.add_parser("paired").set_defaults(fn=cmd_paired)
    sub.add_parser("convergence", help="epochs to 95 % of the VSE++ arm's best, per seed").set_defaults(
        fn=cmd_convergence)
    for name in ("run", "report", "paired", "convergence"):
        sub.choices[name].add_argument("--features", choices=FEATURES, default="emoji_cnn",
                            help="emoji_cnn: the grid of a CNN trained here (issue 15); emoji_224 / tabler_224: "
                                 "pretrained EfficientNet-Lite0 features (issue 22)")
    r.add_argument("--networks", nargs="+", default=list(NETWORKS))
    r.add_argument("--losses", nargs="+", default=["vsepp", "lseh"], choices=list(LOSSES))
    r.add_argument("--epochs", type=int, default=4)
    r.add_argument("--minutes", type=float, default=0.0,
                   help="a training budget per run (train.max_minutes; 0: none); --epochs stays the cap")
    a = sub.add_parser("prepare")
    a.add_argument("--cnn-epochs", type=int, default=8)
    a.add_argument("--threads", type=int, default=2)
    a.set_defaults(fn=cmd_prepare)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
