"""Image decoding and the field-standard torchvision transforms.

:func:`decode_rgb` (bytes or a binary file: an upload, a shard member) is the one place where images are
decoded, for training, indexing and search (:func:`load_rgb` opens a file and calls it), and every
``Image.open`` of the project goes through :func:`open_image`. Every
failure becomes an :class:`ImageLoadError` that names the file, so a corrupt image in a 100K-image set is found
by name instead of through a PIL traceback from a data-loader worker.

Formats: only the raster formats of :data:`ACCEPTED_FORMATS` are decoded (JPEG and its MPO variant from
phones, PNG/APNG, GIF, WebP, BMP, TIFF, Netpbm, and AVIF when Pillow has it). Pillow is told to try only
their plugins, so a file of any other format is refused whatever its name says, before another decoder sees
it: EPS (and PDF/PS) would run Ghostscript, a whole interpreter; PSD, ICO/ICNS, TGA, SGI, PCX, FITS, JPEG 2000,
DDS, ... are rarely used parsers that no photo needs. :data:`IMAGE_EXTENSIONS` are the file names folder
sources list, from the same table.

Memory: before its pixels are decoded, an image's header (mode x pixels) says how many bytes decoding and
converting it to RGB will hold at once (:func:`decode_bytes`); over the budget it is refused
(:class:`ImageTooLargeError`) without being decoded. 16/32-bit grey images are scaled to 8 bits a band of
rows at a time, and transparent images are composited with one paste, so the conversion holds a few bytes per
pixel, never a float64 copy of the image.

EXIF orientation: applied by default, so a phone photo that a viewer shows upright is
indexed, searched and trained on upright, and indexing a folder loads each file exactly as a query of the
same file is loaded. The reference benchmarks (COCO and Flickr30K through Karpathy's JSON) were produced
ignoring it, so images of a ``karpathy`` data set keep being read as stored (:func:`applies_exif`,
:data:`EXIF_IGNORED_FORMATS`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError, features
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torchvision import transforms

from vsekit.data.archive import MemberPath
from vsekit.data.corpus import DataError

# ImageNet statistics: every torchvision/timm backbone we start from was trained with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Background for transparent pixels. Under alpha 0 the colour channels are arbitrary (often black or
# leftovers of editing); white is what a viewer shows for such images (logos, product shots).
ALPHA_BACKGROUND = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


# Limits of an image that a user sends (a search query): pixels, and long side / short side. Wide banners
# (970 x 90) and phone panoramas (about 9:1) pass; a 100000 x 1 strip, which a short-side resize would blow up
# into a huge intermediate image, does not. The server's defaults (vsekit.serve.limits) are these.
MAX_QUERY_IMAGE_PIXELS = 40_000_000
MAX_QUERY_ASPECT_RATIO = 20.0

# The bytes one decode may hold at once (:func:`decode_bytes`) unless a caller says otherwise: a 100-megapixel
# RGB photo or 16-bit scan fits; a header that claims far more is refused before its pixels are decoded.
MAX_DECODE_BYTES = 1 << 30

# Pillow format -> its file extensions: the formats decoded, and the files folder sources list. The JPEG
# plugin also opens MPO (phone photos with a depth map or preview); PPM is the Netpbm family.
_FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "PNG": (".png", ".apng"),
    "GIF": (".gif",),
    "WEBP": (".webp",),
    "BMP": (".bmp",),
    "TIFF": (".tif", ".tiff"),
    "PPM": (".ppm", ".pgm", ".pbm", ".pnm"),
    "AVIF": (".avif",),
}
_NEEDS_MODULE = {"WEBP": "webp", "AVIF": "avif"}  # formats that exist only when Pillow was built with the library
ACCEPTED_FORMATS: tuple[str, ...] = tuple(f for f in _FORMAT_EXTENSIONS
                                          if f not in _NEEDS_MODULE or features.check_module(_NEEDS_MODULE[f]))
IMAGE_EXTENSIONS: frozenset[str] = frozenset(e for f in ACCEPTED_FORMATS for e in _FORMAT_EXTENSIONS[f])
_FORMAT_NAMES = ", ".join(ACCEPTED_FORMATS)

# Data-set formats whose images are read as stored, EXIF orientation ignored: the reference benchmarks
# (COCO/Flickr30K through Karpathy's JSON) published their numbers that way. Every other source applies it.
EXIF_IGNORED_FORMATS = frozenset({"karpathy"})


class ImageLoadError(DataError):
    """An image file is missing or cannot be decoded; the message names the file and the reason."""


class ImageTooLargeError(ImageLoadError):
    """An image whose header says that decoding it would hold more bytes than the budget; not decoded."""


def applies_exif(meta: Mapping | None) -> bool:
    """Whether images of a corpus with ``meta`` (its ``format``) are loaded with their EXIF orientation
    applied: yes, except for the reference data sets of :data:`EXIF_IGNORED_FORMATS`."""
    return (meta or {}).get("format") not in EXIF_IGNORED_FORMATS


def load_rgb(path: str | os.PathLike, *, exif_transpose: bool = True,
             max_bytes: int | None = MAX_DECODE_BYTES) -> Image.Image:
    """Open ``path`` -- an image file, or an image stored in a tar shard (:class:`MemberPath`) -- and
    :func:`decode_rgb` it. A file that cannot be opened is an :class:`ImageLoadError` naming it, as one that
    cannot be decoded."""
    path = path if isinstance(path, MemberPath) else Path(path)
    try:
        f = path.open() if isinstance(path, MemberPath) else open(path, "rb")
    except Exception as exc:  # noqa: BLE001 - said as the reason, with the file's name
        error = _load_error(str(path), exc)
    else:
        with f:
            return decode_rgb(f, name=str(path), exif_transpose=exif_transpose, max_bytes=max_bytes)
    raise error  # outside the except: no OSError traceback attached


def decode_rgb(source: bytes | IO[bytes], *, name: str = "the image", exif_transpose: bool = True,
               max_bytes: int | None = MAX_DECODE_BYTES) -> Image.Image:
    """Decode an image -- its bytes, or a binary file object: an upload, a shard member, an open file -- fully
    into an 8-bit RGB image. The one decoder of the project (:func:`load_rgb` opens a file and calls it);
    nothing is written to disk, and errors name ``name``, never a file of the machine that decodes it.

    Only :data:`ACCEPTED_FORMATS` are decoded. Transparent images (RGBA, LA, palette or grey with a
    transparent colour) are composited onto white rather than having their alpha dropped. 16-bit and
    32-bit grey images are scaled down to 8 bits, not clipped (PIL's own conversion would turn most of a
    16-bit PNG white). CMYK, 1-bit and all other modes go through PIL's conversion. EXIF orientation is
    applied unless ``exif_transpose=False`` (the reference data sets, :func:`applies_exif`). An animated image
    gives its first frame. An image whose decode would hold more than ``max_bytes`` (:func:`decode_bytes`) is
    an :class:`ImageTooLargeError`, found from its header before decoding (None: no budget).

    Any failure to decode (PIL reports corrupt data as OSError, SyntaxError, ValueError, struct.error,
    IndexError, ... depending on the format) is an :class:`ImageLoadError` naming ``name``, with no PIL
    traceback attached.
    """
    im = None
    try:
        # no ``with``: closing the image would also free the pixels of an RGB result returned as is
        im = open_image(source)
        _check_budget(im, name, exif_transpose, max_bytes)  # from the header: nothing decoded yet
        _check_scans(im, name)
        im.load()
        _check_budget(im, name, exif_transpose, max_bytes)  # a decoder that changed the mode while loading
        if exif_transpose:
            ImageOps.exif_transpose(im, in_place=True)  # a copy only when the image is rotated
        rgb = _to_rgb(im)
        if rgb is im:
            if _holds_open_file(im):
                rgb = im.copy()  # a multi-frame file stays open for seeking: keep the frame, not the file
            else:
                im = None  # nothing left open: hand the image itself over
        return rgb
    except Exception as exc:  # noqa: BLE001 - every failure is said as an ImageLoadError
        error = _load_error(name, exc)
    finally:
        if im is not None:
            im.close()
    raise error  # outside the except: no PIL traceback attached


def _load_error(name: str, exc: Exception) -> ImageLoadError:
    """The :class:`ImageLoadError` that says why ``name`` could not be opened or decoded."""
    if isinstance(exc, ImageLoadError):
        return exc
    if isinstance(exc, DataError):  # a shard member that cannot be read (the message names the shard)
        return ImageLoadError(str(exc))
    reasons = {FileNotFoundError: "file not found", IsADirectoryError: "is a directory, not an image file",
               PermissionError: "permission denied", MemoryError: "cannot decode: out of memory",
               UnidentifiedImageError: f"not a recognised image format (accepted: {_FORMAT_NAMES})",
               Image.DecompressionBombError: f"refused as a decompression bomb ({exc})"}
    # else corrupt data: OSError, SyntaxError, ValueError, struct.error, IndexError, ... by format
    reason = next((r for kind, r in reasons.items() if isinstance(exc, kind)), None)
    return ImageLoadError(f"{name}: {reason or f'cannot decode: {exc or type(exc).__name__}'}")


def open_image(source: str | os.PathLike | MemberPath | bytes | IO[bytes], *,
               formats: tuple[str, ...] = ACCEPTED_FORMATS) -> Image.Image:
    """``Image.open`` of an image file, an image stored in a tar shard (:class:`MemberPath`), bytes or a
    binary file object, trying only the plugins of ``formats`` (default :data:`ACCEPTED_FORMATS`): a file of
    another format is an ``UnidentifiedImageError`` before any other decoder -- or Ghostscript -- sees it.
    Only the header is read; the pixels are decoded by ``load()``."""
    if isinstance(source, MemberPath):
        source = io.BytesIO(source.read_bytes())
    elif isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    return Image.open(source, formats=list(formats))


# Bytes per pixel that a format's decoder holds beside the image (measured on 16-megapixel RGB files, growth of
# the process against the estimate without them): WebP's decoder returns the whole RGBA frame as a bytes object
# that is then copied into the image (244 MB, not 122); AVIF's holds its YUV planes (143 MB).
_DECODER_BYTES = {"WEBP": 8, "AVIF": 4}


def decode_bytes(mode: str, size: tuple[int, int], *, exif_transpose: bool = True,
                 transparent: bool = False, progressive: bool = False, fmt: str | None = None) -> int:
    """The most bytes :func:`decode_rgb` holds at once for an image of ``mode`` and ``size`` (from its header;
    ``transparent``: it has a transparent colour): the decoded pixels plus the larger of their EXIF-rotated
    copy and the conversion to RGB (its output and intermediates, :func:`_to_rgb`). ``progressive``: a
    progressive JPEG, which libjpeg decodes through the DCT coefficients of the whole image, held beside the
    pixels: 2 bytes per pixel and colour component, without chroma subsampling (measured: a 36-megapixel
    progressive RGB JPEG grew the process by 343 MB, a baseline one by 138 MB). ``fmt``: the Pillow format,
    for what its decoder holds besides (:data:`_DECODER_BYTES`)."""
    pixels = int(size[0]) * int(size[1])
    # bytes per pixel Pillow holds for the mode (3-band modes such as RGB are stored in 4)
    stored = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    coefficients = 2 * len(mode if mode in ("CMYK", "YCbCr", "RGB", "L") else "RGB") if progressive else 0
    if mode.startswith("I") or mode == "F":
        convert = 1 + 4  # the uint8 result and its RGB image; the bands of rows are small
    elif mode == "RGB":
        convert = 0  # returned as decoded
    elif mode == "RGBA":
        convert = 4  # the RGB result
    elif mode in _ALPHA_MODES or transparent:
        convert = 12 if mode == "La" else 8  # an RGBA copy (La: and an LA one) and the RGB result
    elif mode in ("1", "L", "P", "CMYK", "YCbCr"):
        convert = 4  # PIL's conversion to RGB
    else:
        convert = 8  # rarer modes may convert through an intermediate mode
    decoder = coefficients + _DECODER_BYTES.get(fmt or "", 0)
    return pixels * (stored + decoder + max(stored if exif_transpose else 0, convert))


def _check_budget(im: Image.Image, name: str, exif_transpose: bool, max_bytes: int | None) -> None:
    if max_bytes is None:
        return
    need = decode_bytes(im.mode, im.size, exif_transpose=exif_transpose, transparent="transparency" in im.info,
                        progressive=im.format in ("JPEG", "MPO") and bool(im.info.get("progressive")
                                                                            or im.info.get("progression")),
                        fmt=im.format)
    if need > max_bytes:
        w, h = im.size
        raise ImageTooLargeError(f"{name}: decoding this {w}x{h} image (mode {im.mode}) would take about "
                                 f"{_mib(need)} of memory; the limit is {_mib(max_bytes)}")


# The most scans a JPEG may have. libjpeg decodes every scan over the whole image, however few bytes it holds:
# 5000 scans of 59 bytes added to a 36-megapixel progressive JPEG (1.1 MB) took 12 s to decode, and the upload
# limit holds 170,000 of them. A progressive JPEG has about 10 (libjpeg's, mozjpeg's scripts), a baseline 1-4.
MAX_JPEG_SCANS = 100
_SOS = b"\xff\xda"  # start of scan; byte stuffing (0xFF 0x00) keeps it out of the entropy-coded data


def _check_scans(im: Image.Image, name: str) -> None:
    """Refuse a JPEG (or MPO) whose file has more than :data:`MAX_JPEG_SCANS` start-of-scan markers, counted in
    its bytes before anything is decoded (the file is read once more, a block at a time)."""
    if im.format not in ("JPEG", "MPO"):
        return
    fp = im.fp
    here = fp.tell()
    try:
        fp.seek(0)
        scans, tail = 0, b""
        while block := fp.read(1 << 20):
            chunk = tail + block
            scans += chunk.count(_SOS)
            tail = chunk[-1:] if chunk[-1:] == b"\xff" else b""  # a marker cut between two blocks
            if scans > MAX_JPEG_SCANS:
                raise ImageLoadError(f"{name}: a JPEG of more than {MAX_JPEG_SCANS} scans (each is decoded over "
                                     "the whole image: a way to make one small file take minutes); re-save it")
    finally:
        fp.seek(here)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n >= 1 << 20 else f"{n} bytes"


def _holds_open_file(im: Image.Image) -> bool:
    """True when ``im`` still holds its file open after ``load()`` (multi-frame images: APNG, TIFF, ...)."""
    for attr in ("fp", "_fp"):
        try:
            f = getattr(im, attr, None)
            if f is not None and getattr(f, "closed", True) is False:
                return True
        except Exception:  # PIL's placeholder for a closed file raises on any attribute
            continue
    return False


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        return _wide_grey_to_rgb(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        if im.mode == "La":
            im = im.convert("LA")
        rgba = im if im.mode == "RGBA" else im.convert("RGBA")
        # one paste with the alpha band as mask: the same pixels as Image.alpha_composite onto an opaque
        # background, without its RGBA background, result and RGB copies
        out = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        out.paste(rgba, mask=rgba)
        return out
    return im.convert("RGB")


_BAND_PIXELS = 1 << 16  # pixels per band of rows in the wide-grey conversion (temporaries under 1 MB)


def _bands(im: Image.Image):
    """The image as 2-D arrays of consecutive bands of rows (each a small copy), top to bottom."""
    w, h = im.size
    rows = max(1, _BAND_PIXELS // max(1, w))
    for top in range(0, h, rows):
        yield top, np.asarray(im.crop((0, top, w, min(h, top + rows))))


def _wide_grey_to_rgb(im: Image.Image) -> Image.Image:
    """Grey images with more than 8 bits per pixel (modes ``I;16*``, ``I``, ``F``) scaled to 0..255.

    16-bit values v become round(v / 257) computed as (v + 128) // 257 in integers (the same numbers as the
    float division; no value is ever halfway). ``I`` holds 16-bit data in a 32-bit container when its
    maximum is over 255 (PNG, TIFF) and 8-bit data otherwise; ``F`` in [0, 1] is scaled by 255, NaN becomes 0.
    Each band of rows is converted on its own, so the temporaries stay small whatever the image size.
    """
    w, h = im.size
    mode = im.mode
    if mode.startswith("I;16"):
        scale = "u16"
    elif mode == "I":
        top = im.getextrema()[1] if w * h else 0
        scale = "u16" if top > 255 else "u8"
    else:
        peak = np.nan
        for _, band in _bands(im):
            if band.size:
                peak = np.fmax(peak, np.fmax.reduce(band, axis=None))
        scale = "unit" if peak <= 1.0 else "float"
    out = np.empty((h, w), dtype=np.uint8)
    for top, band in _bands(im):
        out[top: top + band.shape[0]] = _band_to_u8(band, scale)
    return Image.fromarray(out).convert("RGB")  # 2-D uint8 -> mode "L" -> RGB


def _band_to_u8(band: np.ndarray, scale: str) -> np.ndarray:
    if scale == "u16":  # int32: room for + 128 above 65535
        return ((np.clip(band, 0, 65535).astype(np.int32) + 128) // 257).astype(np.uint8)
    if scale == "u8":
        return np.clip(band, 0, 255).astype(np.uint8)
    f = band.astype(np.float64)  # one band: a few MB
    if scale == "unit":
        f *= 255.0
    np.nan_to_num(f, copy=False)
    np.clip(f, 0, 255, out=f)
    return np.rint(f, out=f).astype(np.uint8)


# Training augmentation and evaluation resizing: the ``transform`` section of a config (separate from ``data``,
# which says what to read). The augmentation defaults are VSE++'s (ImageNet-style RandomResizedCrop over
# 8-100 % of the area, random horizontal flips); recipes for small raw images and for captions that say
# "left"/"right" change them.
RESIZE_POLICIES = ("short_side", "square")


class AugmentConfig(BaseModel):
    """``transform.augment``: the random augmentation of training images."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    crop: Literal["random_resized", "random", "center"] = "random_resized"  # random: Resize + RandomCrop
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop: range of the crop's share of the image area
    ratio: tuple[float, float] = (0.75, 4 / 3)  # RandomResizedCrop: range of the crop's aspect ratio
    hflip: bool = True  # random horizontal flip (p = 0.5); flips break "left"/"right" captions
    color_jitter: float = Field(0.0, ge=0.0, le=1.0)  # ColorJitter(brightness=s, contrast=s, saturation=s, hue=s/4)

    @field_validator("scale", "ratio")
    @classmethod
    def _range(cls, v: tuple[float, float], info) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"must be [min, max] with 0 < min <= max, got {list(v)}")
        if info.field_name == "scale" and v[1] > 1.0:
            raise ValueError(f"is a share of the image area, at most 1.0; got {list(v)}")
        return v


