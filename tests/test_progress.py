"""vsekit.utils.progress: bar on a terminal, throttled plain lines elsewhere, no-op when disabled."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import pytest

from vsekit.utils.progress import ENV_VAR, Progress, iterate, progress, resolve_mode


class FakeTTY(io.StringIO):
    """A StringIO that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_lines_mode_count_and_no_carriage_return() -> None:
    out, clock = io.StringIO(), FakeClock()
    with progress(100, desc="epoch 1/3", stream=out, every_steps=10, clock=clock) as p:
        for _ in range(100):
            clock.t += 0.01
            p.update()
    text = out.getvalue()
    assert "\r" not in text
    lines = _lines(out)
    assert len(lines) == 10 + 1  # every 10 steps, plus the final line
    assert lines[0].startswith("epoch 1/3: 10/100 batches (10%) ")
    assert lines[0].endswith("batch/s")
    assert lines[-2].startswith("epoch 1/3: 100/100 batches (100%)")


def test_default_every_steps_is_about_ten_lines_per_pass() -> None:
    out = io.StringIO()
    p = progress(450, desc="x", stream=out, clock=FakeClock())
    for _ in range(450):
        p.update()
    p.close()
    assert len(_lines(out)) == 10 + 1  # every 45 steps, plus the final line

    out = io.StringIO()
    p = progress(3, desc="x", stream=out, clock=FakeClock())  # small total: a line every step
    for _ in range(3):
        p.update()
    p.close()
    assert len(_lines(out)) == 3 + 1


def test_unknown_total_defaults_to_every_100_steps() -> None:
    out = io.StringIO()
    with progress(None, desc="images", stream=out, clock=FakeClock()) as p:
        for _ in range(250):
            p.update()
    lines = _lines(out)
    assert len(lines) == 2 + 1
    assert lines[0].startswith("images: 100 batches ")
    assert "%" not in lines[0]
    assert lines[-1].startswith("images: done 250 batches in ")


def test_final_line_at_close_with_count_elapsed_rate() -> None:
    out, clock = io.StringIO(), FakeClock()
    p = progress(40, desc="epoch 3/30", stream=out, every_steps=1000, clock=clock)
    for _ in range(40):
        clock.t += 0.5
        p.update()
    assert out.getvalue() == ""  # neither threshold reached yet
    p.close()
    p.close()  # idempotent
    lines = _lines(out)
    assert lines == ["epoch 3/30: done 40/40 batches in 20.0s (2.00 batch/s)"]
    p.update()  # ignored after close
    assert len(_lines(out)) == 1


def test_postfix_values_appear_and_rate_is_formatted() -> None:
    out, clock = io.StringIO(), FakeClock()
    p = progress(450, desc="epoch 3/30", stream=out, every_steps=120, every_seconds=None, clock=clock)
    clock.t += 120 / 41.2
    p.set_postfix(loss="0.512", pairs_per_s=5270)
    p.update(120)
    p.set_postfix(loss=0.25)
    p.close()
    first, last = _lines(out)
    assert first == "epoch 3/30: 120/450 batches (27%) 41.2 batch/s loss=0.512 pairs_per_s=5270"
    assert last.startswith("epoch 3/30: done 120/450 batches in 2.9s (41.2 batch/s)")
    assert last.endswith(" loss=0.25")


def test_time_based_lines_with_patched_clock() -> None:
    out, clock = io.StringIO(), FakeClock()
    p = progress(10_000, desc="t", stream=out, every_steps=10_000, every_seconds=30.0, clock=clock)
    for _ in range(10):  # 10 updates, 10 s apart: a line at 30 s and at 60 s and at 90 s
        clock.t += 10.0
        p.update()
    assert len(_lines(out)) == 3
    assert _lines(out)[0].startswith("t: 3/10000 batches (0%) 0.10 batch/s")
    p.close()
    assert _lines(out)[-1] == "t: done 10/10000 batches in 1m40s (0.10 batch/s)"


def test_steps_threshold_wins_when_it_comes_first() -> None:
    out, clock = io.StringIO(), FakeClock()
    p = progress(100, desc="s", stream=out, every_steps=5, every_seconds=30.0, clock=clock)
    for _ in range(10):
        clock.t += 1.0
        p.update()
    assert len(_lines(out)) == 2


