"""Faults end well: a full disk, a file-size limit, a read-only or odd output path, a hostile checkpoint, a new
run over an old one, a resume under another config, a second Ctrl-C. Each is one line naming the path and what
to do, a non-zero exit, and the old files as they were."""

from __future__ import annotations

import errno
import io
import os
import signal
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from test_train import tiny_cfg

from vsekit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vsekit.cli import main
from vsekit.train import signals
from vsekit.train.trainer import Trainer
from vsekit.utils import io as vio
from vsekit.utils.io import OutputPathError, atomic_write, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
TINY = ["train.epochs=1", "train.max_steps_per_epoch=2"]


def _cli_overrides(out: Path, *extra: str) -> list[str]:
    """The overrides of tiny_cfg, for ``vsekit train`` on the command line."""
    return [f"output_dir={out}", "seed=3", "data.format=demo", "data.num_images=120", "transform.image_size=32",
            "transform.resize=32", "data.val_max_images=20", "text.min_count=1", "model.embed_size=16",
            "model.image_encoder.name=cnn", "model.image_encoder.backbone=small_cnn", "model.image_encoder.width=4",
            "model.text_encoder.word_dim=8", "train.batch_size=16", "train.progress=false", "optim.lr=1e-3",
            "eval.chunk_size=7", *TINY, *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def _no_temp_files(folder: Path) -> None:
    assert not [p.name for p in folder.rglob("*.tmp")], "temporary files left behind"


@pytest.fixture
def refuse_probe(monkeypatch):
    """``os.open`` of a write probe fails as in a read-only or immutable folder (tests run as root, which chmod
    does not stop)."""
    real = os.open

    def fake(path, flags, *args, **kwargs):
        if ".vsekit-write-probe-" in os.fspath(path):
            raise PermissionError(errno.EPERM, "Operation not permitted", os.fspath(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake)


# -- a new run over an old one, a resume under another config ------------------------------------------------
def test_a_new_run_into_an_old_run_folder_is_refused_unless_overwrite(tmp_path, cache, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    out = tmp_path / "run"
    assert main(["train", str(recipe), *_cli_overrides(out)]) == 0
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl")}
    capsys.readouterr()

    assert main(["train", str(recipe), *_cli_overrides(out)]) == 2
    line = _one_error_line(capsys)
    assert str(out) in line and "--resume" in line and "--overwrite" in line
    assert {name: (out / name).read_bytes() for name in before} == before  # nothing replaced or truncated

    assert main(["train", str(recipe), *_cli_overrides(out), "--resume", "--overwrite"]) == 2
    assert "--overwrite" in _one_error_line(capsys)
    assert main(["train", str(recipe), *_cli_overrides(out, "seed=4"), "--overwrite"]) == 0
    assert load_checkpoint(out / "last.pt")["config"]["seed"] == 4


def test_overwrite_does_not_remove_the_checkpoint_train_init_from_names(tmp_path, cache):
    from vsekit.errors import ConfigError

    out = tmp_path / "run"
    Trainer(tiny_cfg(out, *TINY)).fit()
    with pytest.raises(ConfigError, match=r"train.init_from .*last.pt lies in output_dir"):
        Trainer(tiny_cfg(out, *TINY, f"train.init_from={out / 'last.pt'}"), overwrite=True)
    assert load_checkpoint(out / "last.pt")["step"] == 2


def test_resume_under_a_changed_model_or_optimizer_is_one_line_listing_the_changes(tmp_path, cache, capsys):
    out = tmp_path / "run"
    Trainer(tiny_cfg(out, *TINY)).fit()
    with pytest.raises(CheckpointError) as e:
        Trainer(tiny_cfg(out, *TINY, "model.embed_size=32", "optim.lr=0.01"), resume=True)
    msg = str(e.value)
    assert "\n" not in msg and str(out / "last.pt") in msg
    assert "model.embed_size: 16 -> 32" in msg and "optim.lr: 0.001 -> 0.01" in msg
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    assert main(["train", str(recipe), *_cli_overrides(out, "optim.lr=0.01"), "--resume"]) == 2
    assert "optim.lr: 0.001 -> 0.01" in _one_error_line(capsys)
    with pytest.raises(CheckpointError, match=r"optim.lr_mult.backbone: '\(absent\)' -> 0.1"):
        Trainer(tiny_cfg(out, *TINY, "optim.lr_mult={backbone: 0.1}"), resume=True)
    # how long it trains, how it logs, where it runs: a resume may change those
    t = Trainer(tiny_cfg(out, "train.epochs=2", "train.max_steps_per_epoch=2", "train.log_every=1",
                         "train.max_minutes=30"), resume=True)
    assert t.epoch == 1


def test_resume_refuses_an_entry_added_to_a_mapping_the_checkpoint_had_empty_or_without_it(tmp_path):
    """A key only one side has was never a change: an ``optim.lr_mult`` entry or a component option added on
    --resume went through silently (the optimizer's groups then no longer matched the saved state's)."""
    from vsekit.train.checkpointing import ABSENT, config_changes

    saved_cfg = tiny_cfg(tmp_path / "run")
    saved, schema = saved_cfg.to_dict(), type(saved_cfg)
    assert "backbone_norm" not in saved_cfg.model.image_encoder  # the component's option was left at its default
    for override, key, new in [("optim.lr_mult={backbone: 0.1}", "optim.lr_mult.backbone", 0.1),
                               ("model.image_encoder.backbone_norm=false", "model.image_encoder.backbone_norm", False)]:
        current = tiny_cfg(tmp_path / "run", override).to_dict()
        assert (key, ABSENT, new) in config_changes(saved, current, schema), override
    # a field of a typed section that the checkpoint's vsekit did not have yet is no change
    older = {**saved, "train": {k: v for k, v in saved["train"].items() if k != "max_nonfinite_steps"}}
    assert config_changes(older, saved, schema) == []
    assert config_changes(saved, tiny_cfg(tmp_path / "run", "train.epochs=7").to_dict(), schema) == []


# -- signals -------------------------------------------------------------------------------------------------
def test_a_second_sigint_waits_for_the_checkpoint_being_written(caplog):
    with signals.StopSignals() as stop:
        stop._handle(signal.SIGINT, None)
        assert stop.signum == signal.SIGINT  # asked to stop: nothing raised
        with pytest.raises(KeyboardInterrupt):
            with signals.critical():
                stop._handle(signal.SIGINT, None)  # during the write: deferred to its end
                finished = True
        assert finished
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)  # outside a write: at once


def test_a_second_sigterm_is_ignored_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with signals.StopSignals() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        stop._handle(signal.SIGTERM, None)
        stop._handle(signal.SIGTERM, None)  # torchrun forwards the scheduler's SIGTERM: no hard stop
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_sighup_stops_training_as_sigterm_does_unless_ignored(monkeypatch):
    before = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with signals.StopSignals() as stop:
            assert signal.getsignal(signal.SIGHUP) == stop._handle
            stop._handle(signal.SIGHUP, None)
            assert stop.signum == signal.SIGHUP
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup: a hang-up stays ignored
        with signals.StopSignals(), signals.terminate_raises():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_forked_child_still_ends_by_sigterm_under_terminate_raises():
    """A data loader worker forked while the handler is in place must not raise Terminated (a traceback in
    each worker): it ends by the signal, as before."""
    before = signal.getsignal(signal.SIGTERM)
    with signals.terminate_raises():
        ready, started = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            import time

            os.write(started, b"1")  # past the fork (a signal that arrives during it is lost)
            time.sleep(30)
            os._exit(0)
        assert os.read(ready, 1) == b"1"
        os.close(ready), os.close(started)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        with pytest.raises(signals.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs at the next bytecode
                pass
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def _index_build(ckpt: Path, out: Path) -> int:
    return main(["index", "build", str(ckpt), "--data", "demo", "--split", "train", "--max-images", "8",
                 "--out", str(out), "-q"])


def test_sigterm_during_index_build_is_one_line_and_leaves_the_folder_usable(ckpt, tmp_path, capsys, monkeypatch):
    """SIGTERM ended ``index build`` at once, silently, leaving its thumbnail work folder in the new index folder,
    which the next build then refused ("not empty and holds no index")."""
    import vsekit.index.thumbnails as thumbs

    real, sent = thumbs.make_all, []

    def terminated_meanwhile(*args, **kwargs):
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))  # handled in the main thread, wherever it is
        return real(*args, **kwargs)

    def guard(signum, frame):  # the test runner's own handler: a command that leaves it in place is not stopped
        sent.append("reached the runner")

    monkeypatch.setattr(thumbs, "make_all", terminated_meanwhile)
    out = tmp_path / "index"
    before = signal.signal(signal.SIGTERM, guard)
    try:
        code = _index_build(ckpt, out)
        assert signal.getsignal(signal.SIGTERM) is guard  # the command's handler is gone with the command
    finally:
        signal.signal(signal.SIGTERM, before)
    assert code == 128 + signal.SIGTERM and "reached the runner" not in sent
    assert _one_error_line(capsys).startswith("vsekit: stopped by SIGTERM")
    assert sorted(p.name for p in out.iterdir()) in ([], [".lock"])  # no work folder left, no half index
    monkeypatch.setattr(thumbs, "make_all", real)
    assert _index_build(ckpt, out) == 0


def test_a_killed_builds_work_folders_do_not_make_its_folder_taken(ckpt, tmp_path):
    """kill -9 leaves work folders no ``finally`` removed; a dead writer's are not the user's files."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "index"
    (out / f".thumbnails.building-{int(dead.stdout)}-0a1b2c3d").mkdir(parents=True)
    (out / ".lock").touch()
    assert _index_build(ckpt, out) == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file\n")
    assert _index_build(ckpt, tmp_path / "mine") == 2  # a folder of someone else's files is still refused


# -- writability, OS errors ----------------------------------------------------------------------------------
def test_an_output_dir_that_cannot_be_written_is_said_before_anything_is_built(tmp_path, refuse_probe,
                                                                              monkeypatch):
    import vsekit.train.trainer as trainer

    monkeypatch.setattr(trainer, "build_run", lambda *a, **k: pytest.fail("built a run in an unwritable folder"))
    with pytest.raises(OutputPathError, match=r"output_dir .*run: cannot write there.*Operation not permitted"):
        Trainer(tiny_cfg(tmp_path / "run"))


def test_index_build_and_add_probe_their_folder_before_encoding(tmp_path, refuse_probe):
    from vsekit.index.build import add_to_index, build_index

    # no embedder and no corpus: the probe comes before either is touched
    with pytest.raises(OutputPathError, match=r"index folder .*new-index: cannot write there \(in "):
        build_index(None, None, tmp_path / "new-index")
    assert not (tmp_path / "new-index").exists()  # nothing made
    (tmp_path / "index").mkdir()
    with pytest.raises(OutputPathError, match=r"index folder .*index: cannot write there"):
        add_to_index(tmp_path / "index", None, None)


def test_the_command_line_reports_an_os_error_in_one_line(monkeypatch, capsys):
    import vsekit.cli.train as cli_train

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/last.pt")

    monkeypatch.setattr(cli_train, "cmd_train", full)
    monkeypatch.delenv("VSEKIT_DEBUG", raising=False)
    assert main(["train", "demo_vsepp"]) == 1
    assert _one_error_line(capsys) == ("vsekit: error: /runs/x/last.pt: No space left on device (free space there, "
                                       "or write elsewhere)")
    monkeypatch.setenv("VSEKIT_DEBUG", "1")
    with pytest.raises(OSError):
        main(["train", "demo_vsepp"])


def test_a_model_too_large_for_the_machine_is_one_line(tmp_path, cache, capsys, monkeypatch):
    """torch's allocator failing (a RuntimeError, not a MemoryError) ends in one line that names what to lower,
    and no other RuntimeError is hidden by it."""
    monkeypatch.delenv("VSEKIT_DEBUG", raising=False)
    assert main(["train", "demo_vsepp", *_cli_overrides(tmp_path / "run", "model.embed_size=1000000000000")]) == 1
    line = _one_error_line(capsys)
    assert line.startswith("vsekit: error: out of memory (tried to allocate ") and "model.embed_size" in line, line
    import vsekit.cli.train as cli_train

    def bug(args):
        raise RuntimeError("a bug, not memory")

    monkeypatch.setattr(cli_train, "cmd_train", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", "demo_vsepp"])


def test_semantics_and_imagine_check_their_out_before_any_work(tmp_path, capsys, monkeypatch, refuse_probe):
    """``semantics fit --out`` was found unwritable only after the captions were read and the LSA fitted;
    ``imagine --out`` at a link only after the model was loaded and the grid generated."""
    import vsekit.imagine as imagine
    import vsekit.semantics as semantics

    monkeypatch.setattr(semantics, "fit_to_folder", lambda *a, **k: pytest.fail("fitted into an unwritable folder"))
    monkeypatch.setattr(imagine.Imaginer, "from_checkpoint", lambda *a, **k: pytest.fail("loaded the model first"))
    monkeypatch.delenv("VSEKIT_DEBUG", raising=False)
    assert main(["semantics", "fit", "--data", "demo", "--out", str(tmp_path / "sem")]) == 2
    line = _one_error_line(capsys)
    assert "--out" in line and "cannot write there" in line, line
    (tmp_path / "target.png").write_bytes(b"keep me")
    (tmp_path / "grid.png").symlink_to(tmp_path / "target.png")
    assert main(["imagine", str(tmp_path / "none.pt"), "red", "--out", str(tmp_path / "grid.png")]) == 2
    assert "symbolic link" in _one_error_line(capsys)
    assert (tmp_path / "target.png").read_bytes() == b"keep me"


def test_a_small_cnn_of_width_zero_is_a_config_error(tmp_path):
    """model.image_encoder.width=0 built a network of empty convolutions that failed in its first forward pass
    with a torch traceback."""
    from vsekit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"small_cnn.*width must be a whole number >= 1, got 0"):
        Trainer(tiny_cfg(tmp_path / "run", "model.image_encoder.width=0"))


def test_an_image_size_the_network_cannot_take_is_a_config_error(tmp_path):
    """transform.image_size=1 passed validation and failed in the first training step with torch's pooling
    error; the image encoder is now probed with the configured size before any data is read."""
    from vsekit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"transform.image_size=1: the image encoder cannot take images of this"):
        Trainer(tiny_cfg(tmp_path / "run", "transform.image_size=1", "transform.resize=1"))
    Trainer(tiny_cfg(tmp_path / "ok"))  # the recipe's own size passes the probe


def test_vsekit_cache_pointing_at_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    afile = tmp_path / "cache-file"
    afile.write_text("not a folder\n")
    monkeypatch.setenv("VSEKIT_CACHE", str(afile))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    assert main(["train", str(recipe), *_cli_overrides(tmp_path / "run")]) == 2
    line = _one_error_line(capsys)
    assert "VSEKIT_CACHE" in line and str(afile) in line and "is a file" in line
    assert afile.read_text() == "not a folder\n"
    monkeypatch.setenv("VSEKIT_CACHE", str(afile / "under"))
    with pytest.raises(OutputPathError, match="VSEKIT_CACHE"):
        vio.cache_root()


def _run_limited(script: str, limit: int, timeout: float = 120) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter under RLIMIT_FSIZE = ``limit`` bytes (a full disk, in effect)."""
    import resource

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    env.pop("VSEKIT_DEBUG", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limited, cwd=REPO)


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE")
def test_a_checkpoint_write_past_a_file_size_limit_is_an_os_error_naming_the_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(10)}, "vocab": {}, "config": {}})
    old = path.read_bytes()
    r = _run_limited(f"""
        import torch
        from vsekit.checkpoint import save_checkpoint
        try:
            save_checkpoint({str(path)!r}, {{"model": {{"w": torch.zeros(100_000)}}, "vocab": {{}}, "config": {{}}}})
        except OSError as e:
            print("OSError", e.errno, e.filename)
        """, limit=100_000)
    assert r.returncode == 0, r.stderr[-2000:]  # not killed by SIGXFSZ, no torch RuntimeError
    assert r.stdout.split() == ["OSError", str(errno.EFBIG), str(path)]
    assert path.read_bytes() == old
    _no_temp_files(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE")
def test_vsekit_train_past_a_file_size_limit_ends_in_one_line_and_keeps_the_last_checkpoint(tmp_path, cache):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    out = tmp_path / "run"
    assert main(["train", str(recipe), *_cli_overrides(out)]) == 0  # also builds the demo set, unlimited
    old = (out / "last.pt").read_bytes()
    args = ["train", str(recipe), *_cli_overrides(out, "train.epochs=2"), "--resume"]
    r = _run_limited(f"import sys; from vsekit.cli import main; sys.exit(main({args!r}))", limit=50_000)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"vsekit: error: {out}") and "File too large" in line and "ulimit" in line
    assert (out / "last.pt").read_bytes() == old
    _no_temp_files(out)


