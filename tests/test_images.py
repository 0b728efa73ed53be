"""``load_rgb`` on every PIL mode we expect in the wild, its errors, and the field-standard transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vsekit.data.corpus import DataError
from vsekit.data.images import (
    ACCEPTED_FORMATS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageLoadError,
    applies_exif,
    build_transform,
    decode_rgb,
    load_rgb,
)

SIZE = (12, 9)  # width, height


def _rgba(path: Path) -> None:
    a = np.zeros((SIZE[1], SIZE[0], 4), dtype=np.uint8)
    a[..., 0] = 200  # red under full transparency on the left half
    a[:, SIZE[0] // 2 :, 3] = 255
    Image.fromarray(a).save(path)


def _palette_with_transparency(path: Path) -> None:
    im = Image.new("P", SIZE, 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    im.paste(1, (0, 0, SIZE[0], 3))
    im.save(path, transparency=0)


def _grey16(path: Path) -> None:
    a = np.full((SIZE[1], SIZE[0]), 65535, dtype=np.uint16)
    a[:, : SIZE[0] // 2] = 32896  # 128 * 257
    Image.fromarray(a).save(path)


WRITERS = {
    "rgba.png": _rgba,
    "palette.png": _palette_with_transparency,
    "grey.png": lambda p: Image.new("L", SIZE, 77).save(p),
    "grey_alpha.png": lambda p: Image.new("LA", SIZE, (77, 255)).save(p),
    "cmyk.jpg": lambda p: Image.new("CMYK", SIZE, (0, 255, 255, 0)).save(p, quality=95),
    "bilevel.png": lambda p: Image.new("1", SIZE, 1).save(p),
    "grey16.png": _grey16,
    "rgb.jpg": lambda p: Image.new("RGB", SIZE, (1, 2, 3)).save(p),
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_load_rgb_gives_rgb_of_the_right_size(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    WRITERS[name](path)
    im = load_rgb(path)
    assert im.mode == "RGB" and im.size == SIZE
    assert np.asarray(im).shape == (SIZE[1], SIZE[0], 3)


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    _rgba(tmp_path / "a.png")
    a = np.asarray(load_rgb(tmp_path / "a.png"))
    assert (a[:, : SIZE[0] // 2] == 255).all()  # red under alpha 0 is not exposed
    assert (a[:, SIZE[0] // 2 :] == [200, 0, 0]).all()
    _palette_with_transparency(tmp_path / "p.png")
    p = np.asarray(load_rgb(tmp_path / "p.png"))
    assert (p[:3] == [0, 0, 255]).all() and (p[3:] == 255).all()


def test_pixel_values_of_converted_modes(tmp_path: Path) -> None:
    _grey16(tmp_path / "g.png")
    g = np.asarray(load_rgb(tmp_path / "g.png"))
    assert (g[:, : SIZE[0] // 2] == 128).all() and (g[:, SIZE[0] // 2 :] == 255).all()  # scaled, not clipped
    WRITERS["cmyk.jpg"](tmp_path / "c.jpg")
    c = np.asarray(load_rgb(tmp_path / "c.jpg")).astype(int)
    assert c[..., 0].min() > 200 and c[..., 1:].max() < 60  # CMYK (0, 255, 255, 0) is red
    WRITERS["bilevel.png"](tmp_path / "b.png")
    assert (np.asarray(load_rgb(tmp_path / "b.png")) == 255).all()


def test_exif_orientation_is_applied_unless_turned_off(tmp_path: Path) -> None:
    im = Image.new("RGB", (10, 4), (9, 9, 9))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    im.save(tmp_path / "o.jpg", exif=exif)
    assert load_rgb(tmp_path / "o.jpg").size == (4, 10)
    assert load_rgb(tmp_path / "o.jpg", exif_transpose=False).size == (10, 4)
    assert decode_rgb((tmp_path / "o.jpg").read_bytes()).size == (4, 10)
    assert applies_exif({"format": "folder"}) and applies_exif({"format": "pairs"}) and applies_exif(None)
    assert not applies_exif({"format": "karpathy"})  # the reference benchmarks were read as stored


def test_missing_file_raises_image_load_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError) as err:
        load_rgb(path)
    assert str(path) in str(err.value) and "not found" in str(err.value)
    assert isinstance(err.value, DataError) and isinstance(err.value, ValueError)


def test_garbage_and_truncated_files_raise_image_load_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x00\x01not an image at all" * 10)
    with pytest.raises(ImageLoadError, match=r"garbage\.png: not a recognised image format"):
        load_rgb(garbage)

    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for name in ("cut.jpg", "cut.png"):
        whole = tmp_path / f"whole_{name}"
        noise.save(whole)
        data = whole.read_bytes()
        cut = tmp_path / name
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageLoadError) as err:
            load_rgb(cut)
        assert str(cut) in str(err.value)
        assert err.value.__cause__ is None and err.value.__context__ is None  # no PIL traceback attached

    with pytest.raises(ImageLoadError, match="directory"):
        load_rgb(tmp_path)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("image_size", [32, 224])
def test_transforms_give_square_normalised_tensors(tmp_path: Path, train: bool, image_size: int) -> None:
    torch.manual_seed(0)
    WRITERS["rgba.png"](tmp_path / "a.png")
    im = load_rgb(tmp_path / "a.png").resize((50, 30))
    x = build_transform(train, image_size)(im)
    assert x.shape == (3, image_size, image_size) and x.dtype == torch.float32


def test_eval_transform_is_resize_then_center_crop() -> None:
    ops = build_transform(False, 224).transforms
    assert [type(t).__name__ for t in ops] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert ops[0].size == 256 and list(ops[1].size) == [224, 224]
    assert build_transform(False, 32, resize=40).transforms[0].size == 40
    assert tuple(ops[3].mean) == IMAGENET_MEAN and tuple(ops[3].std) == IMAGENET_STD
    train_ops = build_transform(True, 224).transforms
    assert [type(t).__name__ for t in train_ops] == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "ToTensor",
        "Normalize",
    ]
    # a white image normalises to (1 - mean) / std in every channel
    white = build_transform(False, 8)(Image.new("RGB", (10, 10), (255, 255, 255)))
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(white[:, 0, 0], expected)


@pytest.mark.parametrize("fmt", ["gif", "png", "tiff", "webp"])
def test_animated_image_gives_first_frame_and_closes_the_file(tmp_path: Path, fmt: str) -> None:
    import gc
    import warnings

    frames = [Image.new("RGB", SIZE, (200, 10 * i, 0)) for i in range(3)]
    path = tmp_path / f"anim.{fmt}"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        im = load_rgb(path)
        assert im.mode == "RGB" and im.size == SIZE
        assert np.asarray(im)[0, 0, 1] < 5  # frame 0 (green 0), not a later frame
        del im
        gc.collect()


@pytest.mark.parametrize("size", [(1, 40), (40, 1), (1, 1)])
def test_thin_images(tmp_path: Path, size: tuple[int, int]) -> None:
    Image.new("RGB", size, (5, 6, 7)).save(tmp_path / "thin.png")
    im = load_rgb(tmp_path / "thin.png")
    assert im.size == size and im.mode == "RGB"


def test_any_decoder_failure_is_an_image_load_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import struct

    from PIL import PngImagePlugin

    Image.new("RGB", SIZE).save(tmp_path / "a.png")
    for exc in (struct.error("unpack requires a buffer of 4 bytes"), IndexError("list index out of range"),
                OverflowError("size too large"), MemoryError()):
        def broken(self, exc=exc):
            raise exc

        monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", broken)
        with pytest.raises(ImageLoadError, match=r"a\.png: cannot decode") as err:
            load_rgb(tmp_path / "a.png")
        assert err.value.__context__ is None


def test_training_and_checks_follow_the_corpus_exif_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data sets' loader (training, evaluation, index encoding) and the decode check apply EXIF
    orientation for every source but Karpathy's reference sets, which are read as stored."""
    from vsekit.data import checks
    from vsekit.data.corpus import Corpus
    from vsekit.data.datasets import ImageSource

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (10, 4), (9, 9, 9)).save(tmp_path / "o.jpg", exif=exif)

    def corpus(fmt: str) -> Corpus:
        return Corpus(name=fmt, captions=["a"], caption_to_image=np.zeros(1, dtype=np.int64), image_ids=["o"],
                      image_paths=[tmp_path / "o.jpg"], meta={"format": fmt})

    assert ImageSource(corpus("folder"), transform=lambda im: im.size)(0) == (4, 10)
    assert ImageSource(corpus("pairs"), transform=lambda im: im.size)(0) == (4, 10)
    assert ImageSource(corpus("karpathy"), transform=lambda im: im.size)(0) == (10, 4)
    seen = []
    monkeypatch.setattr(checks, "load_rgb", lambda path, exif_transpose: seen.append(exif_transpose) or load_rgb(path))
    checks.check_images(corpus("karpathy"), decode=True)
    checks.check_images(corpus("folder"), decode=True)
    assert seen == [False, True]


