"""Property-based tests (hypothesis) of every data reader on hostile input.

Each test generates files a careless user or an attacker could hand us (truncated, zero-byte, animated, CMYK,
16-bit and palette images; non-UTF-8, empty and multi-line captions; CSV with missing or extra columns;
garbage JSON lines; feature files with NaN/inf or the wrong counts; random bytes) and checks that the reader
either returns a valid :class:`Corpus` or raises a :class:`DataError` whose message names the file. Any other
exception (a crash deep in PIL, numpy or the json module) fails the test.

Runs are deterministic (``derandomize``, no example database) and small: the whole file takes about 10 s.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import unicodedata
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from vsekit.data.checks import check_images
from vsekit.data.corpus import Corpus, DataError
from vsekit.data.formats.folder import read_folder
from vsekit.data.formats.karpathy import read_karpathy
from vsekit.data.formats.pairs import read_pairs
from vsekit.data.formats.precomp import read_precomp
from vsekit.data.images import ImageLoadError, load_rgb
from vsekit.errors import VsekitError

# damaged TIFFs make PIL warn ("Corrupt EXIF data") before it fails or recovers: expected here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# VSEKIT_PROPERTY_EXAMPLES=2000 (and VSEKIT_PROPERTY_RANDOM=1 for fresh examples) for a longer hunt
SETTINGS = settings(max_examples=int(os.environ.get("VSEKIT_PROPERTY_EXAMPLES", "150")), deadline=None,
                    derandomize=not os.environ.get("VSEKIT_PROPERTY_RANDOM"), database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------- outcomes and invariants


def outcome(read: Callable[[], Corpus], *files: Path) -> Corpus | None:
    """``read()``: a Corpus, or None after a DataError whose message names one of ``files``. Any other
    exception propagates and fails the test."""
    try:
        corpus = read()
    except DataError as exc:
        assert isinstance(exc, VsekitError)
        message = str(exc)
        for f in files:
            message = message.replace(str(f), "FILE")
        event(f"DataError: {message[:40]}")
        assert len(str(exc)) < 2000  # no megabyte of repr in a message
        assert "FILE" in message, f"message names none of {files}: {exc}"
        return None
    event(f"corpus of {min(corpus.num_captions, 3)}+ captions")
    return corpus


def assert_valid(corpus: Corpus) -> None:
    """The invariants every reader promises, and (image corpora) that after a decode check every image
    left decodes to RGB with :func:`load_rgb`."""
    n, m = corpus.num_images, corpus.num_captions
    assert all(isinstance(c, str) and c and c == c.strip() for c in corpus.captions)
    if corpus.meta.get("format") in ("pairs", "precomp", "folder"):  # no invisible or control character is kept
        assert not any(unicodedata.category(ch) in ("Cc", "Cf") and ch not in "\t\n\r"
                       for c in corpus.captions for ch in c)
    assert corpus.caption_to_image.dtype == np.int64 and corpus.caption_to_image.shape == (m,)
    if m:
        assert 0 <= corpus.caption_to_image.min() and corpus.caption_to_image.max() < n
    assert len(corpus.image_ids) == n and len(set(corpus.image_ids)) == n
    if corpus.caption_ids is not None:
        assert len(corpus.caption_ids) == m
    if corpus.features is not None:
        assert corpus.features.shape[0] == n and n > 0
        if np.issubdtype(corpus.features.dtype, np.floating):
            assert np.isfinite(np.asarray(corpus.features)).all()
        return
    assert corpus.image_paths is not None and len(corpus.image_paths) == n
    try:
        checked = check_images(corpus, skip_missing=True, decode=True, log=_quiet)
    except DataError as exc:  # every image is bad
        assert "all" in str(exc) and str(corpus.image_paths[0]) in str(exc)
        return
    assert checked.num_images >= 1
    for path in checked.image_paths:
        im = load_rgb(path)
        assert im.mode == "RGB" and im.width >= 1 and im.height >= 1


# ---------------------------------------------------------------- images


def _noise(w: int, h: int, channels: int, seed: int, dtype=np.uint8, high: int = 256) -> np.ndarray:
    shape = (h, w) if channels == 1 else (h, w, channels)
    return np.random.default_rng(seed).integers(0, high, shape, dtype=dtype)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _palette_transparent(w: int, h: int, seed: int) -> bytes:
    im = Image.fromarray(_noise(w, h, 1, seed, high=4)).convert("P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (252 * 3))
    return _save(im, "PNG", transparency=0)


def _animated_gif(w: int, h: int, seed: int) -> bytes:
    frames = [Image.fromarray(_noise(w, h, 3, seed + k)) for k in range(3)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)


IMAGE_KINDS: dict[str, Callable[[int, int, int], bytes]] = {
    "rgb.png": lambda w, h, s: _save(Image.fromarray(_noise(w, h, 3, s)), "PNG"),
    "rgb.jpg": lambda w, h, s: _save(Image.fromarray(_noise(w, h, 3, s)), "JPEG"),
    "cmyk.jpg": lambda w, h, s: _save(Image.fromarray(_noise(w, h, 4, s), "CMYK"), "JPEG"),
    "grey16.png": lambda w, h, s: _save(Image.fromarray(_noise(w, h, 1, s, np.uint16, 65536)), "PNG"),
    "palette_alpha.png": _palette_transparent,
    "rgba.png": lambda w, h, s: _save(Image.fromarray(_noise(w, h, 4, s)), "PNG"),
    "la.png": lambda w, h, s: _save(Image.fromarray(_noise(w, h, 2, s), "LA"), "PNG"),
    "bilevel.png": lambda w, h, s: _save(Image.fromarray(_noise(w, h, 1, s)).convert("1"), "PNG"),
    "animated.gif": _animated_gif,
    "rgba.webp": lambda w, h, s: _save(Image.fromarray(_noise(w, h, 4, s)), "WEBP"),
    "float.tif": lambda w, h, s: _save(Image.fromarray(_noise(w, h, 1, s).astype(np.float32) / 255), "TIFF"),
    "rgb.bmp": lambda w, h, s: _save(Image.fromarray(_noise(w, h, 3, s)), "BMP"),
}


@st.composite
def image_bytes(draw) -> tuple[str, bytes]:
    """(file name, content): an image of some mode and size, possibly damaged."""
    name = draw(st.sampled_from(sorted(IMAGE_KINDS)))
    thin = draw(st.sampled_from([None, (1, 37), (37, 1)]))
    w, h = thin or (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    data = IMAGE_KINDS[name](w, h, draw(st.integers(0, 3)))
    damage = draw(st.sampled_from(["none", "none", "truncate", "zero", "flip", "random", "append"]))
    if damage == "truncate":
        data = data[: draw(st.integers(1, max(1, len(data) - 1)))]
    elif damage == "zero":
        data = b""
    elif damage == "flip":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        data = bytes(buf)
    elif damage == "random":
        data = draw(st.binary(max_size=64))
    elif damage == "append":
        data += draw(st.binary(min_size=1, max_size=32))
    return name, data


@SETTINGS
@given(image_bytes())
def test_load_rgb_and_image_checks_agree(image: tuple[str, bytes]) -> None:
    name, data = image
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        try:
            im = load_rgb(path)
        except ImageLoadError as exc:
            assert str(exc).startswith(f"{path}: ") and exc.__context__ is None
            im = None
        if im is not None:
            assert im.mode == "RGB" and im.width >= 1 and im.height >= 1
            assert np.asarray(im).shape == (im.height, im.width, 3)
        corpus = Corpus(name="one", captions=["a caption"], caption_to_image=[0], image_ids=[name],
                        image_paths=[path])
        decoded = outcome(lambda: check_images(corpus, decode=True), path)
        assert (decoded is not None) == (im is not None)  # the decode check fails exactly when load_rgb does
        headers = outcome(lambda: check_images(corpus), path)
        if headers is None:
            assert im is None  # an unreadable header never decodes


# ---------------------------------------------------------------- hostile data files

IMAGE_NAMES = ["rgb.png", "cmyk.jpg", "grey16.png", "palette_alpha.png", "animated.gif", "cut.png",
               "empty.jpg", "missing.png", "sub/../rgb.png", "~nosuchuser/x.png", " ", ""]
GOOD_IMAGES = ["rgb.png", "cmyk.jpg", "grey16.png", "palette_alpha.png", "animated.gif"]
nasty_text = st.text(st.sampled_from(list("ab ,;\"'\t\n\r\x00\x0c\x1b\u200b\u202e\ufeff\u2028\u00e9\U0001f600\\{}[]:")),
                     max_size=12)
# "a d\u200bog\x1b[0m": kept as "a dog [0m" (zero-width space dropped, escape as a space) where readers clean text
good_captions = st.one_of(st.sampled_from(["a dog", "  two cats  ", "caf\u00e9 \U0001f600", "x\u2028y",
                                           "a d\u200bog\x1b[0m"]),
                          st.text(st.sampled_from(list("ab ,;\"'\u00e9")), min_size=1, max_size=8).filter(str.strip))
bad_captions = st.one_of(st.sampled_from(["", "   ", "\t"]), nasty_text)
splits = st.sampled_from(["train", "test", "val", "dev", " train "])
bad_splits = st.sampled_from(["", "holdout", "TRAIN"])
labels = st.sampled_from(["", "0", "3", "-1", " 7 "])
bad_labels = st.sampled_from(["x", "1.5", "1e3", str(2**70), "--1"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.sampled_from([2**70, -(2**65)]) | nasty_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(nasty_text, children, max_size=3),
    max_leaves=6,
)


class Dice:
    """The choices of one example: whether it is hostile at all, and which parts are.

    A ``random.Random`` seeded by hypothesis decides, because hypothesis's own small-integer draws lean to
    the edges and would make almost every example hostile; the values themselves are drawn by hypothesis.
    About half the examples are clean data (so the invariants of a valid corpus are checked too), the others
    have a few hostile parts.
    """

    def __init__(self, draw, hostile_share: float = 0.5) -> None:
        self.draw = draw
        self.rnd = draw(st.randoms(use_true_random=True))
        self.hostile = self.rnd.random() < hostile_share

    def rare(self, percent: float) -> bool:
        return self.hostile and self.rnd.random() * 100 < percent

    def pick(self, good, bad, percent: float = 10):
        return self.draw(bad) if self.rare(percent) else self.draw(good)

    def choice(self, options: list):
        return self.rnd.choice(options)

    def splice(self, data: bytes) -> bytes:
        """Maybe a byte sequence that is not UTF-8 somewhere in ``data``, or a byte-order mark before it."""
        if data and self.rare(25):
            at = self.rnd.randint(0, len(data))
            bad = self.choice([b"\xff", b"\xe9", b"\xc3(", b"\xf0\x28\x8c", b"\xed\xa0\x80", b"\xe2\x82"])
            return data[:at] + bad + data[at:]
        if self.rnd.random() < 0.1:
            return b"\xef\xbb\xbf" + data
        return data


# ---------------------------------------------------------------- pairs: CSV / JSONL / JSON


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """A few images shared by the examples: good ones of awkward modes, a truncated one, an empty one."""
    root = tmp_path_factory.mktemp("images")
    for name in GOOD_IMAGES:
        (root / name).write_bytes(IMAGE_KINDS[name](5, 4, 0))
    whole = IMAGE_KINDS["rgb.png"](32, 32, 1)
    (root / "cut.png").write_bytes(whole[: len(whole) // 2])
    (root / "empty.jpg").write_bytes(b"")
    return root


@st.composite
def csv_bytes(draw) -> bytes:
    dice = Dice(draw)
    header = dice.choice([["image", "caption"], ["caption", "image"], ["image", "caption", "split", "label"],
                          [" image ", "caption ", "split"], ["label", "image", "notes", "caption"]])
    if dice.rare(20):
        header = dice.choice([["image"], ["img", "caption"], ["image", "caption", "caption"], []])
    rows = [header]
    for _ in range(dice.rnd.randint(0, 6)):
        row = []
        for column in header:
            good, bad = {"image": (st.sampled_from(GOOD_IMAGES), st.sampled_from(IMAGE_NAMES)),
                         "caption": (good_captions, bad_captions), "split": (splits, bad_splits),
                         "label": (labels, bad_labels)}.get(column.strip(), (nasty_text, nasty_text))
            row.append(dice.pick(good, bad, percent=8))
        if dice.rare(10):  # missing or extra fields
            extra = dice.choice([-2, -1, 1, 2])
            row = row[:extra] if extra < 0 else row + [draw(nasty_text) for _ in range(extra)]
        rows.append(row)
    if not dice.rare(30):  # properly quoted (quoted newlines, commas, quotes)
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator=dice.choice(["\n", "\r\n", "\r"])).writerows(rows)
        text = buffer.getvalue()
    else:  # written by hand: no quoting at all
        text = "".join(",".join(row) + "\n" for row in rows)
    return dice.splice(text.encode("utf-8", "surrogatepass"))


def pair_record(draw, dice: Dice) -> dict:
    """One row as a JSON object; whether rows have a split and a label is decided once per file."""
    if not hasattr(dice, "columns"):
        dice.columns = {"split": dice.rnd.random() < 0.5, "label": dice.rnd.random() < 0.5}
    record = {}
    for key, good, bad in (("image", st.sampled_from(GOOD_IMAGES), st.sampled_from(IMAGE_NAMES) | json_values),
                           ("caption", good_captions, bad_captions | json_values),
                           ("split", splits, bad_splits | json_values),
                           ("label", st.integers(-1, 5) | labels, bad_labels | json_values)):
        if not dice.columns.get(key, True) and not dice.rare(5):
            continue
        if dice.rare(4):
            continue  # a required key missing
        record[key] = dice.pick(good, bad, percent=6)
    return record


@st.composite
def jsonl_bytes(draw) -> bytes:
    dice = Dice(draw)
    lines = []
    for _ in range(dice.rnd.randint(0, 6)):
        kind = dice.choice(["blank", "garbage", "scalar", "deep", "huge", "truncated"]) if dice.rare(15) else "record"
        if kind == "record":
            lines.append(json.dumps(pair_record(draw, dice), ensure_ascii=dice.rnd.random() < 0.5).encode())
        elif kind == "blank":
            lines.append(b"   ")
        elif kind == "garbage":
            lines.append(draw(st.binary(max_size=20)).replace(b"\n", b""))
        elif kind == "scalar":
            lines.append(json.dumps(draw(json_values)).encode())
        elif kind == "deep":
            lines.append(b"[" * 50000 + b"]" * 50000)
        elif kind == "huge":
            lines.append(b"9" * 5000)
        else:
            lines.append(json.dumps(pair_record(draw, dice)).encode()[:-3])
    ending = dice.choice([b"\n", b"\r\n"])
    return dice.splice(ending.join(lines) + ending)


@st.composite
def json_array_bytes(draw) -> bytes:
    dice = Dice(draw)
    if dice.rare(30):
        return draw(st.binary(max_size=200)) if dice.rnd.random() < 0.5 else json.dumps(draw(json_values)).encode()
    rows = [pair_record(draw, dice) for _ in range(dice.rnd.randint(0, 5))]
    return dice.splice(json.dumps(rows, indent=dice.choice([None, 1])).encode())


@SETTINGS
@given(data=csv_bytes(), split=st.sampled_from([None, None, "train", "test", "dev"]), tsv=st.booleans())
def test_pairs_csv_hostile(image_dir: Path, data: bytes, split: str | None, tsv: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("pairs.tsv" if tsv else "pairs.csv")
        path.write_bytes(data.replace(b",", b"\t") if tsv else data)
        corpus = outcome(lambda: read_pairs(path, split, image_root=image_dir), path)
        if corpus is not None:
            assert_valid(corpus)


@SETTINGS
@given(data=jsonl_bytes(), split=st.sampled_from([None, None, "train", "val"]))
def test_pairs_jsonl_hostile(image_dir: Path, data: bytes, split: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "captions.jsonl"
        path.write_bytes(data)
        corpus = outcome(lambda: read_pairs(path, split, image_root=image_dir), path)
        if corpus is not None:
            assert_valid(corpus)


@SETTINGS
@given(data=json_array_bytes())
def test_pairs_json_file_hostile(image_dir: Path, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.json"
        path.write_bytes(data)
        corpus = outcome(lambda: read_pairs(path, None, image_root=image_dir), path)
        if corpus is not None:
            assert_valid(corpus)


# ---------------------------------------------------------------- Karpathy JSON

_ABSENT = object()


def _field(dice: Dice, good, hostile=json_values, percent: float = 5):
    """A field's value: usually ``good``, sometimes ``hostile``, sometimes absent (``_ABSENT``)."""
    if not dice.rare(percent):
        return dice.draw(good)
    return _ABSENT if dice.rnd.random() < 0.5 else dice.draw(hostile)


