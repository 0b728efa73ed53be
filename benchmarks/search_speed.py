"""Search speed of the index kinds: exact FAISS (IndexFlatIP), IVF and HNSW, against plain NumPy.

N random unit vectors (1024-d float32) are searched with random unit queries, top-10. For each method:
queries/s and p50/p99 latency one query at a time and in batches, and recall@10 against exact search.
The FAISS indexes are built with vsekit's own builder (``vsekit.index.backends.faiss.build_faiss``) and defaults.

    .venv/bin/python benchmarks/search_speed.py                 # 100K and 1M (needs ~9 GiB, ~30 min)
    .venv/bin/python benchmarks/search_speed.py --quick         # smoke run: 20K vectors, a few seconds

Memory: the collection is generated in place in one array (1M x 1024 float32 = 4 GiB), and each FAISS index
(which holds its own copy) is built, measured and freed before the next one, so at most two copies live
at once. Random vectors in 1024 dimensions are the hard case for approximate search: every point is
almost equally far from every other, with no clusters to exploit; learned embeddings are kinder.
Results: the search section of benchmarks/README.md (the script writes its table to results/search_speed.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vsekit.index import AnnParams  # noqa: E402
from vsekit.index.backends.faiss import build_faiss, faiss_module  # noqa: E402

K = 10


def unit_vectors(n: int, d: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """(n, d) float32 rows on the unit sphere, generated chunk by chunk into one array (no full-size temps)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, chunk):
        block = out[a: a + chunk]
        rng.standard_normal(block.shape, dtype=np.float32, out=block)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return out


def numpy_search(x: np.ndarray, q: np.ndarray, k: int = K) -> np.ndarray:
    """The baseline: one matmul, argpartition for the top k, then sort those k."""
    s = q @ x.T
    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, top, 1), axis=1)
    return np.take_along_axis(top, order, 1)


