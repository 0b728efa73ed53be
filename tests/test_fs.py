"""vsekit.utils.fs: folders are published whole, leftovers of dead writers go, file locks serialise."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from vsekit.utils import fs
from vsekit.utils.fs import file_lock, make_work_dir, publish_dir, remove_stale_work

REPO = Path(__file__).resolve().parents[1]
POSIX = os.name == "posix"


def _fill(folder: Path, tag: str, n: int = 3) -> Path:
    for i in range(n):
        (folder / f"part{i}.txt").write_text(f"{tag} {i}\n")
    (folder / "done").write_text(tag)
    return folder


def _tree(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir())


def _run(script: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter that imports this checkout's vsekit."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- publish_dir -----------------------------------------------------------------------------------------
def test_work_dir_is_a_hidden_sibling_named_after_target_and_pid(tmp_path):
    target = tmp_path / "sub" / "set"
    work = make_work_dir(target)
    assert work.is_dir() and work.parent == target.parent and not any(work.iterdir())
    assert work.name.startswith(f".set.building-{os.getpid()}-")
    assert make_work_dir(target) != work  # two threads of one process get different folders


def test_publish_into_a_missing_or_empty_target(tmp_path):
    target = tmp_path / "set"
    work = _fill(make_work_dir(target), "new")
    assert publish_dir(work, target) is True
    assert _tree(target)["done"] == "new" and not work.exists()
    assert _siblings(target) == ["set"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert publish_dir(_fill(make_work_dir(empty), "e"), empty) is True
    assert _tree(empty)["done"] == "e"


def test_publish_replaces_an_existing_target_and_leaves_no_trash(tmp_path):
    target = tmp_path / "set"
    publish_dir(_fill(make_work_dir(target), "old", n=5), target)
    assert publish_dir(_fill(make_work_dir(target), "new", n=2), target) is True
    assert _tree(target) == {"done": "new", "part0.txt": "new 0\n", "part1.txt": "new 1\n"}
    assert _siblings(target) == ["set"]


def test_keep_rule_keeps_another_builders_equal_target(tmp_path):
    target = tmp_path / "set"
    publish_dir(_fill(make_work_dir(target), "theirs"), target)
    same = lambda t: (t / "done").is_file()  # noqa: E731 - "a complete set of the same content"
    work = _fill(make_work_dir(target), "mine")
    assert publish_dir(work, target, keep=same) is False
    assert _tree(target)["done"] == "theirs" and not work.exists()
    # A target the keep rule rejects (another content) is replaced.
    assert publish_dir(_fill(make_work_dir(target), "mine"), target, keep=lambda t: False) is True
    assert _tree(target)["done"] == "mine"
    # force replaces the target that is there, even one the keep rule would keep.
    assert publish_dir(_fill(make_work_dir(target), "forced"), target, keep=same, force=True) is True
    assert _tree(target)["done"] == "forced"
    assert _siblings(target) == ["set"]


def test_force_keeps_a_fresh_target_that_appears_after_the_old_one_moved_aside(tmp_path, monkeypatch):
    """A forced rebuild replaces the old target once; if a concurrent builder publishes its (equal) folder
    between our two renames, that one is fresh and the keep rule applies to it."""
    target = tmp_path / "set"
    publish_dir(_fill(make_work_dir(target), "old"), target)
    theirs = _fill(make_work_dir(target), "theirs")
    real_rename = os.rename

    def rename(src, dst):
        real_rename(src, dst)
        if ".old-" in Path(dst).name and Path(src) == target:  # we just moved the old one aside
            real_rename(theirs, target)  # ...and the other builder gets in first

    monkeypatch.setattr(fs.os, "rename", rename)
    work = _fill(make_work_dir(target), "mine")
    assert publish_dir(work, target, keep=lambda t: (t / "done").is_file(), force=True) is False
    monkeypatch.undo()
    assert _tree(target)["done"] == "theirs"
    assert _siblings(target) == ["set"]


def test_concurrent_publishers_agree(tmp_path):
    target = tmp_path / "set"
    barrier = threading.Barrier(8)
    results, errors = [], []

    def build(i: int) -> None:
        try:
            work = _fill(make_work_dir(target), f"builder{i}", n=20)
            barrier.wait()
            results.append(publish_dir(work, target, keep=lambda t: (t / "done").is_file()))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8 and results.count(True) >= 1
    tree = _tree(target)
    writer = tree["done"]
    assert tree == {"done": writer, **{f"part{i}.txt": f"{writer} {i}\n" for i in range(20)}}  # one whole
    assert _siblings(target) == ["set"]


@pytest.mark.skipif(not POSIX, reason="needs POSIX process ids")
def test_stale_leftovers_of_dead_pids_go_and_live_ones_stay(tmp_path):
    target = tmp_path / "set"
    target.mkdir()
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead_work": f".set.building-{dead}-0badcafe",
            "dead_trash": f".set.old-{dead}-deadbeef",
            "live_work": f".set.building-{live.pid}-0123abcd",
            "own_work": f".set.building-{os.getpid()}-00000001",
            "other_target": f".settings.building-{dead}-0badcafe",
            "not_ours": f".set.backup-{dead}-0badcafe",
        }
        for name in names.values():
            (tmp_path / name).mkdir()
            _fill(tmp_path / name, "x")
        (tmp_path / ".set.lock").write_text("")
        removed = remove_stale_work(target)
        assert sorted(p.name for p in removed) == sorted([names["dead_work"], names["dead_trash"]])
        left = set(_siblings(target))
        assert left == {"set", ".set.lock", *names.values()} - {names["dead_work"], names["dead_trash"]}
        # Under the lock that every writer takes, every leftover is stale, whatever its pid.
        removed = remove_stale_work(target, any_pid=True)
        assert sorted(p.name for p in removed) == sorted([names["live_work"], names["own_work"]])
        assert set(_siblings(target)) == {"set", ".set.lock", names["other_target"], names["not_ours"]}
    finally:
        live.kill()
        live.wait()


@pytest.mark.skipif(not POSIX, reason="needs POSIX process ids")
def test_a_crash_mid_write_leaves_the_old_folder(tmp_path):
    target = tmp_path / "set"
    publish_dir(_fill(make_work_dir(target), "old"), target)
    before = _tree(target)
    proc = _run(f"""
        import os
        from pathlib import Path
        from vsekit.utils.fs import make_work_dir, publish_dir
        work = make_work_dir(Path({str(target)!r}))
        (work / "part0.txt").write_text("new 0")
        os._exit(9)  # killed half way: nothing runs after this
        publish_dir(work, Path({str(target)!r}))
    """)
    assert proc.returncode == 9, proc.stderr
    assert _tree(target) == before  # readers still see the old folder...
    (leftover,) = [n for n in _siblings(target) if n != "set"]  # ...next to the dead writer's work folder
    assert leftover.startswith(".set.building-")
    assert [p.name for p in remove_stale_work(target)] == [leftover]
    assert _siblings(target) == ["set"] and _tree(target) == before


# -- file_lock -------------------------------------------------------------------------------------------
_LOCKED_COUNTER = """
    import sys, time
    from pathlib import Path
    from vsekit.utils.fs import file_lock
    lock, counter, log, rounds = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    for _ in range(rounds):
        with file_lock(lock):
            t0 = time.monotonic()
            value = int(counter.read_text())
            time.sleep(0.005)  # a read-modify-write that loses updates unless serialised
            counter.write_text(str(value + 1))
            with open(log, "a") as f:
                f.write(f"{t0} {time.monotonic()}\\n")