def _present(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if v is not _ABSENT}


@st.composite
def karpathy_bytes(draw) -> bytes:
    dice = Dice(draw)
    if dice.rare(10):
        return draw(st.binary(max_size=200))
    images = []
    for i in range(dice.rnd.randint(1, 5)):
        sentences = []
        for _ in range(dice.rnd.randint(0, 3)):
            sentence = _present({"raw": _field(dice, good_captions, bad_captions | json_values),
                                 "sentid": _field(dice, st.integers(0, 3))})
            if dice.rnd.random() < 0.2:
                sentence = _present({"tokens": _field(dice, st.lists(nasty_text.filter(str.strip), min_size=1,
                                                                     max_size=3))})
            sentences.append(draw(json_values) if dice.rare(3) else sentence)
        entry = _present({
            "filename": _field(dice, st.sampled_from(GOOD_IMAGES), st.sampled_from(IMAGE_NAMES) | json_values),
            "filepath": _field(dice, st.sampled_from([".", "", "sub/.."])),
            "split": _field(dice, st.sampled_from(["train", "train", "restval", "val", "test"]),
                            st.sampled_from(["dev", "holdout", ""]) | json_values),
            "cocoid": _field(dice, st.just(1000 + i), st.integers(0, 3) | json_values),
            "label": _field(dice, st.integers(-1, 4), st.sampled_from([2**70, True, "cat", 1.5])),
            "sentences": _field(dice, st.just(sentences)),
        })
        images.append(draw(json_values) if dice.rare(3) else entry)
    data = images if dice.rare(4) else _present({"images": images, "dataset": _field(dice, st.just("tiny"))})
    return dice.splice(json.dumps(data, indent=dice.choice([None, 1])).encode())