def time_calls(fn: Callable[[np.ndarray], object], queries: np.ndarray, batch: int, budget_s: float,
               min_calls: int) -> dict[str, float]:
    """Run ``fn`` on consecutive batches of ``queries`` until ``budget_s`` is spent (at least ``min_calls``)."""
    fn(queries[:batch])  # warm-up: first-touch of pages, thread pools
    lat, done, start = [], 0, time.perf_counter()
    while True:
        a = (len(lat) * batch) % (len(queries) - batch + 1)
        t0 = time.perf_counter()
        fn(queries[a: a + batch])
        lat.append(time.perf_counter() - t0)
        done += batch
        if len(lat) >= min_calls and time.perf_counter() - start >= budget_s:
            break
        if len(lat) >= 20000:
            break
    lat_ms = np.array(lat) * 1000
    return {"qps": done / float(np.sum(lat)), "p50_ms": float(np.percentile(lat_ms, 50)),
            "p99_ms": float(np.percentile(lat_ms, 99)), "calls": len(lat)}


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found.tolist(), exact.tolist())]))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_size(n: int, d: int, args: argparse.Namespace) -> list[dict]:
    print(f"\n== N = {n:,} x {d} float32 ({n * d * 4 / 1024**3:.2f} GiB)", flush=True)
    t0 = time.perf_counter()
    x = unit_vectors(n, d, seed=0)
    queries = unit_vectors(max(args.recall_queries, args.batch * 4, 1000), d, seed=1)
    print(f"   data generated in {time.perf_counter() - t0:.1f} s", flush=True)
    rq = queries[: args.recall_queries]
    rows: list[dict] = []

    def measure(method: str, params: str, search: Callable[[np.ndarray], np.ndarray], build_s: float) -> None:
        single = time_calls(search, queries, 1, args.budget, min_calls=5)
        batched = time_calls(search, queries, args.batch, args.budget, min_calls=3)
        found = np.concatenate([search(rq[a: a + args.batch]) for a in range(0, len(rq), args.batch)])
        row = {"n": n, "dim": d, "method": method, "params": params, "build_s": build_s,
               "single": single, "batched": batched, "batch": args.batch, "recall_at_10": recall(found, exact)}
        rows.append(row)
        print(f"   {method:<14} {params:<22} build {build_s:7.1f} s | single {single['qps']:9.1f} q/s "
              f"p50 {single['p50_ms']:8.2f} ms p99 {single['p99_ms']:8.2f} ms | batch {batched['qps']:9.1f} q/s "
              f"p50 {batched['p50_ms']:8.1f} ms p99 {batched['p99_ms']:8.1f} ms | recall@10 "
              f"{row['recall_at_10']:.3f} | peak RSS {peak_rss_gib():.1f} GiB", flush=True)

    # exact FAISS first: its answers are the ground truth for every recall below
    t0 = time.perf_counter()
    flat = build_faiss(x, "exact", AnnParams())
    build = time.perf_counter() - t0
    exact = np.concatenate([flat.search(rq[a: a + args.batch], K)[1] for a in range(0, len(rq), args.batch)])
    measure("faiss exact", "IndexFlatIP", lambda q: flat.search(q, K)[1], build)
    flat = None  # free its copy of the collection before the next one is made
    gc.collect()
    measure("numpy", "matmul+argpartition", lambda q: numpy_search(x, q), 0.0)

    nlist = max(1, round(np.sqrt(n)))
    t0 = time.perf_counter()
    ivf = build_faiss(x, "ivf", AnnParams(nlist=nlist))
    build = time.perf_counter() - t0
    for nprobe in args.nprobe:
        ivf.nprobe = min(nprobe, nlist)
        measure("faiss IVF", f"nlist={nlist} nprobe={ivf.nprobe}", lambda q: ivf.search(q, K)[1], build)
    ivf = None
    gc.collect()

    p = AnnParams(hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
    t0 = time.perf_counter()
    hnsw = build_faiss(x, "hnsw", p)
    build = time.perf_counter() - t0
    for ef in args.ef_search:
        hnsw.hnsw.efSearch = ef
        measure("faiss HNSW", f"M={p.hnsw_m} efC={p.ef_construction} ef={ef}", lambda q: hnsw.search(q, K)[1], build)
    hnsw = x = None
    gc.collect()
    return rows


def machine() -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    faiss = faiss_module()
    return {"cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "numpy": np.__version__, "faiss": faiss.__version__, "faiss_threads": str(faiss.omp_get_max_threads()),
            "date": dt.date.today().isoformat(), "load_average_at_start": " ".join(f"{v:.1f}" for v in os.getloadavg())}


def markdown(rows: list[dict], info: dict[str, str], args: argparse.Namespace) -> str:
    lines = [
        "# Search speed: exact and approximate FAISS indexes vs NumPy",
        "",
        f"Command: `.venv/bin/python benchmarks/search_speed.py {' '.join(sys.argv[1:])}`".rstrip() + "  ",
        f"Machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, NumPy {info['numpy']}, "
        f"faiss-cpu {info['faiss']} ({info['faiss_threads']} OpenMP threads); {info['date']}; "
        f"load average at start {info['load_average_at_start']} (the machine is shared).",
        "",
        f"Data: N random unit vectors, {rows[0]['dim']}-d float32; random unit queries; top-{K}. "
        f"Single = one query per call; batched = {args.batch} queries per call (latency per call). "
        f"Recall@10 against exact search on {args.recall_queries} queries. Build = index construction "
        "(IVF: k-means training on a sample + adding; HNSW: graph insertion).",
        "",
        "| N | method | parameters | build s | single q/s | single p50 ms | single p99 ms "
        "| batched q/s | batch p50 ms | batch p99 ms | recall@10 |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s, b = r["single"], r["batched"]
        lines.append(f"| {r['n']:,} | {r['method']} | {r['params']} | {r['build_s']:.1f} | {s['qps']:,.1f} | "
                     f"{s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {b['qps']:,.1f} | {b['p50_ms']:.1f} | "
                     f"{b['p99_ms']:.1f} | {r['recall_at_10']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 20K vectors, short timings")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256, help="queries per batched call")
    p.add_argument("--budget", type=float, default=8.0, help="seconds of timing per method and mode")
    p.add_argument("--recall-queries", type=int, default=1000)
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--ef-search", type=int, nargs="+", default=[64, 256])
    p.add_argument("--hnsw-m", type=int, default=AnnParams().hnsw_m)
    p.add_argument("--ef-construction", type=int, default=AnnParams().ef_construction)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "search_speed.md"), help="markdown results")
    p.add_argument("--json", help="also write the raw results here")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.budget, args.recall_queries = [20_000], 1.0, 200
        if args.out == str(Path(__file__).parent / "results" / "search_speed.md"):
            args.out = None  # a smoke run does not overwrite the published table
    info = machine()
    print(json.dumps(info), flush=True)
    rows = [r for n in args.sizes for r in run_size(n, args.dim, args)]
    text = markdown(rows, info, args)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