@pytest.mark.parametrize("augment", [{"crop": "center", "hflip": True}, {"crop": "random", "hflip": True,
                                                                          "color_jitter": 0.3}])
def test_decoded_image_cache_gives_the_same_tensors_within_its_budget(tmp_path: Path, monkeypatch, augment) -> None:
    """The training images' cache keeps the deterministic prefix (decode + resize) and replays the random
    steps: the same tensors, draw for draw, as decoding every time; files are decoded once while it has room."""
    from vsekit.data import datasets
    from vsekit.data.corpus import Corpus

    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (30 + i, 41, 3), dtype=np.uint8)).save(paths[-1])
    corpus = Corpus(name="c", captions=["a"] * 6, caption_to_image=np.arange(6), image_ids=[str(i) for i in range(6)],
                    image_paths=paths, meta={"format": "folder"})
    transform = build_transform(True, 16, 20, augment, "square")
    loads = []
    real_load = datasets.ImageSource(corpus, transform)._load.func
    monkeypatch.setattr("vsekit.data.images.load_rgb", lambda path, **kw: loads.append(path) or real_load(path, **kw))
    plain = datasets.ImageSource(corpus, transform)
    one_image = 20 * 20 * 3 if augment["crop"] == "random" else 16 * 16 * 3
    cached = datasets.ImageSource(corpus, transform, cache_bytes=4 * one_image + 1)
    for _ in range(3):  # epochs
        for row in range(6):
            torch.manual_seed(row)
            want = plain(row)
            torch.manual_seed(row)
            torch.testing.assert_close(cached(row), want, rtol=0, atol=0)
    assert cached.cached_images == 4  # the budget holds four images; the other two are decoded every time
    assert len(loads) == 3 * 6 + (6 + 2 * 2)  # plain: every time; cached: all once, then the two uncached


