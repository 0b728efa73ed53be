"""A real ``vsekit train`` process killed with SIGKILL at random points, several times, each time restarted
with ``--resume``: the final weights equal an uninterrupted run's bit for bit, and the run folder is clean
(no temporary files, every step and every epoch's validation once in ``metrics.jsonl``). SIGTERM and SIGINT
stop it after a step with the state saved (exit 143, 130), and ``--resume`` ends where the uninterrupted
run does."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vsekit.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, STEPS = 2, 7  # 14 steps; last.pt after each
OVERRIDES = [
    "seed=3", "data.format=demo", "data.num_images=120", "transform.image_size=32", "transform.resize=32",
    "data.val_max_images=20", "text.min_count=1", "model.embed_size=16", "model.image_encoder.name=cnn",
    "model.image_encoder.backbone=small_cnn", "model.image_encoder.width=4", "model.image_encoder.finetune=true",
    "model.text_encoder.word_dim=8", "train.batch_size=16", f"train.epochs={EPOCHS}",
    f"train.max_steps_per_epoch={STEPS}", "train.progress=false", "train.log_every=1",
    "train.checkpoint_every_steps=1", "optim.lr=1e-3", "optim.lr_decay_every=1", "eval.chunk_size=7",
]
KILLS = 3
TIMEOUT_S = 60  # for any one process


def _start(recipe: Path, out: Path, env: dict[str, str], resume: bool, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vsekit", "train", str(recipe), f"output_dir={out}", *OVERRIDES, *extra]
    return subprocess.Popen([*cmd, *(["--resume"] if resume else [])], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _records(out: Path) -> list[dict]:
    try:
        lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # being written
    return records


def _logged_step(out: Path) -> int:
    return max((r["step"] for r in _records(out) if r.get("kind") == "train"), default=0)


def _finish(proc: subprocess.Popen) -> None:
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"vsekit train did not finish in {TIMEOUT_S} s: {err[-2000:]}")
    assert proc.returncode == 0, err[-2000:]


def _kill_at(proc: subprocess.Popen, out: Path, target: int, delay: float) -> bool:
    """SIGKILL ``proc`` ``delay`` s after it logged step ``target``; False when it finished first."""
    deadline = time.monotonic() + TIMEOUT_S
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"vsekit train did not reach step {target} in {TIMEOUT_S} s")
        if _logged_step(out) >= target and (out / "last.pt").is_file():
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            return True
        time.sleep(0.005)
    _, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    return False


def test_sigkill_and_resume_gives_the_uninterrupted_weights_and_a_clean_folder(tmp_path):
    env = {**os.environ, "VSEKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    ref, out = tmp_path / "ref", tmp_path / "killed"
    _finish(_start(recipe, ref, env, resume=False))  # also builds the demo set in the cache

    rng = random.Random(20240610)
    total, kills = EPOCHS * STEPS, 0
    for _ in range(KILLS):
        resume = (out / "last.pt").is_file()
        start = load_checkpoint(out / "last.pt")["step"] if resume else 0
        # at least 2 steps past the checkpoint: past any record the killed process logged after it
        target = start + rng.randint(2, 3)
        if target >= total:
            break
        # a delay of up to ~a step: the kill lands mid-step, mid-checkpoint-write or mid-validation
        if not _kill_at(_start(recipe, out, env, resume), out, target, delay=rng.uniform(0.0, 0.15)):
            break
        kills += 1
    assert kills >= 2, "the run finished before it was killed twice: steps too fast for this test?"
    _finish(_start(recipe, out, env, resume=True))

    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(ref / name), load_checkpoint(out / name)
        assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (name, k)
    a, b = load_checkpoint(ref / "last.pt"), load_checkpoint(out / "last.pt")
    assert [h["rsum"] for h in a["history"]] == [h["rsum"] for h in b["history"]]

    assert not [p.name for p in out.rglob("*.tmp")], "temporary files left in the run folder"
    records = _records(out)
    assert len(records) == len((out / "metrics.jsonl").read_text().splitlines())  # no line cut by a kill
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["epoch"], r["rsum"]) for r in records if r["kind"] == "val"]
    ref_records = _records(ref)
    assert train == [(r["step"], r["loss"]) for r in ref_records if r["kind"] == "train"]
    assert [s for s, _ in train] == list(range(1, total + 1))  # each step once, in order
    assert val == [(r["epoch"], r["rsum"]) for r in ref_records if r["kind"] == "val"]
    assert [e for e, _ in val] == list(range(EPOCHS))


# -- SIGTERM (preemption by SLURM or Kubernetes) and SIGINT (Ctrl-C) ------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (and the demo set in a module-wide cache): (recipe, run folder, env)."""
    root = tmp_path_factory.mktemp("signals")
    env = {**os.environ, "VSEKIT_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    recipe = root / "recipe.yaml"
    recipe.write_text("{}\n")
    _finish(_start(recipe, root / "ref", env, resume=False))
    return recipe, root / "ref", env


def _signal_at(proc: subprocess.Popen, out: Path, target: int, signum: int, times: int) -> tuple[int, str]:
    """Send ``signum`` (``times`` times, back to back) once ``proc`` logged step ``target``; its exit code and
    stderr."""
    deadline = time.monotonic() + TIMEOUT_S
    while _logged_step(out) < target:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"vsekit train ended or stalled before step {target}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.005)
    for _ in range(times):
        proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"vsekit train did not stop on {signal.Signals(signum).name}")
    return proc.returncode, err


