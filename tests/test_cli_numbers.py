"""Every number of the command line is read by one of vsekit's argument types: ASCII digits only, bounded,
finite, and refused by argparse in one line (exit 2) -- never Python's ``int``/``float`` as they are, whose
values (0, negative, nan, inf, 10**30, ``1_0``, Arabic-Indic digits) reached DataLoader, NumPy or torch and
ended in tracebacks."""

from __future__ import annotations

import argparse
import math

import pytest
from test_index import cli  # tests/ is on sys.path (no package)

from vsekit.cli import build_parser

HOSTILE = ["\u0665", "1_0", "+5", " 5", "nan", "inf", "-inf", "-1", "9" * 40, "", "0x10", "1e400"]


def _typed_actions():
    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, [*path, name])
            elif action.type is not None:
                yield " ".join([*path, *action.option_strings[-1:]]), action.type

    return list(walk(build_parser(), []))


def test_no_option_reads_numbers_with_pythons_int_or_float():
    raw = [name for name, kind in _typed_actions() if kind in (int, float)]
    assert not raw, f"options read with int()/float() as they are: {raw}"


@pytest.mark.parametrize("name, kind", _typed_actions(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_typed_option_refuses_hostile_numbers_as_a_usage_error(name, kind):
    for text in HOSTILE:
        try:
            value = kind(text)
        except argparse.ArgumentTypeError:
            continue  # argparse prints it as one usage line
        except Exception as e:  # noqa: BLE001 - anything else is a traceback (or argparse's vaguer message)
            pytest.fail(f"{name} {text!r}: {type(e).__name__}: {e}")
        # large numbers are taken where they are harmless (timeouts, sizes); spaces in sizes (``2 MB``) and row lists
        assert text in ("9" * 40, " 5"), f"{name} accepted {text!r} as {value!r}"
        for v in value if isinstance(value, list) else [value]:
            assert isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, (name, text, value)


@pytest.mark.parametrize("argv", [
    ("eval", "run", "--batch-size", "0"), ("eval", "run", "--max-images", "-1"),
    ("encode", "run", "--captions", "c.txt", "--out", "e.npy", "--batch-size", "-1"),
    ("semantics", "fit", "--data", "demo", "--out", "sem", "--seed", "-1"),
    ("semantics", "fit", "--data", "demo", "--out", "sem", "--n-components", "0"),
    ("semantics", "fit", "--data", "demo", "--out", "sem", "--n-iter", "-1"),
    ("imagine", "run", "red", "--out", "x.png", "--seed", str(2**70)),
    ("features", "extract", "--data", "demo", "--out", "f", "--workers", "-1"),
    ("serve", "ix", "--torch-threads", "99999999999"),
    ("search", "ix", "red", "-k", "\u0665"),
    ("caption", "run", "--length-norm", "nan"),
])
def test_bad_numbers_end_in_one_usage_line(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli(*argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: argument " in err and "Traceback" not in err, err