def test_pixels_transform_is_the_pil_path_draw_for_draw() -> None:
    """The cached pixels skip PIL where the steps allow it: the same tensors and the same generator state after
    them; a step it does not know (colour jitter) keeps the PIL path."""
    from vsekit.data.images import pixels_transform, split_deterministic

    pixels = np.random.default_rng(1).integers(0, 256, (12, 9, 3), dtype=np.uint8)
    _, rest = split_deterministic(build_transform(True, 12, 12, {"crop": "center", "hflip": True}, "square"))
    fast = pixels_transform(rest)
    assert fast is not None
    for seed in range(6):  # both sides of the flip's coin
        torch.manual_seed(seed)
        want, after = rest(Image.fromarray(pixels)), torch.rand(1)
        torch.manual_seed(seed)
        torch.testing.assert_close(fast(pixels), want, rtol=0, atol=0)
        assert torch.rand(1) == after
    _, jitter = split_deterministic(build_transform(True, 12, 12, {"crop": "center", "color_jitter": 0.3}, "square"))
    assert pixels_transform(jitter) is None


def test_loader_workers_keep_no_decoded_images(tmp_path: Path) -> None:
    """A loader worker's cache would be dropped with the worker at the epoch's end: it keeps none."""
    from torch.utils.data import DataLoader, Dataset

    from vsekit.data import datasets
    from vsekit.data.corpus import Corpus

    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for p in paths:
        Image.new("RGB", (20, 20), (9, 9, 9)).save(p)
    corpus = Corpus(name="c", captions=["a"] * 3, caption_to_image=np.arange(3), image_ids=["0", "1", "2"],
                    image_paths=paths, meta={"format": "folder"})
    source = datasets.ImageSource(corpus, build_transform(True, 8, 8, {"crop": "center"}, "square"),
                                  cache_bytes=1 << 20)

    class Held(Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, row: int) -> int:
            source(row)
            return source.cached_images

    assert [int(n) for n in DataLoader(Held(), num_workers=1)] == [0, 0, 0]
    assert [Held()[row] for row in range(3)] == [1, 2, 3]  # the main process keeps them


# -- formats: an allow-list of raster decoders (issue 21) -----------------------------------------------------
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
       b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")


