"""How fast is vsekit's retrieval evaluation, against the matmul it cannot avoid and the loop it replaces?

One run, one machine, interleaved repeats (minimum and median reported):
  (a) naive: the VSE++ reference loop in numpy (per image: scores, argsort, min rank over its captions;
      per image's captions: scores, argsort per caption), timed on a subset of queries and extrapolated;
  (b) bare: ``torch.mm`` of all images against all captions, nothing else;
  (c) ours: ``vsekit.eval.retrieval_metrics`` (both directions, all metrics).

    .venv/bin/python benchmarks/eval_speed.py              # COCO-5K sized: 5,000 x 25,000, D=1024
    .venv/bin/python benchmarks/eval_speed.py --quick      # smoke run, seconds
    .venv/bin/python benchmarks/eval_speed.py --memory 20000x100000   # bounded-memory demo, peak RSS
    .venv/bin/python benchmarks/eval_speed.py --budgets 4 16 64 256   # ours/bare for each block budget (MiB)
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vsekit.eval.metrics as metrics  # noqa: E402
from vsekit.eval import retrieval_metrics, retrieval_ranks  # noqa: E402


def unit_rows(n: int, dim: int, seed: int, chunk: int = 8192) -> np.ndarray:
    """Random L2-normalised float32 rows, generated in pieces (no float64 temporary of the whole)."""
    out = np.empty((n, dim), dtype=np.float32)
    gen = torch.Generator().manual_seed(seed)
    for a in range(0, n, chunk):
        x = torch.randn(min(chunk, n - a), dim, generator=gen)
        out[a : a + chunk] = torch.nn.functional.normalize(x, dim=1).numpy()
    return out


def naive_vsepp(images: np.ndarray, captions: np.ndarray, c2i: np.ndarray, image_ids, caption_images):
    """The reference loops for some queries: i2t ranks of ``image_ids``, t2i ranks of the captions of
    ``caption_images`` (VSE++ scores one image's captions per dot call)."""
    i2t = []
    for i in image_ids:
        inds = np.argsort(images[i] @ captions.T)[::-1]
        i2t.append(min(np.where(inds == j)[0][0] for j in np.flatnonzero(c2i == i)))
    t2i = []
    for i in caption_images:
        mine = np.flatnonzero(c2i == i)
        d = captions[mine] @ images.T
        for row in d:
            t2i.append(np.where(np.argsort(row)[::-1] == i)[0][0])
    return np.array(i2t), np.array(t2i)


def _stable_rank(scores: np.ndarray, target: int) -> int:
    """0-based position of ``target`` under (descending score, lower index first)."""
    return int((scores > scores[target]).sum() + (scores[:target] == scores[target]).sum())


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"numpy {np.__version__}, python {platform.python_version()}"
    )


def load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def block_shape(n: int, m: int, c2i: np.ndarray) -> tuple[int, int]:
    """The default (images, captions) block of ``retrieval_metrics`` on this CPU for these inputs."""
    return metrics._block_shape(n, m, None, torch.device("cpu"), 4, metrics._captions_per_image(c2i, n))


def budgets(args: argparse.Namespace) -> None:
    """ours/bare for each block budget, interleaved with the bare matmul (min and median of the repeats)."""
    n, m, dim = args.images, args.images * args.captions_per_image, args.dim
    images, captions = unit_rows(n, dim, seed=0), unit_rows(m, dim, seed=1)
    c2i = np.repeat(np.arange(n), args.captions_per_image)
    img_t, cap_t = torch.from_numpy(images), torch.from_numpy(captions)
    print(f"# eval block budgets: {n} images x {m} captions, D={dim}, float32, {args.repeats} interleaved repeats")
    print(f"machine: {machine_line()}; load average at start: {load()}")
    default = metrics.BLOCK_BUDGET["cpu"]
    bare, ours = [], {b: [] for b in args.budgets}
    try:
        for _ in range(args.repeats):
            bare.append(timed(lambda: torch.mm(img_t, cap_t.t())))
            for b in args.budgets:
                metrics.BLOCK_BUDGET["cpu"] = int(b * 2**20)
                ours[b].append(timed(lambda: retrieval_metrics(images, captions, c2i)))
    finally:
        metrics.BLOCK_BUDGET["cpu"] = default
    print(f"load average at end: {load()}\n")
    print("| block budget (MiB) | block (images x captions) | seconds (min) | seconds (median) | ours/bare (min) | (median) |")
    print("|---:|---|---:|---:|---:|---:|")
    print(f"| bare `torch.mm` | {n} x {m} | {min(bare):.2f} | {statistics.median(bare):.2f} | 1 | 1 |")
    for b in args.budgets:
        metrics.BLOCK_BUDGET["cpu"] = int(b * 2**20)
        R, C = block_shape(n, m, c2i)
        metrics.BLOCK_BUDGET["cpu"] = default
        t = ours[b]
        mark = " (default)" if int(b * 2**20) == default else ""
        print(f"| {b:g}{mark} | {R} x {C} | {min(t):.2f} | {statistics.median(t):.2f} | "
              f"{min(t) / min(bare):.3f} | {statistics.median(t) / statistics.median(bare):.3f} |")