class TransformConfig(BaseModel):
    """``transform``: how images become tensors, in training (with ``augment``) and in evaluation/search."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    image_size: int = Field(224, ge=1)  # the crop the network sees
    resize: int | None = Field(None, ge=1)  # short side before the crop (default image_size * 256 / 224)
    resize_policy: Literal["short_side", "square"] = "short_side"  # eval: Resize+CenterCrop | whole image
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @model_validator(mode="after")
    def _resize_fits(self) -> TransformConfig:
        if self.resize is not None and self.resize < self.image_size and self.resize_policy == "short_side":
            raise ValueError(f"resize ({self.resize}) must be >= image_size ({self.image_size}) for the centre crop")
        return self

    def build(self, train: bool) -> transforms.Compose:
        return build_transform(train, self.image_size, self.resize, self.augment, self.resize_policy)


def _resize_size(image_size: int, resize: int | None, policy: str) -> int:
    """The size images are resized to before a crop of ``image_size`` (default image_size * 256 / 224)."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"transform.resize_policy must be one of {', '.join(RESIZE_POLICIES)}, got {policy!r}")
    size = round(image_size * 256 / 224) if resize is None else resize
    if size < image_size:
        raise ValueError(f"resize ({size}) must be >= image_size ({image_size}) for a crop")
    return size


