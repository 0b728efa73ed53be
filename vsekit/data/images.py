"""Image decoding and the field-standard torchvision transforms.

``load_rgb`` is the one place where image files are opened for training and search. Every failure becomes
an :class:`ImageLoadError` that names the file, so a corrupt image in a 100K-image set is found by name
instead of through a PIL traceback from a data-loader worker.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
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


class ImageLoadError(DataError):
    """An image file is missing or cannot be decoded; the message names the file and the reason."""


def load_rgb(path: str | os.PathLike, *, exif_transpose: bool = False) -> Image.Image:
    """Open ``path``, decode it fully and return an 8-bit RGB image.

    Transparent images (RGBA, LA, palette or grey with a transparent colour) are composited onto white
    rather than having their alpha dropped. 16-bit and 32-bit grey images are scaled down to 8 bits, not
    clipped (PIL's own conversion would turn most of a 16-bit PNG white). CMYK, 1-bit and all other modes
    go through PIL's conversion. EXIF orientation is ignored by default, like the reference loaders of
    the field (COCO/Flickr30K numbers were produced that way); pass ``exif_transpose=True`` for user photos.
    An animated image gives its first frame.

    Any failure to decode (PIL reports corrupt data as OSError, SyntaxError, ValueError, struct.error,
    IndexError, ... depending on the format) is an :class:`ImageLoadError` naming the file, with no PIL
    traceback attached.
    """
    path = path if isinstance(path, MemberPath) else Path(path)
    im = None
    try:
        # no ``with``: closing the image would also free the pixels of an RGB result returned as is;
        # load() already closes the file of a single-frame image, and ``finally`` covers the failures
        im = open_image(path)
        im.load()
        if exif_transpose:
            im = ImageOps.exif_transpose(im)
        rgb = _to_rgb(im)
        if rgb is im:
            if _holds_open_file(im):
                rgb = im.copy()  # a multi-frame file stays open for seeking: keep the frame, close the file
            else:
                im = None  # nothing left open: hand the image itself over
        return rgb
    except FileNotFoundError:
        reason = "file not found"
    except IsADirectoryError:
        reason = "is a directory, not an image file"
    except PermissionError:
        reason = "permission denied"
    except UnidentifiedImageError:
        reason = "not a recognised image format"
    except Image.DecompressionBombError as exc:
        reason = f"refused as a decompression bomb ({exc})"
    except MemoryError:
        reason = "cannot decode: out of memory"
    except DataError as exc:  # a shard member that cannot be read (the message names the shard)
        raise ImageLoadError(str(exc)) from None
    except Exception as exc:  # corrupt data: OSError, SyntaxError, ValueError, struct.error, IndexError, ...
        reason = f"cannot decode: {exc or type(exc).__name__}"
    finally:
        if im is not None:
            im.close()
    raise ImageLoadError(f"{path}: {reason}")


def open_image(path: Path | MemberPath) -> Image.Image:
    """``Image.open`` of an image file, or of an image stored in a tar shard (:class:`MemberPath`)."""
    if isinstance(path, MemberPath):
        return Image.open(io.BytesIO(path.read_bytes()))
    return Image.open(path)


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
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _wide_grey_to_rgb(im: Image.Image) -> Image.Image:
    """Grey images with more than 8 bits per pixel (modes ``I;16*``, ``I``, ``F``) scaled to 0..255."""
    a = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16"):
        a = a / 257.0
    elif im.mode == "I":
        # 32-bit containers usually hold 16-bit data (PNG, TIFF); keep 8-bit ranges as they are
        if a.size and a.max() > 255:
            a = np.clip(a, 0, 65535) / 257.0
    elif a.size and np.nanmax(a) <= 1.0:  # float images in [0, 1]
        a = a * 255.0
    a = np.clip(np.nan_to_num(a), 0, 255)
    grey = Image.fromarray(np.rint(a).astype(np.uint8))  # 2-D uint8 -> mode "L"
    return grey.convert("RGB")


# Training augmentation and evaluation resizing: the ``transform`` section of a config (separate from ``data``,
# which says what to read). The augmentation defaults are VSE++'s (ImageNet-style RandomResizedCrop over
# 8-100 % of the area, random horizontal flips); recipes for small raw images and for captions that say
# "left"/"right" change them.
CROPS = ("random_resized", "random", "center")
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


def augment_options(augment: dict | AugmentConfig | None) -> AugmentConfig:
    """Checked augmentation options (a typo or a value out of range is a ConfigError naming the key)."""
    if isinstance(augment, AugmentConfig):
        return augment
    from vsekit.registry import validate_section

    return validate_section(AugmentConfig, augment or {}, "transform.augment")


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
    train, by ``augment`` (see ``AUGMENT_DEFAULTS``): ``crop="random_resized"``:
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
    opts = augment_options(augment)
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