def test_logger_receives_lines_instead_of_stream(caplog: pytest.LogCaptureFixture) -> None:
    out = io.StringIO()
    log = logging.getLogger("vsekit.test_progress")
    with caplog.at_level(logging.INFO, logger=log.name):
        with progress(4, desc="enc", unit="img", stream=out, every_steps=2, logger=log, clock=FakeClock()) as p:
            for _ in range(4):
                p.update()
    assert out.getvalue() == ""
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert messages[0].startswith("enc: 2/4 imgs (50%)")
    assert messages[-1].startswith("enc: done 4/4 imgs in ")


def test_tty_stream_gets_a_tqdm_bar() -> None:
    out = FakeTTY()
    p = progress(5, desc="epoch 1/1", stream=out)
    assert resolve_mode(out) == "bar"
    for _ in range(5):
        p.update()
    p.set_postfix(loss="0.1")
    p.close()
    text = out.getvalue()
    assert "\r" in text
    assert "epoch 1/1" in text


def test_disabled_writes_nothing() -> None:
    for stream in (io.StringIO(), FakeTTY()):
        with progress(10, desc="x", stream=stream, enabled=False) as p:
            assert type(p) is Progress
            p.update(3)
            p.set_postfix(loss=1.0)
        assert stream.getvalue() == ""
    out = io.StringIO()
    assert list(iterate(range(5), desc="x", stream=out, enabled=False)) == [0, 1, 2, 3, 4]
    assert out.getvalue() == ""


@pytest.mark.parametrize(
    ("value", "stream_cls", "expected"),
    [
        ("bar", io.StringIO, "bar"),
        ("lines", FakeTTY, "lines"),
        ("off", FakeTTY, "off"),
        ("OFF", io.StringIO, "off"),
        ("auto", FakeTTY, "bar"),
        ("", io.StringIO, "lines"),
    ],
)
def test_env_override_forces_mode(monkeypatch: pytest.MonkeyPatch, value: str, stream_cls: type,
                                  expected: str) -> None:
    monkeypatch.setenv(ENV_VAR, value)
    assert resolve_mode(stream_cls()) == expected


def test_env_override_applies_to_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "lines")
    tty = FakeTTY()
    with progress(2, desc="x", stream=tty, clock=FakeClock()) as p:
        p.update(2)
    assert "\r" not in tty.getvalue() and len(_lines(tty)) == 2

    monkeypatch.setenv(ENV_VAR, "bar")
    plain = io.StringIO()
    with progress(2, desc="x", stream=plain) as p:
        p.update(2)
    assert "\r" in plain.getvalue()

    monkeypatch.setenv(ENV_VAR, "off")
    plain = io.StringIO()
    with progress(2, desc="x", stream=plain) as p:
        p.update(2)
    assert plain.getvalue() == ""

    monkeypatch.setenv(ENV_VAR, "lines")  # env cannot switch on what the caller disabled
    assert resolve_mode(io.StringIO(), enabled=False) == "off"


def test_env_override_unknown_value_warns_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "fancy")
    with pytest.warns(UserWarning, match=ENV_VAR):
        assert resolve_mode(io.StringIO()) == "lines"


def test_iterate_wraps_and_counts() -> None:
    out = io.StringIO()
    items = list(iterate([10, 20, 30, 40], desc="images", stream=out, every_steps=2, clock=FakeClock()))
    assert items == [10, 20, 30, 40]
    lines = _lines(out)
    assert len(lines) == 3
    assert lines[0].startswith("images: 2/4 batches (50%)")  # total taken from len()
    assert lines[-1].startswith("images: done 4/4 batches in ")

    out = io.StringIO()
    gen = (i for i in range(7))
    assert sum(iterate(gen, desc="gen", stream=out, every_steps=100, clock=FakeClock())) == 21
    assert _lines(out) == ["gen: done 7 batches in 0.0s"]


def test_module_import_does_not_import_tqdm() -> None:
    code = "import sys, vsekit.utils.progress; print('tqdm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