"""


@pytest.mark.skipif(not POSIX, reason="flock is POSIX-only")
def test_file_lock_serialises_two_processes(tmp_path):
    lock, counter, log = tmp_path / "x.lock", tmp_path / "counter", tmp_path / "log"
    counter.write_text("0")
    rounds = 25
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = textwrap.dedent(_LOCKED_COUNTER)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(lock), str(counter), str(log), str(rounds)],
                              env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert int(counter.read_text()) == 2 * rounds  # no lost update
    spans = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())
    assert len(spans) == 2 * rounds
    assert all(end <= nxt_start for (_, end), (nxt_start, _) in zip(spans, spans[1:]))  # never overlapping
    assert lock.exists()


@pytest.mark.skipif(not POSIX, reason="flock is POSIX-only")
def test_file_lock_blocks_until_the_holder_releases(tmp_path):
    lock = tmp_path / "x.lock"
    acquired = []

    def take() -> None:
        with file_lock(lock):
            acquired.append(time.monotonic())

    with file_lock(lock):
        t = threading.Thread(target=take)
        t.start()
        time.sleep(0.2)
        assert not acquired  # the lock belongs to the open file: a second one in this process waits too
        released = time.monotonic()
    t.join(10)
    assert acquired and acquired[0] >= released


def test_file_lock_is_a_no_op_without_fcntl(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl now raises ImportError
    done = []

    def nested() -> None:
        with file_lock(tmp_path / "x.lock"), file_lock(tmp_path / "x.lock"):  # would deadlock with flock
            done.append(True)

    t = threading.Thread(target=nested, daemon=True)
    t.start()
    t.join(10)
    assert done


@pytest.mark.skipif(not POSIX, reason="symlinks")
def test_publish_refuses_a_symlink_or_a_file_in_the_way(tmp_path):
    from vsekit.utils.io import OutputPathError

    (tmp_path / "elsewhere").mkdir()
    elsewhere = _fill(tmp_path / "elsewhere", "shared")
    elsewhere_tree = _tree(elsewhere)
    link = tmp_path / "set"
    link.symlink_to(elsewhere, target_is_directory=True)
    work = _fill(make_work_dir(link), "new")
    with pytest.raises(OutputPathError, match="is a symbolic link"):
        publish_dir(work, link)
    assert link.is_symlink() and _tree(elsewhere) == elsewhere_tree
    afile = tmp_path / "plain"
    afile.write_text("keep")
    with pytest.raises(OutputPathError, match="is not a folder"):
        publish_dir(_fill(make_work_dir(afile), "new"), afile)
    assert afile.read_text() == "keep"
