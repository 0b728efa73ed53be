"""Peak memory of ``vsekit serve`` decoding worst-case uploads, one at a time and many at once (issue 21).

    .venv/bin/python benchmarks/upload_memory.py                      # trains a tiny demo model first (~20 s)
    .venv/bin/python benchmarks/upload_memory.py --index runs/demo_index --concurrency 40
    .venv/bin/python benchmarks/upload_memory.py --baseline-commit a0ef455 --baseline-concurrency 6

The server is a real ``vsekit serve`` subprocess on 127.0.0.1 with its default limits (10 MB uploads, 40
Mpixels, decode budget and decode slots of vsekit.serve.limits), so its resident memory is its own: before
each measurement its peak (VmHWM) is reset through /proc/PID/clear_refs, and the growth reported is the peak
during the requests minus the resident size just before them. Uploads, each within the default limits:

* ``grey16``: a 6000 x 6000 16-bit grey PNG (about 70 KB): the one that cost +0.8 GB per request;
* ``rgba``: a 6000 x 6000 RGBA PNG (transparent pixels to composite onto white);
* ``jpeg``: a 6000 x 6000 RGB JPEG stored sideways with EXIF orientation 6 (so it is also rotated).

Each is sent alone (``--repeats`` times, the largest growth kept), then ``--concurrency`` uploads at once
(default 40: the server's thread pool), cycling through the three. Replies other than 200 are counted by
status (503: no decode slot within the wait). ``--baseline-commit`` runs the same against an older vsekit
(``git archive`` of that commit into a temporary folder), at ``--baseline-concurrency`` so that the old
unbounded decodes do not exhaust the machine. The server runs with ``MALLOC_MMAP_THRESHOLD_=131072``, so
memory a request frees goes back to the system and each measurement sees its own peak. Results: a markdown table on stdout (and JSON with
``--json-out``); the upload-memory section of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from serve_load import build_demo_index, free_port, rss_mib, served  # noqa: E402

SIDE = 6000  # 36 Mpixels: under the default 40 Mpixel limit, and every file well under 10 MB


def uploads(side: int = SIDE) -> dict[str, bytes]:
    """The worst-case uploads, encoded once."""
    import numpy as np
    from PIL import Image

    def encode(im: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    grey16 = Image.fromarray(np.zeros((side, side), dtype=np.uint16))
    rgba = Image.new("RGBA", (side, side), (200, 30, 30, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = Image.new("RGB", (side, side), (30, 120, 200))
    return {"grey16": encode(grey16, "PNG"), "rgba": encode(rgba, "PNG", optimize=True),
            "jpeg": encode(jpeg, "JPEG", quality=90, exif=exif)}


def reset_peak(pid: int) -> bool:
    """Linux: writing 5 to clear_refs resets the process's VmHWM to its current resident size."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def post_all(port: int, files: list[tuple[str, bytes]], timeout: float) -> tuple[dict[str, int], float]:
    """Send every upload at once; status -> count, and the seconds until the last reply."""
    limits = httpx.Limits(max_connections=len(files) + 1, max_keepalive_connections=len(files) + 1)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=timeout, limits=limits) as c:
        async def one(name: str, data: bytes) -> str:
            try:
                r = await c.post("/search/image", data={"k": "5"}, files={"file": (name, data, "image/png")})
                return str(r.status_code)
            except httpx.HTTPError as e:
                return type(e).__name__

        t0 = time.perf_counter()
        statuses = await asyncio.gather(*(one(n, d) for n, d in files))
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    return counts, time.perf_counter() - t0


def measure(pid: int, port: int, files: list[tuple[str, bytes]], timeout: float) -> dict:
    if not reset_peak(pid):
        raise SystemExit("cannot reset the server's peak RSS (/proc/PID/clear_refs): Linux only")
    before = rss_mib(pid)
    counts, seconds = asyncio.run(post_all(port, files, timeout))
    return {"growth_mib": round(peak_mib(pid) - before, 1), "rss_before_mib": round(before, 1),
            "statuses": counts, "seconds": round(seconds, 2)}


def run_server(index: Path, root: Path, data: dict[str, bytes], args: argparse.Namespace, concurrency: int) -> dict:
    out: dict = {"single": {}, "concurrent": None}
    port = free_port()
    with served(index, port, 10.0, [], root=root) as proc:
        asyncio.run(post_all(port, [("warm.png", data["jpeg"])], args.timeout))  # first request: lazy imports
        for name, blob in data.items():
            runs = [measure(proc.pid, port, [(name, blob)], args.timeout) for _ in range(args.repeats)]
            worst = max(runs, key=lambda r: r["growth_mib"])
            out["single"][name] = {**worst, "bytes": len(blob)}
            print(f"  {name}: {worst}", file=sys.stderr)
        names = list(data)
        files = [(names[i % len(names)], data[names[i % len(names)]]) for i in range(concurrency)]
        out["concurrent"] = {**measure(proc.pid, port, files, args.timeout), "n": concurrency}
        print(f"  {concurrency} at once: {out['concurrent']}", file=sys.stderr)
    return out


def checkout(commit: str, work: Path) -> Path:
    """The vsekit package of ``commit`` (git archive), to serve with the same Python environment."""
    dest = work / f"vsekit-{commit}"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "vsekit"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def table(results: dict[str, dict]) -> str:
    lines = ["| vsekit | upload | file size | status | peak RSS growth (MiB) | seconds |", "|---|---|---:|---|---:|---:|"]
    for label, r in results.items():
        for name, s in r["single"].items():
            lines.append(f"| {label} | {name}, alone | {s['bytes'] / 1024:.0f} KB | {s['statuses']} | "
                         f"{s['growth_mib']:.0f} | {s['seconds']:.2f} |")
        c = r["concurrent"]
        lines.append(f"| {label} | {c['n']} at once (the three in turn) | - | {c['statuses']} | "
                     f"{c['growth_mib']:.0f} | {c['seconds']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    import logging
    import os

    logging.getLogger("httpx").setLevel(logging.WARNING)
    # glibc: big blocks always through mmap, so memory freed after a request leaves the server's RSS and the
    # next request's growth is its own (otherwise the heap keeps it and later peaks look smaller)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--index", type=Path, help="an index to serve (default: train a tiny demo model and index it)")
    p.add_argument("--side", type=int, default=SIDE, help=f"the uploads' width and height (default {SIDE})")
    p.add_argument("--concurrency", type=int, default=40, help="uploads sent at once (default 40)")
    p.add_argument("--repeats", type=int, default=2, help="times each upload is sent alone (largest kept)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a client waits for a reply")
    p.add_argument("--baseline-commit", help="also measure the vsekit of this git commit")
    p.add_argument("--baseline-concurrency", type=int, default=6, help="uploads at once for the baseline (6)")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="upload-memory-") as tmp:
        work = Path(tmp)
        index = args.index or build_demo_index(work)
        data = uploads(args.side)
        results: dict[str, dict] = {}
        print("this vsekit:", file=sys.stderr)
        results["this"] = run_server(index, ROOT, data, args, args.concurrency)
        if args.baseline_commit:
            print(f"vsekit {args.baseline_commit}:", file=sys.stderr)
            results[args.baseline_commit] = run_server(index, checkout(args.baseline_commit, work), data, args,
                                                       args.baseline_concurrency)
    meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "side": args.side}
    print(table(results))
    if args.json_out:
        args.json_out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