# -- atomic writes: regular files only, the umask's permissions, failures named --------------------------------
def _special_paths(tmp_path: Path) -> dict[str, Path]:
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    link = tmp_path / "link.npy"
    link.symlink_to(target)
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.npy"
    folder.mkdir()
    paths = {"symbolic link": link, "FIFO": fifo, "folder": folder}
    device = tmp_path / "full.npy"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 7))  # what /dev/full is
        paths["device"] = device
    except (PermissionError, OSError):
        pass
    return paths


@pytest.mark.skipif(os.name != "posix", reason="symlinks, FIFOs and device nodes")
def test_atomic_writes_replace_only_regular_files(tmp_path):
    for kind, path in _special_paths(tmp_path).items():
        mode = os.lstat(path).st_mode
        with pytest.raises(OutputPathError, match=f"{path}: is a {kind}"):
            atomic_write(path, lambda f: f.write(b"x"))
        assert os.lstat(path).st_mode == mode, kind  # still the link, FIFO, folder or device
    assert (tmp_path / "precious.txt").read_text() == "keep me\n"
    _no_temp_files(tmp_path)


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_encode_out_at_a_symlink_is_refused_before_encoding(tmp_path, capsys, monkeypatch):
    import vsekit.inference as inference

    monkeypatch.setattr(inference.Embedder, "from_checkpoint",
                        classmethod(lambda cls, *a, **k: pytest.fail("encoding began before --out was checked")))
    caps = tmp_path / "caps.txt"
    caps.write_text("a red circle\n")
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    (tmp_path / "out.npy").symlink_to(target)
    assert main(["encode", "ckpt.pt", "--captions", str(caps), "--out", str(tmp_path / "out.npy")]) == 2
    assert "symbolic link" in _one_error_line(capsys)
    assert (tmp_path / "out.npy").is_symlink() and target.read_text() == "keep me\n"


