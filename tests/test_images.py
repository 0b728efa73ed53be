"""``load_rgb`` on every PIL mode we expect in the wild, its errors, and the field-standard transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vsekit.data.corpus import DataError
from vsekit.data.images import (
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