@SETTINGS
@given(data=karpathy_bytes(), split=st.sampled_from(["train", "train", "train", "test", "val", "dev", "testall"]),
       restval=st.booleans(), max_images=st.sampled_from([None, None, 1, 2]))
def test_karpathy_hostile(image_dir: Path, data: bytes, split: str, restval: bool, max_images: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dataset_x.json"
        path.write_bytes(data)
        corpus = outcome(lambda: read_karpathy(path, image_dir, split, restval_into_train=restval,
                                               max_images=max_images), path)
        if corpus is not None:
            assert_valid(corpus)


# ---------------------------------------------------------------- precomputed features


@st.composite
def precomp_files(draw) -> tuple[bytes, bytes]:
    dice = Dice(draw)
    n = 0 if dice.rare(5) else dice.rnd.randint(1, 5)
    dims = [dice.rnd.randint(1, 4) for _ in range(dice.rnd.randint(1, 2))]
    if dice.rare(8):
        dims = [dice.rnd.randint(0, 4) for _ in range(dice.rnd.randint(0, 3))]
    dtype = dice.choice(["float32", "float32", "float16", "float64", "int8"])
    if dice.rare(6):
        dtype = dice.choice(["bool", "complex64", "<U2"])
    features = np.random.default_rng(dice.rnd.randint(0, 9)).standard_normal((n, *dims)).astype(dtype)
    if features.size and np.issubdtype(features.dtype, np.inexact) and dice.rare(35):
        flat = features.reshape(-1)
        for _ in range(dice.rnd.randint(1, 2)):
            flat[dice.rnd.randrange(flat.size)] = dice.choice([np.nan, np.inf, -np.inf])
    buffer = io.BytesIO()
    np.save(buffer, features)
    ims = buffer.getvalue()
    if dice.rare(20):
        damage = dice.choice(["truncate", "zero", "random", "header"])
        if damage == "truncate":
            ims = ims[: dice.rnd.randrange(len(ims))]
        elif damage == "zero":
            ims = b""
        elif damage == "random":
            ims = draw(st.binary(max_size=100))
        else:
            buf = bytearray(ims)
            buf[dice.rnd.randrange(min(len(buf), 128))] = dice.rnd.randrange(256)
            ims = bytes(buf)
    per_image = dice.rnd.randint(1, 5)
    m = max(0, n * per_image + (dice.choice([1, -1, 3]) if dice.rare(15) else 0))
    lines = [dice.pick(good_captions, bad_captions, percent=3).replace("\n", " ").replace("\r", " ")
             for _ in range(m)]
    return ims, dice.splice("".join(line + "\n" for line in lines).encode("utf-8", "surrogatepass"))


@SETTINGS
@given(files=precomp_files(), max_images=st.sampled_from([None, None, 1, 3]))
def test_precomp_hostile(files: tuple[bytes, bytes], max_images: int | None) -> None:
    ims, caps = files
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "train_ims.npy").write_bytes(ims)
        (root / "train_caps.txt").write_bytes(caps)
        corpus = outcome(lambda: read_precomp(root, "train", max_images=max_images),
                         root / "train_ims.npy", root / "train_caps.txt")
        if corpus is not None:
            assert_valid(corpus)
            assert corpus.num_captions == corpus.num_images * corpus.meta["captions_per_image"]


# ---------------------------------------------------------------- folder of images with .txt captions


@SETTINGS
@given(images=st.lists(image_bytes(), min_size=1, max_size=3),
       texts=st.lists(st.one_of(st.none(), nasty_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
                                st.binary(max_size=12)), min_size=3, max_size=3))
def test_folder_hostile(images: list[tuple[str, bytes]], texts: list[bytes | None]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for k, (name, data) in enumerate(images):
            path = root / f"{k}_{name}"
            path.write_bytes(data)
            if texts[k] is not None:
                path.with_suffix(".txt").write_bytes(texts[k])
        corpus = outcome(lambda: read_folder(root), root)
        if corpus is not None:
            assert_valid(corpus)