def _psd(width: int = 5, height: int = 4) -> bytes:
    """A minimal RGB Photoshop file (header, three empty sections, raw planes): Pillow's PSD plugin reads it."""
    import struct

    return (b"8BPS" + struct.pack(">H6sHIIHH", 1, b"\0" * 6, 3, height, width, 8, 3) + struct.pack(">I", 0) * 3
            + struct.pack(">H", 0) + bytes(range(3 * width * height)))


def _saved(fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def foreign_plugins(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return record_foreign_plugins(monkeypatch)


def record_foreign_plugins(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every call into a Pillow plugin outside ACCEPTED_FORMATS (its prefix check or its opener),
    and Ghostscript, which the EPS plugin runs to decode."""
    from PIL import EpsImagePlugin

    from vsekit.data.images import ACCEPTED_FORMATS

    Image.init()
    calls: list[str] = []

    def recording(fmt: str, fn):
        def call(*a, **k):
            calls.append(fmt)
            return fn(*a, **k)
        return call

    for fmt, (factory, accept) in list(Image.OPEN.items()):
        if fmt not in ACCEPTED_FORMATS:
            monkeypatch.setitem(Image.OPEN, fmt, (recording(fmt, factory), accept and recording(fmt, accept)))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", recording("gs", EpsImagePlugin.Ghostscript))
    return calls


def test_eps_named_jpg_is_refused_before_its_plugin_or_ghostscript_runs(tmp_path: Path, foreign_plugins) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(EPS)
    with pytest.raises(ImageLoadError, match=r"photo\.jpg: not a recognised image format \(accepted: JPEG, PNG"):
        load_rgb(path)
    with pytest.raises(ImageLoadError, match=r"^the upload: not a recognised image format"):
        decode_rgb(EPS, name="the upload")
    assert foreign_plugins == []


@pytest.mark.parametrize("fmt", ["PSD", "TGA", "ICO", "PCX", "SGI", "QOI", "DDS", "SPIDER"])
def test_other_formats_are_refused_without_their_decoder(tmp_path: Path, foreign_plugins, fmt: str) -> None:
    data = _psd() if fmt == "PSD" else _saved(fmt)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    with pytest.raises(ImageLoadError, match="not a recognised image format"):
        load_rgb(path)
    from vsekit.data.checks import _header_problem
    from vsekit.index.search import image_header_size

    assert _header_problem(path) == "not a recognised image"  # the header scan of data checks
    assert image_header_size(path) is None  # the header check of ``vsekit search --image``
    assert foreign_plugins == []


def test_every_accepted_extension_is_listed_and_decodes(tmp_path: Path) -> None:
    """One table: every extension folder sources list is one the decoder reads (AVIF included when Pillow
    has it), and a file of each accepted format decodes."""
    from vsekit.data.formats.folder import list_images
    from vsekit.data.images import _FORMAT_EXTENSIONS, ACCEPTED_FORMATS, IMAGE_EXTENSIONS

    for fmt in ACCEPTED_FORMATS:
        ext = _FORMAT_EXTENSIONS[fmt][0]
        Image.new("RGB", SIZE, (40, 80, 120)).save(tmp_path / f"img_{fmt.lower()}{ext}", format=fmt)
    (tmp_path / "notes.eps").write_bytes(EPS)
    listed = list_images(tmp_path)
    assert sorted(p.suffix for p in listed) == sorted(_FORMAT_EXTENSIONS[f][0] for f in ACCEPTED_FORMATS)
    assert all(load_rgb(p).size == SIZE for p in listed)
    assert IMAGE_EXTENSIONS == {e for f in ACCEPTED_FORMATS for e in _FORMAT_EXTENSIONS[f]}
    from PIL import features

    assert ("AVIF" in ACCEPTED_FORMATS) == bool(features.check_module("avif"))
    if "AVIF" in ACCEPTED_FORMATS:
        assert any(p.suffix == ".avif" for p in listed)


# -- memory -------------------------------------------------------------------------------------------------
def test_16bit_grey_conversion_holds_no_wide_copy(tmp_path: Path) -> None:
    """A 2000 x 2000 16-bit grey PNG (4 Mpixel) converts holding less than a 16-bit copy of it in NumPy
    arrays (it used to hold two float64 copies, 64 MB), with the same values as round(v / 257)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    a = rng.integers(0, 65536, size=(2000, 2000), dtype=np.uint16)
    a[0, :6] = [0, 128, 129, 385, 386, 65535]  # around the rounding boundaries
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
    tracemalloc.start()
    try:
        out = load_rgb(tmp_path / "g16.png")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * a.size, f"peak {peak / 1e6:.1f} MB of NumPy/Python memory for {a.size / 1e6:.0f} Mpixels"
    want = np.rint(a / 257.0).astype(np.uint8)
    got = np.asarray(out)
    assert (got[..., 0] == want).all() and (got[..., 1] == want).all() and (got[..., 2] == want).all()
    assert list(got[0, :6, 0]) == [0, 0, 1, 1, 2, 255]


def _png_header_only(width: int, height: int, colour_type: int = 6) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (RGBA by default) with almost no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_a_header_over_the_memory_budget_is_refused_before_decoding(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import PngImagePlugin

    from vsekit.data.images import ImageTooLargeError, decode_bytes

    loads: list[int] = []
    real_load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: loads.append(1) or real_load(self))
    path = tmp_path / "big.png"
    path.write_bytes(_png_header_only(9000, 9000))  # 81 Mpixel RGBA: 648 MB to decode and convert
    assert decode_bytes("RGBA", (9000, 9000)) == 9000 * 9000 * 8
    with pytest.raises(ImageTooLargeError, match=r"big\.png: decoding this 9000x9000 image \(mode RGBA\) would "
                                                 r"take about 618 MiB of memory; the limit is 256 MiB"):
        load_rgb(path, max_bytes=256 << 20)
    with pytest.raises(ImageTooLargeError, match="^the upload: decoding this 9000x9000"):
        decode_rgb(path.read_bytes(), name="the upload", max_bytes=256 << 20)
    assert loads == []  # refused from the header: no pixel was decoded
    # the estimate follows the mode: 1 byte/pixel grey without rotation, 16-bit grey, RGB rotated by EXIF
    assert decode_bytes("L", (10, 10), exif_transpose=False) == 100 * (1 + 4)
    assert decode_bytes("I;16", (10, 10)) == 100 * (2 + 5)
    assert decode_bytes("RGB", (10, 10)) == 100 * (4 + 4)


def test_a_progressive_jpeg_counts_its_coefficients_in_the_budget(tmp_path: Path) -> None:
    """libjpeg decodes a progressive JPEG through the DCT coefficients of the whole image, 2 bytes per pixel
    and component beside the pixels: a 36-megapixel one grew the process by 343 MB where the estimate said
    274 MB. The same image baseline still fits the budget that the progressive one exceeds."""
    import io

    from vsekit.data.images import ImageTooLargeError, decode_bytes

    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    encoded = {}
    for progressive in (False, True):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", progressive=progressive, subsampling=0)
        encoded[progressive] = buf.getvalue()
    baseline_budget = decode_bytes("RGB", (64, 48))
    assert decode_bytes("RGB", (64, 48), progressive=True) == baseline_budget + 64 * 48 * 6
    assert decode_rgb(encoded[False], max_bytes=baseline_budget).size == (64, 48)
    with pytest.raises(ImageTooLargeError, match=r"64x48 image \(mode RGB\)"):
        decode_rgb(encoded[True], max_bytes=baseline_budget)
    assert decode_rgb(encoded[True], max_bytes=baseline_budget + 64 * 48 * 6).size == (64, 48)


@pytest.mark.parametrize("fmt, extra", [("WEBP", 8), ("AVIF", 4)])
def test_webp_and_avif_count_what_their_decoders_hold(fmt: str, extra: int) -> None:
    """WebP's decoder hands the whole RGBA frame over as bytes that are then copied (a 16-megapixel file grew
    the process by 244 MB where the estimate said 122 MB); AVIF's holds its YUV planes."""
    import io

    from vsekit.data.images import ImageTooLargeError, decode_bytes

    if fmt not in ACCEPTED_FORMATS:
        pytest.skip(f"Pillow without {fmt}")
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), 90, dtype=np.uint8)).save(buf, fmt)
    plain = decode_bytes("RGB", (64, 48))
    assert decode_bytes("RGB", (64, 48), fmt=fmt) == plain + 64 * 48 * extra
    with pytest.raises(ImageTooLargeError):
        decode_rgb(buf.getvalue(), max_bytes=plain)
    assert decode_rgb(buf.getvalue(), max_bytes=plain + 64 * 48 * extra).size == (64, 48)


