"""Search backends on learned embeddings: per-query latency (p50/p95, one query per call and batches of
queries) and recall@10 against exact search, for vsekit's exact kind (NumPy on a memory map), the FAISS
IndexFlatIP it replaced, FAISS IVF and HNSW, Qdrant through the Python client's local mode, and Qdrant's
engine (HNSW) in-process.

Data (learned, not i.i.d. random): the distinct captions of the demo set a checkpoint was trained on, embedded
by that checkpoint (default ``runs/demo_vsepp/best.pt``: ``make demo``, i.e. ``vsekit train demo_vsepp``),
are the first rows of the collection; the other rows, up to N, are new points of the same distribution, each
``normalize((1 - a) * c_i + a * c_j + s * e / |e|)`` for two random real captions c_i, c_j, a ~ U(0, 0.5),
Gaussian e and s = 0.05. Queries are the embeddings of the demo set's test images (image -> text search),
whose own captions are in the collection. Embeddings are cached under
``$VSEKIT_CACHE/benchmarks/search_backends/`` (a rerun does not encode again).

    .venv/bin/python benchmarks/search_backends.py                    # 100K and 1M, ~6 min on 2 busy cores
    .venv/bin/python benchmarks/search_backends.py --quick            # 20K vectors: a smoke run

Every method is searched through vsekit's own classes where vsekit has one (``NumpyExact`` over the ``.npy``
opened with ``mmap_mode="r"``, ``build_faiss`` for FAISS, ``QdrantBackend`` on ``QdrantClient(":memory:")``),
so the numbers include what vsekit adds (blocking, tie rule, the id -> row map of Qdrant hits). Qdrant's local
mode is a brute-force NumPy scan in Python, *not* the server's HNSW: a server is needed to measure that (none
is available here); pass ``--qdrant-url`` to measure one (untested here: no server). Qdrant's engine itself --
its segments and HNSW, in-process, without the server's network layer -- is measured through
``qdrant-edge-py`` (the ``bench`` extra: ``pip install -e '.[bench]'``; skipped with a message when absent),
``--methods numpy qdrant-edge`` for that alone. Local mode is loaded up
to 200K points only: its insert costs O(N) per point (half an hour for 1M here). HNSW is built up to 200K
only (at 1M its build alone would take most of the time budget on two cores). Results:
benchmarks/results/search_backends.json and .md, and the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

K = 10
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/demo_vsepp/best.pt",
                   help="the model whose embeddings are searched (default: the one `make demo` trains)")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--quick", action="store_true", help="smoke run: 20K vectors, short timings, no files written")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS / OpenMP threads (default 1: on a shared 2-core machine a second thread mostly "
                        "waits for a core, which rounds latencies up to the scheduler's time slice)")
    p.add_argument("--batch", type=int, default=64, help="queries per batched call (default 64)")
    p.add_argument("--budget", type=float, default=5.0, help="seconds of timing per method and mode (default 5)")
    p.add_argument("--recall-queries", type=int, default=256, help="queries for recall@10 (default 256)")
    p.add_argument("--hnsw-max", type=int, default=200_000, help="largest N that gets an HNSW index")
    p.add_argument("--qdrant-local-max", type=int, default=200_000,
                   help="largest N loaded into Qdrant's local mode: its insert is O(N) per point (the time per "
                        "10K points grows from 2 s at 10K to 7.6 s at 160K here), about half an hour for 1M")
    p.add_argument("--qdrant-url", help="also measure a Qdrant server (its HNSW) at this URL")
    p.add_argument("--methods", nargs="+", default=["numpy", "faiss", "qdrant-local", "qdrant-edge"],
                   choices=["numpy", "faiss", "qdrant-local", "qdrant-edge"],
                   help="what to measure (numpy exact search is always the recall reference)")
    p.add_argument("--noise", type=float, default=0.05, help="norm s of the noise of the synthetic rows")
    p.add_argument("--out", default=str(RESULTS / "search_backends.json"))
    return p.parse_args()


ARGS = parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy is imported
    os.environ[var] = str(ARGS.threads)
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vsekit.index.backends import NumpyExact, QdrantBackend  # noqa: E402
from vsekit.index.backends.faiss import build_faiss, faiss_module  # noqa: E402
from vsekit.index.backends.qdrant import qdrant_module  # noqa: E402
from vsekit.index.data import AnnParams, IndexData  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_speed import machine as search_speed_machine  # noqa: E402


# -- the data -------------------------------------------------------------------------------------------------
def learned_embeddings(checkpoint: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(distinct caption embeddings, test image embeddings, facts), cached by the model's fingerprint."""
    from vsekit.data.sources import load_split
    from vsekit.inference import Embedder
    from vsekit.utils.io import cache_root

    if not Path(checkpoint).exists():
        sys.exit(f"{checkpoint}: no such checkpoint; train one with `make demo` (or `vsekit train demo_vsepp "
                 "train.epochs=1`), or pass --checkpoint")
    emb = Embedder.from_checkpoint(checkpoint, device="cpu")
    cache = cache_root() / "benchmarks" / "search_backends" / f"{emb.fingerprint}.npz"
    splits = {s: load_split(emb.config.data, s) for s in ("train", "val", "test")}
    captions = list(dict.fromkeys(c for corpus in splits.values() for c in corpus.captions))
    facts = {"checkpoint": str(checkpoint), "fingerprint": emb.fingerprint, "similarity": emb.similarity,
             "data": f"demo set of the checkpoint ({sum(c.num_images for c in splits.values())} images)",
             "distinct_captions": len(captions), "query_images": splits["test"].num_images}
    if cache.is_file():
        with np.load(cache) as z:
            return z["captions"], z["images"], facts
    t0 = time.perf_counter()
    cap = emb.encode_texts(captions, batch_size=512, progress=True)
    img = emb.encode_images(splits["test"], batch_size=256, progress=True)
    print(f"   embedded {len(cap)} captions and {len(img)} images in {time.perf_counter() - t0:.0f} s", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, captions=cap, images=img)
    return cap, img, facts


