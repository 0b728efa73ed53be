"""Benchmark runs as subprocesses, a few at a time, each appending one JSON line of results.

A script exposes a ``one ARG...`` sub-command that trains one configuration in a temporary folder and prints
``RESULT {json}`` (:func:`print_result`); :func:`run_jobs` starts ``script one ARG...`` for every job not yet
in the results file, ``parallel`` at a time with ``threads`` torch threads each, and appends each result with
the machine's description. A failed run is reported with the end of its stderr and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
if str(ROOT) not in sys.path:  # the checkout's vsekit, also when it is not installed
    sys.path.insert(0, str(ROOT))
_LOCK = threading.Lock()


def job_commands(doc: str, *, run: Callable, one: Callable, report: Callable,
                 one_args: Sequence[tuple[str, dict[str, Any]]]):
    """The ``run`` / ``one`` / ``report`` sub-commands of a benchmark: returns (parser, subparsers, run's parser)
    for the script to add its own options; ``run`` has --seeds, --threads (per run) and --jobs (at a time)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--threads", type=int, default=1, help="torch threads per run")
    r.add_argument("--jobs", type=int, default=2, help="runs at a time")
    r.set_defaults(fn=run)
    o = sub.add_parser("one")
    for name, options in one_args:
        o.add_argument(name, **options)
    o.set_defaults(fn=one)
    sub.add_parser("report").set_defaults(fn=report)
    return p, sub, r


def mean_sd(values: Sequence[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def write_report(name: str, report: dict) -> None:
    """Print ``report`` as JSON and keep it as ``results/<name>.json``."""
    text = json.dumps(report, indent=1)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(text + "\n")


def train_keeping_best(cfg: Any) -> tuple[float, str | None]:
    """Train ``cfg`` in this process; returns (seconds, why the collapse detector stopped it or None). A run the
    detector stopped is a result too: its best checkpoint is kept."""
    import time

    from vsekit.errors import TrainingCollapsed
    from vsekit.train.trainer import Trainer

    t0 = time.perf_counter()
    stopped = None
    try:
        Trainer(cfg).fit()
    except TrainingCollapsed as e:
        stopped = str(e).split(". Try")[0]
    return time.perf_counter() - t0, stopped


def cli_train_and_test(args: Sequence[str], out_dir: str) -> tuple[float, dict, list[dict]]:
    """``vsekit train ARGS output_dir=OUT`` in a subprocess, then its best checkpoint on the test split: (seconds
    the training took, the test metrics, the run's ``metrics.jsonl`` records)."""
    import time

    from vsekit.data.sources import load_split
    from vsekit.inference import Embedder

    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "vsekit", "train", *args, "train.progress=false", f"output_dir={out_dir}"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    emb = Embedder.from_checkpoint(Path(out_dir) / "best.pt")
    test = emb.evaluate(load_split(emb.config.data, "test"))
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return wall, test, records


def print_result(fn: Callable[..., dict], *args: Any) -> None:
    """Run ``fn(*args, out_dir)`` in a temporary folder and print its result for :func:`run_jobs`."""
    with tempfile.TemporaryDirectory() as tmp:
        result = fn(*args, str(Path(tmp) / "run"))
    print("RESULT " + json.dumps(result))


def run_jobs(script: str | Path, jobs: Sequence[Sequence[Any]], out: Path, *, threads: int, parallel: int,
             summary: Callable[[dict], str], cwd: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {parallel} job(s) of {threads} thread(s)"

    def one(job: Sequence[Any]) -> None:
        p = subprocess.run([sys.executable, str(script), "one", *map(str, job)], env=env, cwd=cwd,
                           capture_output=True, text=True)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not lines:
            print(f"{' '.join(map(str, job))}: FAILED\n{p.stderr[-3000:]}", flush=True)
            return
        result = {**json.loads(lines[-1][len("RESULT "):]), "machine": machine}
        with _LOCK, out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(summary(result), flush=True)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, jobs))