def test_a_jpeg_of_many_scans_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """libjpeg decodes each scan over the whole image: 5000 copies of a 59-byte scan made a 1.1 MB,
    36-megapixel JPEG take 12 s to decode (a 10 MB upload: minutes). The scans are counted in the bytes first."""
    import io

    from PIL import JpegImagePlugin

    import vsekit.data.images as images

    MAX_JPEG_SCANS = getattr(images, "MAX_JPEG_SCANS", 100)  # noqa: N806 - the module's constant
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(
        buf, "JPEG", progressive=True)
    good = buf.getvalue()
    sos = [i for i in range(len(good) - 1) if good[i: i + 2] == b"\xff\xda"]
    assert 2 < len(sos) < 20
    scan = good[sos[-2]: sos[-1]].split(b"\xff\xc4")[0]  # one scan (without a table that may follow it)
    bomb = good[: sos[-1]] + scan * MAX_JPEG_SCANS + good[sos[-1]:]
    (tmp_path / "bomb.jpg").write_bytes(bomb)
    loads: list[int] = []
    real_load = JpegImagePlugin.JpegImageFile.load
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", lambda self: loads.append(1) or real_load(self))
    with pytest.raises(ImageLoadError, match=rf"bomb\.jpg: a JPEG of more than {MAX_JPEG_SCANS} scans"):
        load_rgb(tmp_path / "bomb.jpg")
    with pytest.raises(ImageLoadError, match=rf"^the upload: a JPEG of more than {MAX_JPEG_SCANS} scans"):
        decode_rgb(bomb, name="the upload")
    assert loads == []  # refused from the bytes: nothing was decoded
    assert decode_rgb(good).size == (48, 32)  # a progressive JPEG of the usual scans is read


