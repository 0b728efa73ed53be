"""``train.cpu_bf16``: the same recipe in float32 and under CPU bfloat16 autocast, at equal epochs (issue 24).

Equal epochs = the same batches in the same order, so the test rsum says what the precision costs, and the wall
time says what it saves. Both arms of a seed run side by side (one thread each), on emoji (``real_data.py``):
``pretrained_small`` on the pooled EfficientNet-Lite0 features (``pretrained_features.py``) and
``scratch_small`` on the 64 px images, and ``vsepp_f30k_precomp`` (the VSE++ reference's model) on the pooled
features. One JSON line per run in ``results/cpu_bf16.jsonl``.

    python benchmarks/cpu_bf16.py run --recipes pretrained_small scratch_small --epochs 4
    python benchmarks/cpu_bf16.py report
"""

from __future__ import annotations

import statistics

from _jobs import (
    RESULTS,
    ROOT,
    cli_train_and_test,
    job_commands,
    mean_sd,
    print_result,
    read_results,
    run_jobs,
)
from pretrained_features import pooled_dir
from real_data import prepare

OUT = RESULTS / "cpu_bf16.jsonl"
# vsepp_f30k_precomp: the VSE++ reference's model on the same pooled features (train_speed.py --reference's pair)
RECIPES = ("pretrained_small", "scratch_small", "vsepp_f30k_precomp")


def data_overrides(recipe: str) -> list[str]:
    if recipe == "pretrained_small":
        return ["data.format=precomp", f"data.path={pooled_dir('emoji')}"]
    if recipe == "vsepp_f30k_precomp":
        return ["data.format=precomp", f"data.path={pooled_dir('emoji')}", "data.val_split=val"]
    info = prepare("emoji")
    return ["data.format=karpathy", f"data.path={info['path']}", f"data.image_root={info['image_root']}"]


def one_run(recipe: str, bf16: str, seed: int, epochs: int, out_dir: str) -> dict:
    wall, test, records = cli_train_and_test([recipe, *data_overrides(recipe), f"train.cpu_bf16={bf16}",
                                              f"seed={seed}", f"train.epochs={epochs}"], out_dir)
    rates = [r["pairs_per_s"] for r in records if r["kind"] == "train"]
    return {"recipe": recipe, "bf16": bf16 == "true", "seed": seed, "epochs": epochs, "test_rsum": test["rsum"],
            "best_val_rsum": max(r["rsum"] for r in records if r["kind"] == "val"), "wall_s": wall,
            "pairs_per_s_median": statistics.median(rates) if rates else None}


def cmd_one(args) -> None:
    print_result(one_run, args.recipe, args.bf16, args.seed, args.epochs)


def cmd_run(args) -> None:
    jobs = [(r, b, s, args.epochs) for r in args.recipes for s in args.seeds for b in ("false", "true")]
    run_jobs(__file__, jobs, OUT, threads=args.threads, parallel=args.jobs, cwd=ROOT,
             summary=lambda r: f"{r['recipe']} bf16={r['bf16']} seed {r['seed']}: test rsum {r['test_rsum']:.1f} "
                               f"({r['wall_s']:.0f} s)")


def cmd_report(args) -> None:
    rows = read_results(OUT)
    print("| recipe | epochs | seeds | test rsum float32 | test rsum bf16 | paired bf16 - float32 | wall time "
          "float32 / bf16 | training pairs/s float32 / bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for (recipe, epochs) in sorted({(r["recipe"], r["epochs"]) for r in rows}):
        by = {(r["bf16"], r["seed"]): r for r in rows if r["recipe"] == recipe and r["epochs"] == epochs}
        seeds = sorted(s for (b, s) in by if b and (False, s) in by)
        if not seeds:
            continue
        f32 = [by[False, s] for s in seeds]
        b16 = [by[True, s] for s in seeds]
        diff = " / ".join(f"{b['test_rsum'] - f['test_rsum']:+.1f}" for f, b in zip(f32, b16))
        wall = statistics.mean(f["wall_s"] / b["wall_s"] for f, b in zip(f32, b16))
        rate = statistics.mean(b["pairs_per_s_median"] / f["pairs_per_s_median"] for f, b in zip(f32, b16))
        print(f"| {recipe} | {epochs} | {len(seeds)} | {mean_sd([r['test_rsum'] for r in f32])} | "
              f"{mean_sd([r['test_rsum'] for r in b16])} | {diff} | {wall:.2f}× | {rate:.2f}× |")


def main() -> None:
    p, _, r = job_commands(__doc__, run=cmd_run, one=cmd_one, report=cmd_report,
                           one_args=[("recipe", {"choices": RECIPES}), ("bf16", {"choices": ["false", "true"]}),
                                     ("seed", {"type": int}), ("epochs", {"type": int})])
    r.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    r.add_argument("--epochs", type=int, default=4)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