def collection_file(real: np.ndarray, n: int, path: Path, noise: float, seed: int = 0,
                    chunk: int = 65536) -> np.ndarray:
    """``n`` rows written to ``path`` (.npy) and opened read-only as a memory map, as an index's vectors are:
    the real rows first, then mixtures of two real rows plus noise (see the module docstring)."""
    m, d = real.shape
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    out[: min(m, n)] = real[:n]
    rng = np.random.default_rng(seed)
    for a in range(m, n, chunk):
        b = min(a + chunk, n)
        i, j = rng.integers(0, m, b - a), rng.integers(0, m, b - a)
        mix = rng.uniform(0, 0.5, (b - a, 1)).astype(np.float32)
        e = rng.standard_normal((b - a, d), dtype=np.float32)
        v = (1 - mix) * real[i] + mix * real[j] + noise * e / np.linalg.norm(e, axis=1, keepdims=True)
        out[a:b] = v / np.linalg.norm(v, axis=1, keepdims=True)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def records(n: int) -> list[dict]:
    return [{"id": str(i)} for i in range(n)]


# -- timing ---------------------------------------------------------------------------------------------------
Search = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def time_calls(search: Search, queries: np.ndarray, batch: int, budget_s: float, min_calls: int,
               max_calls: int) -> tuple[list[float], np.ndarray]:
    """Latencies (ms) of consecutive calls on ``batch`` queries each, until ``budget_s`` is spent (at least
    ``min_calls``, at most ``max_calls``), and the rows they returned."""
    lat, found, start = [], [], time.perf_counter()
    for c in range(max_calls):
        q = queries[c * batch: (c + 1) * batch]
        if len(q) < batch:
            break
        t0 = time.perf_counter()
        found.append(search(q)[1][:, :K])
        lat.append((time.perf_counter() - t0) * 1000)
        if c + 1 >= min_calls and time.perf_counter() - start >= budget_s:
            break
    return lat, np.concatenate(found)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / K for f, e in zip(found.tolist(), exact.tolist())]))


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def anon_rss_gib() -> float:
    """The process's private (anonymous) resident memory: what a structure holds in RAM. Pages of a
    memory-mapped file are not counted: they are the OS page cache, shared and reclaimable. Freed memory is
    handed back to the OS first (glibc keeps freed heap pages otherwise, and the next structure reuses them)."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the numbers may then be low
        pass
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
    return kib / 1024**2


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


# -- one size -------------------------------------------------------------------------------------------------
def run_size(n: int, real: np.ndarray, queries: np.ndarray, tmp: Path, args: argparse.Namespace) -> list[dict]:
    d = real.shape[1]
    print(f"\n== N = {n:,} x {d} float32 ({n * d * 4 / 1024**3:.2f} GiB)", flush=True)
    t0 = time.perf_counter()
    x = collection_file(real, n, tmp / f"vectors-{n}.npy", args.noise)
    recs = records(n)
    print(f"   collection written and memory-mapped in {time.perf_counter() - t0:.1f} s", flush=True)
    rq = queries[: args.recall_queries]
    rows: list[dict] = []

    gc.collect()
    anon0 = anon_rss_gib()
    exact_backend = NumpyExact("exact", AnnParams())
    exact_backend.build(IndexData(x, recs))
    t0 = time.perf_counter()
    exact_s, exact = exact_backend.search("images", rq, K)
    print(f"   exact top-{K} of {len(rq)} queries in {time.perf_counter() - t0:.1f} s; mean score at rank 1 "
          f"{exact_s[:, 0].mean():.3f}, at rank 10 {exact_s[:, -1].mean():.3f}", flush=True)

    def measure(method: str, params: str, search: Search, build_s: float, anon0: float, note: str = "") -> None:
        gc.collect()
        single, _ = time_calls(search, queries, 1, args.budget, min_calls=5, max_calls=len(queries))
        batched, found = time_calls(search, rq, args.batch, args.budget, min_calls=1,
                                    max_calls=max(1, len(rq) // args.batch))
        row = {"n": n, "dim": d, "method": method, "params": params, "build_s": round(build_s, 2),
               "single_p50_ms": pct(single, 50), "single_p95_ms": pct(single, 95), "single_calls": len(single),
               "batch": args.batch, "batch_p50_ms": pct(batched, 50), "batch_p95_ms": pct(batched, 95),
               "batch_calls": len(batched), "batch_ms_per_query": pct(batched, 50) / args.batch,
               "recall_at_10": recall(found, exact[: len(found)]), "recall_queries": len(found),
               "ram_held_gib": round(anon_rss_gib() - anon0, 2), "peak_rss_gib": round(peak_rss_gib(), 2),
               "note": note}
        rows.append(row)
        print(f"   {method:<16} {params:<26} build {build_s:6.1f} s | single p50 {row['single_p50_ms']:8.2f} "
              f"p95 {row['single_p95_ms']:8.2f} ms ({len(single)}) | batch of {args.batch} p50 "
              f"{row['batch_p50_ms']:8.1f} p95 {row['batch_p95_ms']:8.1f} ms ({len(batched)}) | recall@10 "
              f"{row['recall_at_10']:.3f} on {len(found)} | RAM held {row['ram_held_gib']:.2f} GiB", flush=True)

    measure("numpy exact", "NumpyExact on memmap", lambda q: exact_backend.search("images", q, K), 0.0, anon0,
            "vsekit's exact kind: no second copy")

    if "faiss" in args.methods:
        _faiss_rows(x, n, args, measure)
    if "qdrant-edge" in args.methods:
        _qdrant_edge_rows(x, tmp / f"edge-{n}", measure)
    _qdrant_client_rows(x, recs, n, args, measure)
    x = None
    gc.collect()
    return rows


def _faiss_rows(x: np.ndarray, n: int, args: argparse.Namespace, measure) -> None:
    gc.collect()
    anon0, t0 = anon_rss_gib(), time.perf_counter()
    flat = build_faiss(x, "exact", AnnParams())
    measure("faiss flat", "IndexFlatIP", lambda q: flat.search(q, K), time.perf_counter() - t0, anon0,
            "what vsekit's exact kind held before: a copy in RAM")
    flat = None

    gc.collect()
    anon0, t0 = anon_rss_gib(), time.perf_counter()
    ivf = build_faiss(x, "ivf", AnnParams())
    build = time.perf_counter() - t0
    for nprobe in (16, 64):
        ivf.nprobe = min(nprobe, ivf.nlist)
        measure("faiss ivf", f"nlist={ivf.nlist} nprobe={ivf.nprobe}", lambda q: ivf.search(q, K), build, anon0)
    ivf = None

    if n <= args.hnsw_max:
        p = AnnParams()
        gc.collect()
        anon0, t0 = anon_rss_gib(), time.perf_counter()
        hnsw = build_faiss(x, "hnsw", p)
        build = time.perf_counter() - t0
        for ef in (64, 256):
            hnsw.hnsw.efSearch = ef
            measure("faiss hnsw", f"M={p.hnsw_m} efC={p.ef_construction} ef={ef}", lambda q: hnsw.search(q, K),
                    build, anon0)
        hnsw = None


def _qdrant_edge_rows(x: np.ndarray, path: Path, measure) -> None:
    """Qdrant's own engine in-process (qdrant-edge-py: the server's segments and HNSW, no network hop), HNSW at
    vsekit's ANN defaults (M 32, ef_construct 40), built on one thread, searched at ef 64 and 256."""
    try:
        import qdrant_edge as qe
    except ImportError:
        print("   qdrant edge      skipped: qdrant-edge-py is not installed (pip install -e '.[bench]')", flush=True)
        return
    p = AnnParams()
    gc.collect()
    anon0, t0 = anon_rss_gib(), time.perf_counter()
    config = qe.EdgeConfig(
        vectors=qe.EdgeVectorParams(size=x.shape[1], distance=qe.Distance.Dot),
        hnsw_config=qe.HnswIndexConfig(m=p.hnsw_m, ef_construct=p.ef_construction, full_scan_threshold=1000,
                                       max_indexing_threads=1),
        optimizers=qe.EdgeOptimizersConfig(indexing_threshold=1000, default_segment_number=1), max_search_threads=1)
    shard = qe.EdgeShard.create(str(path), config)
    for start in range(0, len(x), 10_000):
        block = np.asarray(x[start:start + 10_000])
        shard.update(qe.UpdateOperation.upsert_points([qe.Point(start + i, v.tolist()) for i, v in enumerate(block)]))
    shard.optimize()  # builds the HNSW graph of the segments, blocking
    build = time.perf_counter() - t0
    segments = shard.info().segments_count

    def search(queries: np.ndarray, ef: int) -> tuple[np.ndarray, np.ndarray]:
        requests = [qe.QueryRequest(limit=K, query=qe.Query.Nearest(v.tolist()), params=qe.SearchParams(hnsw_ef=ef))
                    for v in queries]
        hits = [shard.query(requests[0])] if len(requests) == 1 else shard.query_batch(qe.QueryBatchRequest(requests))
        return (np.array([[h.score for h in r] for r in hits], np.float32),
                np.array([[h.id for h in r] for r in hits], np.int64))

    for ef in (64, 256):
        measure("qdrant edge", f"HNSW M={p.hnsw_m} efC={p.ef_construction} ef={ef}", lambda q, e=ef: search(q, e),
                build, anon0, f"Qdrant's engine in-process (qdrant-edge-py), {segments} segment(s)")
    shard.close()