@pytest.mark.skipif(os.name != "posix", reason="umask")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_get_the_umasks_permissions(tmp_path, monkeypatch, umask):
    old = os.umask(umask)
    monkeypatch.setattr(vio, "_umask", None)  # read again under this umask
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        plain = tmp_path / "b.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask == stat.S_IMODE(plain.stat().st_mode)
    assert save_checkpoint(tmp_path / "c.pt", {"model": {}, "vocab": {}, "config": {}}).stat().st_mode & 0o044 \
        == 0o044 & ~umask


def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "vectors.npy"
    path.write_bytes(b"old")

    def full(f):
        f.write(b"new, partly")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as e:
        atomic_write(path, full)
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(path))
    assert path.read_bytes() == b"old"
    _no_temp_files(tmp_path)


# -- hostile checkpoints: sizes before reading -----------------------------------------------------------------
def _bomb(tmp_path: Path) -> Path:
    """A checkpoint whose records are deflated: 20 MB of zeros in a ~20 KB file."""
    plain = save_checkpoint(tmp_path / "plain.pt", {"model": {"w": torch.zeros(5_000_000)}, "vocab": {},
                                                    "config": {}})
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as z, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as o:
        for info in z.infolist():
            o.writestr(info.filename, z.read(info.filename))
    assert bomb.stat().st_size < 100_000
    return bomb