def _resize_step(image_size: int, resize: int | None, policy: str) -> list:
    if policy == "square":  # the whole image, aspect ratio not kept: nothing cut off at the borders
        return [transforms.Resize((image_size, image_size))]
    return [transforms.Resize(_resize_size(image_size, resize, policy)), transforms.CenterCrop(image_size)]


def build_transform(train: bool, image_size: int = 224, resize: int | None = None,
                    augment: dict | AugmentConfig | None = None,
                    resize_policy: str = "short_side") -> transforms.Compose:
    """The image transforms of training (``train=True``) and of evaluation / search.

    eval: ``resize_policy="short_side"``: Resize(short side to ``resize``, default image_size * 256 / 224,
    i.e. 256 for 224) + CenterCrop(image_size), as VSE++; ``"square"``: Resize to image_size x image_size.
    train, by ``augment`` (:class:`AugmentConfig`): ``crop="random_resized"``:
    RandomResizedCrop(image_size, scale, ratio) (VSE++; ``resize`` is not used); ``"random"``: the eval resize
    with RandomCrop instead of CenterCrop (``"square"``: Resize(resize) + RandomCrop); ``"center"``: the eval
    transform itself. Then an optional horizontal flip and colour jitter.
    All end with ToTensor and ImageNet normalisation.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    normalize = transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if not train:
        return transforms.Compose([*_resize_step(image_size, resize, resize_policy), transforms.ToTensor(), normalize])
    opts = augment
    if not isinstance(opts, AugmentConfig):  # a typo or a value out of range is a ConfigError naming the key
        from vsekit.registry import validate_section

        opts = validate_section(AugmentConfig, augment or {}, "transform.augment")
    if opts.crop == "random_resized":
        steps = [transforms.RandomResizedCrop(image_size, scale=opts.scale, ratio=opts.ratio)]
    elif opts.crop == "random":
        size = _resize_size(image_size, resize, resize_policy)
        first = transforms.Resize((size, size) if resize_policy == "square" else size)
        steps = [first, transforms.RandomCrop(image_size)]
    else:
        steps = _resize_step(image_size, resize, resize_policy)
    if opts.hflip:
        steps.append(transforms.RandomHorizontalFlip())
    s = float(opts.color_jitter)
    if s > 0:
        steps.append(transforms.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(0.5, s / 4)))
    return transforms.Compose([*steps, transforms.ToTensor(), normalize])


# steps whose output depends only on their input: their result can be kept and reused across epochs
_DETERMINISTIC_STEPS = (transforms.Resize, transforms.CenterCrop)


def split_deterministic(transform: transforms.Compose) -> tuple[transforms.Compose, transforms.Compose]:
    """``(prefix, rest)`` with ``rest(prefix(im)) == transform(im)``, where ``prefix`` is the leading resize /
    centre-crop steps (no randomness: their output can be cached per image) and ``rest`` the random
    augmentations and the conversion to a tensor."""
    steps = list(transform.transforms)
    k = next((i for i, step in enumerate(steps) if not isinstance(step, _DETERMINISTIC_STEPS)), len(steps))
    return transforms.Compose(steps[:k]), transforms.Compose(steps[k:])


def pixels_transform(rest: transforms.Compose) -> Callable[[np.ndarray], torch.Tensor] | None:
    """``rest`` (see ``split_deterministic``) applied to uint8 H x W x 3 pixels without a round trip through
    PIL, where its steps allow it: flips, ``ToTensor`` and ``Normalize`` (else ``None``). The conversion to a
    tensor runs first -- a flip only permutes pixels, so it commutes with it -- and each flip draws from
    torch's generator as before: the same tensors, draw for draw, at about half the cost per image."""
    steps = list(rest.transforms)
    if sum(isinstance(s, transforms.ToTensor) for s in steps) != 1 or not all(
            isinstance(s, (transforms.ToTensor, transforms.Normalize, transforms.RandomHorizontalFlip))
            for s in steps):
        return None
    steps = [s for s in steps if not isinstance(s, transforms.ToTensor)]

    def apply(pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(pixels).permute(2, 0, 1).contiguous().float().div(255)  # ToTensor, exactly
        for step in steps:
            x = step(x)
        return x

    return apply