def _qdrant_client_rows(x: np.ndarray, recs: list[dict], n: int, args: argparse.Namespace, measure) -> None:
    local = [("qdrant local", (":memory:",), "client's local mode: brute-force NumPy scan in Python, not the "
              "server's HNSW")] if n <= args.qdrant_local_max and "qdrant-local" in args.methods else []
    if not local and "qdrant-local" in args.methods:
        print(f"   qdrant local     skipped: N > --qdrant-local-max {args.qdrant_local_max:,} (its insert is "
              "quadratic in N)", flush=True)
    server = [("qdrant server", (), f"server at {args.qdrant_url}: HNSW")] if args.qdrant_url else []
    for label, client_args, note in local + server:
        qc = qdrant_module()
        client = qc.QdrantClient(*client_args) if client_args else qc.QdrantClient(url=args.qdrant_url)
        kind = "exact" if client_args else "hnsw"
        backend = QdrantBackend(kind, AnnParams(), url=None, path=None, dim=None, client=client,
                                collections={"images": f"bench-{n}"})
        gc.collect()
        anon0, t0 = anon_rss_gib(), time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # local mode warns past 20,000 points that it is for small sets
            backend.build(IndexData(x, recs))
        if not client_args:  # a server builds its HNSW graph in the background: wait until it is done
            while client.get_collection(f"bench-{n}").status != qc.models.CollectionStatus.GREEN:
                time.sleep(1)
        measure(label, "Distance.DOT" + (" exact" if kind == "exact" else f" hnsw ef={AnnParams().ef_search}"),
                lambda q, b=backend: b.search("images", q, K), time.perf_counter() - t0, anon0, note)
        client.delete_collection(f"bench-{n}")
        client.close()
        backend = client = None