def test_a_zip_bomb_checkpoint_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
    bomb = _bomb(tmp_path)
    assert torch.load(bomb, weights_only=True)["model"]["w"].numel() == 5_000_000  # torch would inflate it
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    with pytest.raises(CheckpointError, match=r"bomb\.pt: its records would inflate to \d+ bytes"):
        load_checkpoint(bomb)


def test_a_zip_bomb_weights_file_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
    from vsekit.models.weights import WeightsFileError, read_state_dict

    bomb = _bomb(tmp_path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    with pytest.raises(WeightsFileError, match="would inflate"):
        read_state_dict(bomb, "model.image_encoder.weights")


def test_a_safetensors_file_that_overruns_itself_is_refused(tmp_path):
    from vsekit.utils.archives import check_safetensors_sizes

    header = b'{"w": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]}}'
    path = tmp_path / "w.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="its tensors end at byte 4000000 of a 16-byte data section"):
        check_safetensors_sizes(path, error=CheckpointError)
    path.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        check_safetensors_sizes(path, error=CheckpointError)
    buf = io.BytesIO()
    header = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    buf.write(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    path.write_bytes(buf.getvalue())
    check_safetensors_sizes(path, error=CheckpointError)  # a sound file passes


def test_a_failed_index_write_names_the_index_folder_and_leaves_no_work_folder(tmp_path, monkeypatch):
    from vsekit.index import generations

    def full(folder, data):
        (folder / "images.npy").write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(generations, "_write_files", full)
    index_dir = tmp_path / "index"
    with pytest.raises(OSError) as e:
        generations.write_index(index_dir, None, {})
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(index_dir))
    assert [p.name for p in index_dir.iterdir()] == []
