"""Load benchmark of ``vsekit serve``: requests/s, p50/p99 latency and server memory under text, image and
mixed traffic, each alone and while hostile uploads are in flight.

    .venv/bin/python benchmarks/serve_load.py                       # trains a tiny demo model first (~20 s)
    .venv/bin/python benchmarks/serve_load.py --index runs/demo_index --duration 30 --clients 20

The server is a real ``vsekit serve`` subprocess on 127.0.0.1 (loopback only; a free port), so its resident
memory is its own (read from /proc). Clients are httpx in one asyncio loop in this process: ``--clients``
workers, each sending its next request when the last one is answered. Scenarios:

* ``text``: ``GET /search?q=<a caption of the index>``; ``image``: ``POST /search/image`` with an indexed PNG;
  ``mixed``: each worker alternates the two.
* ``... + hostile``: the same traffic, while (a) one client keeps uploading a 100000 x 1 PNG of a few hundred
  bytes (which the pixel limit alone let through, and whose resize used to freeze the server for seconds),
  and (b) ``--stalled`` raw connections each send the headers and the first bytes of an upload and then
  nothing: the server must drop them after its read timeout (each is reopened at once, so there are always
  that many).

Everything is bounded: each scenario stops after ``--duration`` seconds or ``--max-requests`` requests, the
server is stopped at the end (or on any error), and the whole run has a ``--deadline``. Results: a markdown
table on stdout (and JSON with ``--json-out FILE``); the serve section of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The test suite's tiny model (tests/test_index.py): trains in seconds on CPU, tells the demo images apart.
TINY_MODEL = [
    "data.num_images=30", "transform.image_size=32", "transform.resize=32", "data.val_max_images=20",
    "model.embed_size=128", "model.image_encoder.width=8", "model.text_encoder.word_dim=64",
    "loss={name: infonce}", "optim.lr=3e-3", "optim.lr_decay_every=100",
    "train.epochs=60", "train.progress=false", "train.batch_size=32", "seed=0",
]


def build_demo_index(work: Path) -> Path:
    """Train the tiny model on the demo set and index the demo training split with it."""
    import torch

    from vsekit.cli import main
    from vsekit.config import resolve_config
    from vsekit.train.trainer import Trainer

    os.environ.setdefault("VSEKIT_CACHE", str(work / "cache"))
    torch.set_num_threads(1)
    recipe = ROOT / "vsekit" / "configs" / "demo_vsepp.yaml"
    Trainer(resolve_config(recipe, [f"output_dir={work / 'run'}", *TINY_MODEL])).fit()
    out = work / "index"
    rc = main(["index", "build", str(work / "run" / "last.pt"), "--data", "demo", "--split", "train",
               "--out", str(out), "-q"])
    if rc != 0:
        raise SystemExit(f"index build failed ({rc})")
    return out


def huge_aspect_png(width: int = 100_000, height: int = 1) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b"\0" * (width + 1)) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def served(index: Path, port: int, read_timeout: float, extra: list[str], root: Path = ROOT):
    """``vsekit serve`` (the one in ``root``) as a subprocess on 127.0.0.1:port, stopped (its own pid only)
    on leaving. ``read_timeout`` 0: pass no ``--read-timeout`` (a vsekit from before it existed)."""
    cmd = [sys.executable, "-m", "vsekit", "serve", str(index), "--host", "127.0.0.1", "--port", str(port),
           *(["--read-timeout", str(read_timeout)] if read_timeout else []), *extra]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"the server exited ({proc.returncode}):\n{log.read().decode()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start within 120 s")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


# -- traffic ------------------------------------------------------------------------------------------------
class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: dict[int | str, int] = {}

    def add(self, seconds: float, status: int | str) -> None:
        if status == 200:
            self.latencies.append(seconds)
        else:
            self.errors[status] = self.errors.get(status, 0) + 1


async def traffic(client: httpx.AsyncClient, kind: str, worker: int, stop: asyncio.Event, stats: Stats,
                  queries: list[str], images: list[bytes], budget: list[int]) -> None:
    i = worker
    while not stop.is_set() and budget[0] > 0:
        budget[0] -= 1
        i += 1
        do_image = kind == "image" or (kind == "mixed" and i % 2 == 0)
        t0 = time.perf_counter()
        try:
            if do_image:
                r = await client.post("/search/image", data={"k": "10"},
                                      files={"file": ("q.png", images[i % len(images)], "image/png")})
            else:
                r = await client.get("/search", params={"q": queries[i % len(queries)], "k": 10})
            status: int | str = r.status_code
        except httpx.HTTPError as e:
            status = type(e).__name__
        stats.add(time.perf_counter() - t0, status)


async def hostile_huge(client: httpx.AsyncClient, stop: asyncio.Event, record: dict, png: bytes) -> None:
    """Keep one huge-aspect upload in flight."""
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            r = await client.post("/search/image", files={"file": ("strip.png", png, "image/png")})
            status: int | str = r.status_code
        except httpx.HTTPError as e:
            status = type(e).__name__
        record.setdefault("statuses", {}).setdefault(str(status), 0)
        record["statuses"][str(status)] += 1
        record.setdefault("latencies", []).append(time.perf_counter() - t0)


async def hostile_stalled(port: int, stop: asyncio.Event, record: dict) -> None:
    """One stalled upload at a time on this task: headers and the body's first bytes, then silence. How long
    until the server drops it, and with what answer."""
    head = (b"POST /search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 1000000\r\n\r\n--b\r\n")
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as e:
            record.setdefault("connect_errors", []).append(type(e).__name__)
            await asyncio.sleep(0.2)
            continue
        try:
            writer.write(head)
            await writer.drain()
            reply = b""
            read = asyncio.ensure_future(reader.read())  # until the server closes
            stopped = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({read, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if read in done:
                reply = read.result()
                status = reply.split(b" ", 2)[1].decode() if reply.startswith(b"HTTP/") else "closed"
                record.setdefault("statuses", {}).setdefault(status, 0)
                record["statuses"][status] += 1
                record.setdefault("held_s", []).append(time.perf_counter() - t0)
            else:
                read.cancel()
                record["open_at_end"] = record.get("open_at_end", 0) + 1
            stopped.cancel()
        except OSError:
            pass
        finally:
            writer.close()


async def run_scenario(port: int, kind: str, hostile: bool, args, queries, images, pid: int) -> dict:
    stop = asyncio.Event()
    stats, budget = Stats(), [args.max_requests]
    rss: list[float] = []
    huge: dict = {}
    stalled: dict = {}
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60) as client, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as evil:
        tasks = [asyncio.create_task(traffic(client, kind, w, stop, stats, queries, images, budget))
                 for w in range(args.clients)]
        if hostile:
            tasks.append(asyncio.create_task(hostile_huge(evil, stop, huge, huge_aspect_png())))
            tasks += [asyncio.create_task(hostile_stalled(port, stop, stalled)) for _ in range(args.stalled)]
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < args.duration and budget[0] > 0:
            rss.append(rss_mib(pid))
            await asyncio.sleep(0.25)
        stop.set()
        elapsed = time.perf_counter() - t0
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 90)
    lat = np.array(stats.latencies) * 1000
    row = {"scenario": kind + (" + hostile" if hostile else ""), "requests": len(lat),
           "req_per_s": len(lat) / elapsed, "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
           "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None, "max_ms": float(lat.max()) if len(lat) else None,
           "errors": stats.errors, "rss_peak_mib": max(rss), "rss_end_mib": rss_mib(pid)}
    if hostile:
        hl = np.array(huge.get("latencies", [0.0])) * 1000
        row["huge_png"] = {"statuses": huge.get("statuses", {}), "p50_ms": float(np.percentile(hl, 50)),
                           "max_ms": float(hl.max())}
        held = np.array(stalled.get("held_s", [float("nan")]))
        row["stalled"] = {"statuses": stalled.get("statuses", {}), "held_s_median": float(np.median(held)),
                          "held_s_max": float(np.max(held)), "open_at_end": stalled.get("open_at_end", 0),
                          "connect_errors": len(stalled.get("connect_errors", []))}
    return row


def table(rows: list[dict]) -> str:
    out = ["| scenario | requests | req/s | p50 (ms) | p99 (ms) | max (ms) | non-200 | server RSS peak / end (MiB) "
           "| hostile uploads: answer, time |",
           "|---|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        hostile = ""
        if "huge_png" in r:
            h, s = r["huge_png"], r["stalled"]
            dropped = sum(s["statuses"].values())
            stalled = (f"{dropped}x {'/'.join(s['statuses'])} after {s['held_s_median']:.1f} s (max "
                       f"{s['held_s_max']:.1f})" if dropped else "none dropped")
            hostile = (f"100000x1 PNG: {sum(h['statuses'].values())}x {'/'.join(h['statuses'])}, p50 "
                       f"{h['p50_ms']:.0f} ms; stalled: {stalled}, {s['open_at_end']} open at the end")
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        out.append(f"| {r['scenario']} | {r['requests']} | {r['req_per_s']:.0f} | {r['p50_ms']:.0f} | "
                   f"{r['p99_ms']:.0f} | {r['max_ms']:.0f} | {errors} | {r['rss_peak_mib']:.0f} / "
                   f"{r['rss_end_mib']:.0f} | {hostile} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", type=Path, help="an index folder (default: train a tiny demo model and index it)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per scenario (default 15)")
    p.add_argument("--clients", type=int, default=16, help="concurrent well-behaved clients (default 16)")
    p.add_argument("--stalled", type=int, default=50, help="stalled uploads kept open in the hostile runs")
    p.add_argument("--read-timeout", type=float, default=5.0,
                   help="the server's --read-timeout for this run (default 5 s; 0: leave it out)")
    p.add_argument("--max-requests", type=int, default=50_000, help="stop a scenario after this many requests")
    p.add_argument("--scenarios", nargs="+", default=["text", "image", "mixed"], choices=["text", "image", "mixed"])
    p.add_argument("--hostile", choices=["both", "off", "only"], default="both",
                   help="run each scenario alone and with hostile uploads (both, the default), or one of them")
    p.add_argument("--deadline", type=float, default=900, help="give up after this many seconds in all")
    p.add_argument("--json-out", type=Path, help="also write the results as JSON here")
    p.add_argument("--serve-arg", action="append", default=[], help="one more argument for `vsekit serve`")
    p.add_argument("--server-root", type=Path, default=ROOT,
                   help="run the `vsekit serve` of this checkout (e.g. a git worktree of an older commit, "
                        "with --read-timeout 0 if it predates that option)")
    args = p.parse_args()

    from vsekit.index import read_manifest
    from vsekit.index.generations import load_data

    with tempfile.TemporaryDirectory(prefix="vsekit-serve-load-") as tmp:
        index = args.index or build_demo_index(Path(tmp))
        data = load_data(index, read_manifest(index), with_ann=False)
        queries = [c["text"] for c in (data.captions or [])] or ["a red circle"]
        images = [Path(r["path"]).read_bytes() for r in data.images[:8] if r.get("path")]
        port = free_port()
        rows = []
        t_start = time.monotonic()
        with served(index, port, args.read_timeout, args.serve_arg, args.server_root.resolve()) as proc:
            for kind in args.scenarios:
                for hostile in {"both": (False, True), "off": (False,), "only": (True,)}[args.hostile]:
                    if time.monotonic() - t_start > args.deadline:
                        print(f"deadline reached; skipping {kind}{' + hostile' if hostile else ''}", file=sys.stderr)
                        continue
                    row = asyncio.run(run_scenario(port, kind, hostile, args, queries, images, proc.pid))
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    cpu = f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    print(f"\n{len(data.images)} images / {len(queries)} captions indexed; {args.clients} clients; "
          f"{args.duration:g} s per scenario; {args.stalled} stalled uploads in the hostile runs; "
          f"server --read-timeout {args.read_timeout:g} s; server code {args.server_root.resolve()}; {cpu}; "
          f"Python {platform.python_version()}\n")
    print(table(rows))
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                            indent=2))


if __name__ == "__main__":
    main()