# -- property: every accepted mode decodes to the pixels PIL's own conversion gives ---------------------------
_LOSSLESS = {"1": ["PNG", "BMP", "TIFF", "PPM"], "L": ["PNG", "BMP", "TIFF", "PPM", "JPEG", "GIF"],
             "P": ["PNG", "BMP", "TIFF", "GIF"], "RGB": ["PNG", "BMP", "TIFF", "PPM", "JPEG", "WEBP", "AVIF"],
             "RGBA": ["PNG", "TIFF", "WEBP", "AVIF"], "LA": ["PNG", "TIFF"], "CMYK": ["JPEG", "TIFF"],
             "I;16": ["PNG", "TIFF"], "I": ["TIFF"], "F": ["TIFF"]}
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4, "I;16": 2, "I": 4, "F": 4}


def _expected_rgb(im: Image.Image) -> np.ndarray:
    """What load_rgb promises, computed the plain way: alpha over white, wide grey scaled in float64 (the
    formula load_rgb used before it worked in bands), everything else PIL's convert("RGB")."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode != "RGB" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16"):
            a = a / 257.0
        elif im.mode == "I":
            if a.size and a.max() > 255:
                a = np.clip(a, 0, 65535) / 257.0
        elif a.size and np.nanmax(a) <= 1.0:
            a = a * 255.0
        g = np.rint(np.clip(np.nan_to_num(a), 0, 255)).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


_MODES_AND_FORMATS = [(m, f) for m, fs in _LOSSLESS.items() for f in fs if f in ACCEPTED_FORMATS]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mf=st.sampled_from(_MODES_AND_FORMATS), w=st.integers(1, 9), h=st.integers(1, 9), data=st.data())
def test_load_rgb_matches_pils_conversion_for_every_mode(tmp_path: Path, mf, w: int, h: int, data) -> None:
    """Random small images of every mode, in each accepted format that stores the mode: load_rgb gives an
    8-bit RGB image of the same size with the pixels of PIL's own conversion of the same file (alpha over
    white, wide grey scaled as documented)."""
    import warnings

    mode, fmt = mf
    n = w * h * _BYTES_PER_PIXEL[mode]
    raw = data.draw(st.binary(min_size=n, max_size=n))
    src = Image.frombytes("1", (w, h), raw[: (w + 7) // 8 * h]) if mode == "1" else Image.frombytes(mode, (w, h), raw)
    path = tmp_path / f"x.{fmt.lower()}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NaN in float images
        src.save(path, format=fmt)
        im = load_rgb(path)
        with Image.open(path) as ref:
            ref.load()
            want = _expected_rgb(ref)
    got = np.asarray(im)
    assert im.mode == "RGB" and im.size == (w, h) and got.dtype == np.uint8
    assert np.array_equal(got, want), (mode, fmt)
