"""Checkpoints are safe to open and checked: plain data read with weights_only (a pickle payload is refused
and never run; a file of a vsekit before 0.1.0 is refused), a sha256 in the zip comment (flipped bytes, truncation,
foreign files, missing keys and newer versions are one-line errors naming the file), RNG states that
round-trip exactly, and run folders cleaned of the temporary files a killed write leaves."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import pickle
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import tiny_cfg

from vsekit.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointError,
    checkpoint_digest,
    load_checkpoint,
    save_checkpoint,
)
from vsekit.cli import main
from vsekit.inference import Embedder
from vsekit.train.checkpointing import BEST, LAST, CheckpointPolicy, remove_stale_temp_files
from vsekit.train.state import rng_state, set_rng_state
from vsekit.train.trainer import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache) -> Path:
    """A real run folder (2 epochs of a tiny model): last.pt, best.pt, metrics.jsonl."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    Trainer(tiny_cfg(out)).fit()
    return out


def _one_line_error(e: pytest.ExceptionInfo, path: Path, *words: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def _cli_error(capsys, *argv) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vsekit: error: "), err
    return err


def _legacy_copy(src: Path, dst: Path) -> Path:
    """``src`` as a vsekit before 0.1.0 wrote it: numpy's RNG state as the tuple (with an ndarray) np.random.get_state()
    returns, format version 1, no digest."""
    state = load_checkpoint(src)
    state.pop("path")
    state["version"] = 1
    state["rng"] = {**state["rng"], "numpy": np.random.get_state()}
    torch.save(state, dst)
    return dst


# -- plain data, weights_only ----------------------------------------------------------------------------
def test_a_real_checkpoint_is_plain_data_with_a_digest(run):
    for name in (LAST, BEST):
        path = run / name
        state = torch.load(path, map_location="cpu", weights_only=True)  # the strict unpickler: no objects
        assert state["format"] == CHECKPOINT_FORMAT and state["version"] == CHECKPOINT_VERSION
        for key in ("model", "optimizer", "scheduler", "scaler", "rng", "history", "vocab", "config", "monitor"):
            assert key in state
        assert isinstance(state["rng"]["numpy"], dict) and state["rng"]["numpy"]["key"].shape == (624,)
        assert state["history"] and isinstance(state["history"][0]["rsum"], float)
        # the digest is the zip comment and covers every byte before it (head -c -78 FILE | sha256sum)
        data = path.read_bytes()
        comment = zipfile.ZipFile(path).comment
        assert comment == data[-78:] and comment.startswith(b"vsekit-sha256:")
        assert hashlib.sha256(data[:-78]).hexdigest() == comment[14:].decode() == checkpoint_digest(path)
        assert torch.load(path, weights_only=True, mmap=True)["step"] == state["step"]  # still a torch file


def test_state_with_best_rsum_minus_inf_and_odd_containers_round_trips(tmp_path, run):
    state = load_checkpoint(run / LAST)
    state.update(best_rsum=float("-inf"), extra={"c": collections.Counter("aab"), "t": (1, None, 2.5),
                                                 "o": collections.OrderedDict(a=torch.ones(2))})
    save_checkpoint(tmp_path / "x.pt", state)
    back = load_checkpoint(tmp_path / "x.pt")
    assert back["best_rsum"] == float("-inf") and back["extra"]["c"] == collections.Counter("aab")
    assert back["extra"]["t"] == (1, None, 2.5) and torch.equal(back["extra"]["o"]["a"], torch.ones(2))


def test_save_refuses_what_weights_only_would_refuse_naming_the_key(tmp_path, run):
    state = load_checkpoint(run / LAST)
    state["history"] = [{"rsum": np.float64(1.0)}]
    with pytest.raises(TypeError, match=r"state\['history'\]\[0\]\['rsum'\] is a numpy.float64"):
        save_checkpoint(tmp_path / "x.pt", state)
    assert not (tmp_path / "x.pt").exists() and not list(tmp_path.iterdir())  # nor a temporary file


def test_rng_states_round_trip_exactly_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal(3)  # an odd count: numpy caches a gaussian (has_gauss=1)
    random.gauss(0, 1)
    save_checkpoint(tmp_path / "r.pt", {"model": {}, "vocab": {}, "config": {}, "rng": rng_state()})
    want = (random.random(), random.gauss(0, 1), np.random.standard_normal(5).tolist(),
            np.random.randint(0, 2**31, 5).tolist(), torch.rand(5).tolist())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    state = torch.load(tmp_path / "r.pt", weights_only=True)["rng"]
    set_rng_state(state)
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(5).tolist(),
           np.random.randint(0, 2**31, 5).tolist(), torch.rand(5).tolist())
    assert got == want