def machine(args: argparse.Namespace) -> dict[str, str]:
    """search_speed.py's machine description, with the thread count set first and the versions this one adds."""
    from importlib.metadata import version

    faiss_module().omp_set_num_threads(args.threads)
    info = search_speed_machine()
    info.pop("faiss_threads", None)
    info = {**info, "qdrant_client": version("qdrant-client"), "torch": torch.__version__, "threads": str(args.threads)}
    if "qdrant-edge" in args.methods:
        from importlib.metadata import PackageNotFoundError

        try:
            info["qdrant_edge"] = version("qdrant-edge-py")
        except PackageNotFoundError:
            pass
    return info


def markdown(rows: list[dict]) -> str:
    lines = [
        "| N | method | parameters | build s | single p50 ms | single p95 ms | batch p50 ms | batch p95 ms "
        "| ms/query in batch | recall@10 | RAM held GiB | note |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['method']} | {r['params']} | {r['build_s']:.1f} | {r['single_p50_ms']:.2f} | "
                     f"{r['single_p95_ms']:.2f} | {r['batch_p50_ms']:.0f} | {r['batch_p95_ms']:.0f} | "
                     f"{r['batch_ms_per_query']:.2f} | {r['recall_at_10']:.3f} ({r['recall_queries']} q) "
                     f"| {r['ram_held_gib']:.2f} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    args = ARGS
    if args.quick:
        args.sizes, args.budget, args.recall_queries = [20_000], 1.0, 128
    torch.set_num_threads(args.threads)
    random.seed(0)
    info = machine(args)
    print(json.dumps(info), flush=True)
    started = time.perf_counter()
    cap, img, facts = learned_embeddings(args.checkpoint)
    print(f"   {facts['distinct_captions']} distinct captions, {len(img)} query images, dim {cap.shape[1]}", flush=True)
    queries = np.ascontiguousarray(img, dtype=np.float32)
    if len(queries) < args.recall_queries:
        sys.exit(f"only {len(queries)} query images; pass --recall-queries {len(queries)} or less")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vsekit-search-backends-") as tmp:
        for n in args.sizes:
            rows += run_size(n, cap, queries, Path(tmp), args)
            info["load_average_at_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
            info["seconds"] = round(time.perf_counter() - started)
            if not args.quick:  # after each size: a run cut short keeps what it measured
                write(Path(args.out), rows, info, facts, args, done=n == args.sizes[-1])
    print("\n" + markdown(rows))
    return 0


def write(out: Path, rows: list[dict], info: dict, facts: dict, args: argparse.Namespace, done: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    command = ("benchmarks/search_backends.py " + " ".join(sys.argv[1:])).strip()
    out.write_text(json.dumps({"command": command, "complete": done, "machine": info, "data": {
        **facts, "noise": args.noise, "k": K, "batch": args.batch, "recall_queries": args.recall_queries,
        "budget_s": args.budget}, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rows))
    print(f"   wrote {out} and {out.with_suffix('.md')}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