def speed(args: argparse.Namespace) -> None:
    n, m, dim = args.images, args.images * args.captions_per_image, args.dim
    images, captions = unit_rows(n, dim, seed=0), unit_rows(m, dim, seed=1)
    c2i = np.repeat(np.arange(n), args.captions_per_image)
    img_t, cap_t = torch.from_numpy(images), torch.from_numpy(captions)
    R, C = block_shape(n, m, c2i)
    print(f"# eval speed: {n} images x {m} captions, D={dim}, float32, {args.repeats} interleaved repeats")
    print(f"machine: {machine_line()}")
    print(f"load average (1/5/15 min) at start: {load()}")

    # (a) naive, on a subset, extrapolated per query
    rng = np.random.default_rng(0)
    q_img = rng.choice(n, size=min(args.naive_queries, n), replace=False)
    q_cap = rng.choice(n, size=min(max(1, args.naive_queries // args.captions_per_image), n), replace=False)
    t0 = time.perf_counter()
    naive_i2t = naive_vsepp(images, captions, c2i, q_img, [])[0]
    t_i2t = time.perf_counter() - t0
    naive_t2i = naive_vsepp(images, captions, c2i, [], q_cap)[1]
    t_t2i = time.perf_counter() - t0 - t_i2t
    naive_measured = t_i2t + t_t2i
    naive = t_i2t / len(q_img) * n + t_t2i / len(naive_t2i) * m

    # (b) bare matmul and (c) ours, interleaved
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(timed(lambda: torch.mm(img_t, cap_t.t())))
        ours.append(timed(lambda: retrieval_metrics(images, captions, c2i)))
    print(f"load average at end: {load()}")

    # correctness on the timed queries: against the naive loop (numpy's BLAS rounds differently, so a
    # near-tie can flip), and against a stable sort of the bare product's rows/columns (same numbers)
    i2t, t2i = retrieval_ranks(images, captions, c2i)
    caps_of_q = np.concatenate([np.flatnonzero(c2i == i) for i in q_cap])
    ours_q = np.concatenate([i2t[q_img], t2i[caps_of_q]])
    naive_q = np.concatenate([naive_i2t, naive_t2i])
    S = torch.mm(img_t, cap_t.t()).numpy()
    ref_q = np.array(
        [min(_stable_rank(S[i], j) for j in np.flatnonzero(c2i == i)) for i in q_img]
        + [_stable_rank(S[:, j], c2i[j]) for j in caps_of_q]
    )
    del S

    b, o = min(bare), min(ours)
    print()
    print("| step | seconds (min) | seconds (median) | ratio |")
    print("|---|---:|---:|---|")
    print(
        f"| (a) naive VSE++ loop, numpy: {len(q_img)} i2t + {len(naive_t2i)} t2i queries timed "
        f"({naive_measured:.1f} s), extrapolated to all {n} + {m} | {naive:.1f} | - | "
        f"naive/ours = {naive / o:.0f}x |"
    )
    print(f"| (b) bare `torch.mm` {n} x {m} (product only) | {b:.2f} | {statistics.median(bare):.2f} | 1 |")
    print(
        f"| (c) `retrieval_metrics` ({R} x {C} blocks, both directions) | {o:.2f} | "
        f"{statistics.median(ours):.2f} | ours/bare = {o / b:.2f} |"
    )
    print()
    differ = int((ours_q != naive_q).sum())
    print(
        f"ranks of the {len(ours_q)} timed queries: identical to a stable sort of the bare product: "
        f"{np.array_equal(ours_q, ref_q)}; differing from the naive numpy loop: {differ}"
        + (
            f" (by at most {int(np.abs(ours_q - naive_q).max())}: float32 near-ties that numpy's BLAS rounds "
            "the other way)"
            if differ
            else ""
        )
    )
    print(
        f"targets: ours/bare <= 2: {o / b <= 2} ({o / b:.2f}); "
        f"naive/ours >= 20: {naive / o >= 20} ({naive / o:.0f}x)"
    )


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM, so the next peak is this step's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    hwm = _status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory(args: argparse.Namespace) -> None:
    n, m = (int(v) for v in args.memory.lower().split("x"))
    dim = args.dim
    print(f"# bounded memory: {n} images x {m} captions, D={dim}, float32")
    print(f"machine: {machine_line()}; load average at start: {load()}")
    images, captions = unit_rows(n, dim, seed=0), unit_rows(m, dim, seed=1)
    c2i = np.arange(m) % n  # m / n captions per image, interleaved
    rss_before = _status_mib("VmRSS") or peak_rss_mib()
    peak_reset = reset_peak_rss()
    t = timed(lambda: print(retrieval_metrics(images, captions, c2i)))
    peak = peak_rss_mib()
    R, C = block_shape(n, m, c2i)
    inputs = (images.nbytes + captions.nbytes) / 2**20
    print()
    print("| quantity | MiB |")
    print("|---|---:|")
    print(f"| inputs (images + captions, float32) | {inputs:.0f} |")
    print(f"| full {n} x {m} score matrix (never built) | {n * m * 4 / 2**20:.0f} |")
    print(f"| one {R} x {C} score block | {R * C * 4 / 2**20:.1f} |")
    print(f"| RSS before `retrieval_metrics` (python + torch + inputs) | {rss_before:.0f} |")
    label = "peak RSS during" if peak_reset else "peak RSS of the process up to the end of"
    print(f"| {label} `retrieval_metrics` | {peak:.0f} (+{peak - rss_before:.0f}) |")
    print(f"\nwall time {t:.1f} s; load average at end: {load()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--captions-per-image", type=int, default=5)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--naive-queries", type=int, default=250, help="images timed in the naive loop")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small smoke run (400 x 2000, D=128)")
    ap.add_argument(
        "--memory", metavar="NxM", help="instead: evaluate N images x M captions, report peak RSS"
    )
    ap.add_argument("--budgets", type=float, nargs="+", metavar="MIB",
                    help="instead: ours/bare at each of these block budgets (MiB of scores + hits)")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.dim, args.naive_queries, args.repeats = 400, 128, 40, 1
        if args.memory:
            args.memory = "2000x10000"
    if args.budgets:
        budgets(args)
    elif args.memory:
        memory(args)
    else:
        speed(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