# -- code in a checkpoint is never run --------------------------------------------------------------------
class _Payload:
    """Unpickling this creates a marker file: the proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile(path: Path, marker: Path) -> Path:
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "model": {}, "vocab": {}, "config": {},
                "rng": _Payload(marker)}, path)
    return path


def test_a_pickle_payload_is_refused_and_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    bad = _hostile(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    _one_line_error(e, bad, "pickled Python objects", "open)", "not opened")
    with pytest.raises(CheckpointError):
        Embedder.from_checkpoint(bad)
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(bad, folder / LAST)
    with pytest.raises(CheckpointError):
        CheckpointPolicy(folder, dict).resume_state()  # --resume
    assert "pickled Python objects" in _cli_error(capsys, "eval", bad)
    assert not marker.exists()
    # a raw pickle (not a torch zip) is refused before anything unpickles it
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(raw)
    _one_line_error(e, raw, "not a checkpoint file")
    assert not marker.exists()
    # the payload is live: the full unpickler does run it
    torch.load(bad, weights_only=False)
    assert marker.exists()


def test_a_pickle_payload_named_by_an_index_is_not_run(tmp_path, run, capsys):
    from test_index import build_demo_index

    marker = tmp_path / "pwned"
    bad = _hostile(tmp_path / "evil.pt", marker)
    ix = build_demo_index(run / LAST, tmp_path / "ix", max_images=4)
    assert main(["search", str(ix), "a red circle", "--checkpoint", str(bad)]) == 2
    manifest = json.loads((ix / "manifest.json").read_text())
    (ix / "manifest.json").write_text(json.dumps({**manifest, "checkpoint": str(bad)}))
    assert main(["search", str(ix), "a red circle"]) == 2
    assert "pickled Python objects" in capsys.readouterr().err
    assert not marker.exists()


def test_a_checkpoint_of_a_vsekit_before_0_1_0_is_refused(tmp_path, run, capsys, cache):
    """One checkpoint version: a file of a vsekit before 0.1.0 (numpy's state pickled, version 1) is a
    one-line error naming it and saying to retrain, wherever it is opened (eval, encode, --resume)."""
    old = _legacy_copy(run / LAST, tmp_path / "old.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(old)
    _one_line_error(e, old, "numpy", "before 0.1.0", "retrain")
    assert "before 0.1.0" in _cli_error(capsys, "encode", old, "--captions", __file__, "--out", tmp_path / "c.npy")
    out = tmp_path / "b"
    Trainer(tiny_cfg(out, "train.epochs=1", "train.max_steps_per_epoch=2")).fit()
    _legacy_copy(out / LAST, out / LAST)
    recipe = tmp_path / "r.yaml"
    shutil.copy(out / "config.yaml", recipe)
    assert "before 0.1.0" in _cli_error(capsys, "train", recipe, "train.epochs=2", "--resume")
    # plain data but version 1: refused too
    state = torch.load(run / LAST, weights_only=True)
    save_checkpoint(tmp_path / "v1.pt", state)
    s = torch.load(tmp_path / "v1.pt", weights_only=True)
    s["version"] = 1
    torch.save(s, tmp_path / "v1.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "v1.pt")
    _one_line_error(e, tmp_path / "v1.pt", "checkpoint version 1", "before 0.1.0", "retrain")


# -- corrupt and foreign files ---------------------------------------------------------------------------
def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid: mid + 100] = bytes(255 - b for b in data[mid: mid + 100])
    p.write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _not_zip(p: Path) -> None:
    p.write_text("model weights, honestly\n")


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _other_zip(p: Path) -> None:
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("hello.txt", "not a torch file")


@pytest.mark.parametrize(("damage", "words"), [
    (_flip, ["corrupt", "sha256"]),
    (_truncate, ["truncated"]),
    (_not_zip, ["not a checkpoint file"]),
    (_empty, ["not a checkpoint file"]),
    (_other_zip, ["not a readable checkpoint"]),
])
def test_damaged_files_are_one_line_errors_naming_the_file(tmp_path, run, capsys, damage, words):
    p = tmp_path / "last.pt"
    shutil.copy(run / LAST, p)
    damage(p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    _one_line_error(e, p, *words)
    assert str(p) in _cli_error(capsys, "eval", p)


def test_the_real_command_line_prints_one_line_per_refusal(tmp_path, run):
    """In a real process (where logging goes to stderr, unlike under pytest): one line, exit 2, for each."""
    files = {"legacy": _legacy_copy(run / LAST, tmp_path / "old.pt"), "hostile": _hostile(tmp_path / "evil.pt",
             tmp_path / "pwned")}
    for name, damage in (("flipped", _flip), ("truncated", _truncate)):
        files[name] = Path(shutil.copy(run / LAST, tmp_path / f"{name}.pt"))
        damage(files[name])
    script = ("import sys\nfrom vsekit.cli import main\n"
              "for p in sys.argv[1:]:\n    rc = main(['eval', p])\n    print(f'== {rc}', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script, *map(str, files.values())], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    blocks = proc.stderr.split("== 2\n")
    assert len(blocks) == len(files) + 1 and blocks[-1] == "", proc.stderr
    for (name, path), block in zip(files.items(), blocks):
        assert block.count("\n") == 1 and block.startswith(f"vsekit: error: {path}: "), (name, block)
    assert not (tmp_path / "pwned").exists()


def test_flipped_bytes_would_load_silently_without_the_digest(tmp_path, run):
    """What the digest is for: torch does not check the zip's CRCs, so a checkpoint with 100 bytes of its
    weights overwritten loads without complaint."""
    state = load_checkpoint(run / LAST)
    state.pop("path")
    buf = io.BytesIO()
    torch.save(state, buf)
    data = bytearray(buf.getvalue())
    big = max(state["model"], key=lambda k: state["model"][k].numel())
    raw = state["model"][big].numpy().tobytes()
    at = bytes(data).find(raw[:64])
    assert at > 0
    data[at: at + 100] = bytes(255 - b for b in data[at: at + 100])
    changed = torch.load(io.BytesIO(bytes(data)), weights_only=True)["model"][big]
    assert not torch.equal(changed, state["model"][big])  # loaded, silently different
    p = tmp_path / "flipped.pt"
    save_checkpoint(p, state)
    data = bytearray(p.read_bytes())
    at = bytes(data).find(raw[:64])
    data[at: at + 100] = bytes(255 - b for b in data[at: at + 100])
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(p)


@pytest.mark.parametrize("missing", ["vocab", "model", "config"])
def test_a_missing_key_is_named(tmp_path, run, capsys, missing):
    state = load_checkpoint(run / LAST)
    del state[missing]
    p = save_checkpoint(tmp_path / "part.pt", state)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    _one_line_error(e, p, f"the key {missing!r} is missing")
    assert f"'{missing}'" in _cli_error(capsys, "eval", p)


def test_resume_names_a_missing_resume_key(tmp_path, run, cache):
    out = tmp_path / "r"
    out.mkdir()
    state = load_checkpoint(run / LAST)
    del state["optimizer"]
    save_checkpoint(out / LAST, state)
    with pytest.raises(CheckpointError) as e:
        Trainer(tiny_cfg(out), resume=True)
    _one_line_error(e, out / LAST, "'optimizer' is missing")


def test_a_newer_version_is_refused(tmp_path, run, capsys):
    state = load_checkpoint(run / LAST)
    p = tmp_path / "new.pt"
    save_checkpoint(p, state)
    s = torch.load(p, weights_only=True)
    s["version"] = CHECKPOINT_VERSION + 1
    torch.save(s, p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    _one_line_error(e, p, f"version {CHECKPOINT_VERSION + 1} is newer", "upgrade vsekit")
    _cli_error(capsys, "eval", p)


def test_a_checkpoint_without_a_digest_loads_with_a_warning(tmp_path, run, caplog):
    state = torch.load(run / LAST, weights_only=True)
    torch.save(state, tmp_path / "nodigest.pt")  # plain data, as a re-save by hand would leave it
    with caplog.at_level(logging.WARNING, logger="vsekit.checkpoint"):
        back = load_checkpoint(tmp_path / "nodigest.pt")
    assert "no sha256" in caplog.text and str(tmp_path / "nodigest.pt") in caplog.text
    assert back["step"] == state["step"]


# -- run folders -----------------------------------------------------------------------------------------
STALE = [".last.pt.k2j4_x9a.tmp", ".best.pt.abcdefgh.tmp", ".metrics.jsonl.0123456_.tmp", ".config.yaml.zzzzzzzz.tmp"]
KEPT = ["notes.tmp", ".last.pt.tmp", "last.pt.abcdefgh.tmp", ".last.pt.abcdefgh.tmpx", ".last.pt.ABCDEFGH.tmp",
        ".last.pt.abc.tmp", "mine.txt"]


def test_stale_temp_files_are_removed_and_nothing_else(tmp_path):
    for name in STALE + KEPT:
        (tmp_path / name).write_text("x")
    (tmp_path / ".tb.abcdefgh.tmp").mkdir()  # a folder of that name is not ours
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == sorted(STALE)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*KEPT, ".tb.abcdefgh.tmp"])
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_a_run_that_starts_or_resumes_removes_stale_temp_files(tmp_path, cache):
    out = tmp_path / "run"
    out.mkdir()
    (out / STALE[0]).write_bytes(b"half a checkpoint")
    Trainer(tiny_cfg(out, "train.epochs=1", "train.max_steps_per_epoch=2")).fit()
    assert not (out / STALE[0]).exists()
    (out / STALE[1]).write_bytes(b"half a checkpoint")
    (out / "keep.txt").write_text("mine")
    Trainer(tiny_cfg(out, "train.epochs=1", "train.max_steps_per_epoch=2"), resume=True)
    assert not (out / STALE[1]).exists() and (out / "keep.txt").is_file()


def test_best_is_written_before_last(tmp_path, monkeypatch):
    """A kill between the two writes of an epoch's end must not leave last.pt past the best.pt it implies:
    best.pt comes first, so a resume repeats that epoch's end and writes it again."""
    written = []
    monkeypatch.setattr("vsekit.train.checkpointing.save_checkpoint", lambda p, s: written.append(Path(p).name))
    policy = CheckpointPolicy(tmp_path, dict)
    assert policy.after_epoch({"rsum": 1.0})
    assert not policy.after_epoch({"rsum": 0.5})
    assert written == [BEST, LAST, LAST]


# the resumed run's first act is the epoch's scheduler step, before any optimizer step of its new optimizer
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_a_kill_between_an_epochs_validation_and_its_checkpoint_logs_that_validation_once(tmp_path, cache,
                                                                                            monkeypatch):
    """last.pt at the epoch's last step, the validation record logged, then killed before the epoch's end was
    saved: the resumed run validates that epoch again, and metrics.jsonl must hold it once."""
    out = tmp_path / "run"
    cfg = tiny_cfg(out, "train.checkpoint_every_steps=1", "train.log_every=1", "train.max_steps_per_epoch=3")
    t = Trainer(cfg)

    def killed(self, metrics):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(CheckpointPolicy, "after_epoch", killed)
        with pytest.raises(KeyboardInterrupt):
            t.fit()
    assert [r["kind"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())][-1] == "val"
    Trainer(cfg, resume=True).fit()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["epoch"], r["step"]) for r in records] == [
        ("train", 0, 1), ("train", 0, 2), ("train", 0, 3), ("val", 0, 3),
        ("train", 1, 4), ("train", 1, 5), ("train", 1, 6), ("val", 1, 6)]
    assert [h["epoch"] for h in load_checkpoint(out / LAST)["history"]] == [0, 1]