@pytest.mark.parametrize(("signum", "times"), [(signal.SIGTERM, 1), (signal.SIGINT, 1), (signal.SIGTERM, 2),
                                               (signal.SIGHUP, 1)],
                         ids=["sigterm", "sigint", "sigterm-twice", "sighup"])
def test_a_signal_stops_after_a_step_with_the_state_saved_and_resume_ends_as_the_uninterrupted_run(
        reference, tmp_path, signum, times):
    if signum == signal.SIGHUP and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        pytest.skip("run under nohup: SIGHUP is ignored, in vsekit train too")
    recipe, ref, env = reference
    out = tmp_path / "run"
    no_step_checkpoints = "train.checkpoint_every_steps=0"  # the state the signal saves is the only one
    code, err = _signal_at(_start(recipe, out, env, False, no_step_checkpoints), out, target=3, signum=signum,
                           times=times)
    assert code == 128 + signum, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("vsekit: training stopped by") and "--resume" in last and str(out / "last.pt") in last
    assert "Traceback" not in err
    state = load_checkpoint(out / "last.pt")  # complete, and mid-epoch: the step the signal found
    assert state["epoch"] == 0 and 3 <= state["step"] < STEPS and state["batches_done"] == state["step"]
    assert not [p.name for p in out.rglob("*.tmp")]

    _finish(_start(recipe, out, env, True, no_step_checkpoints))
    a, b = load_checkpoint(ref / "last.pt"), load_checkpoint(out / "last.pt")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (EPOCHS, EPOCHS * STEPS)
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6), k
    assert [r["step"] for r in _records(out) if r["kind"] == "train"] == list(range(1, EPOCHS * STEPS + 1))


def _signal_worker(rank: int, world: int, port: int, overrides: list[str], out: Path) -> None:
    """One of 2 gloo processes training; SIGTERM reaches rank 1 only, during step 3. Writes what ended the run
    (and at which step) to ``out/<rank>.txt``."""
    from vsekit.config import resolve_config
    from vsekit.train.signals import TrainingInterrupted
    from vsekit.train.trainer import Trainer
    from vsekit.utils import distributed

    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    distributed.init_from_env("cpu", timeout_s=60)  # a process left waiting fails the test in a minute
    t = Trainer(resolve_config(None, overrides))
    real_step = t.train_step

    def step(batch):
        if rank == 1 and t.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(batch)

    t.train_step = step
    try:
        t.fit()
        result = "finished"
    except TrainingInterrupted as e:
        result = f"stopped {e.signum} {t.step}"
    (out / f"{rank}.txt").write_text(result)
    distributed.shutdown()


def test_under_torchrun_every_process_stops_at_the_same_step(tmp_path, cache):
    import socket

    import torch.multiprocessing as tmp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", *OVERRIDES, "train.checkpoint_every_steps=0", "train.batch_size=16"]
    ctx = tmp.start_processes(_signal_worker, args=(2, port, overrides, tmp_path), nprocs=2, join=False,
                              start_method="spawn")
    deadline = time.monotonic() + 3 * TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the processes did not stop together (deadlock?)")
    results = [(tmp_path / f"{r}.txt").read_text() for r in range(2)]
    assert results == [f"stopped {int(signal.SIGTERM)} 3"] * 2
    state = load_checkpoint(out / "last.pt")
    assert (state["epoch"], state["step"]) == (0, 3)
