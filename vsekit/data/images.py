"""Image decoding and the field-standard torchvision transforms.

``load_rgb`` is the one place where image files are opened for training and search. Every failure becomes
an :class:`ImageLoadError` that names the file, so a corrupt image in a 100K-image set is found by name
instead of through a PIL traceback from a data-loader worker.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import transforms

from vsekit.data.corpus import DataError

# ImageNet statistics: every torchvision/timm backbone we start from was trained with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Background for transparent pixels. Under alpha 0 the colour channels are arbitrary (often black or
# leftovers of editing); white is what a viewer shows for such images (logos, product shots).
ALPHA_BACKGROUND = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


class ImageLoadError(DataError):
    """An image file is missing or cannot be decoded; the message names the file and the reason."""


def load_rgb(path: str | os.PathLike, *, exif_transpose: bool = False) -> Image.Image:
    """Open ``path``, decode it fully and return an 8-bit RGB image.

    Transparent images (RGBA, LA, palette or grey with a transparent colour) are composited onto white
    rather than having their alpha dropped. 16-bit and 32-bit grey images are scaled down to 8 bits, not
    clipped (PIL's own conversion would turn most of a 16-bit PNG white). CMYK, 1-bit and all other modes
    go through PIL's conversion. EXIF orientation is ignored by default, like the reference loaders of
    the field (COCO/Flickr30K numbers were produced that way); pass ``exif_transpose=True`` for user photos.
    """
    path = Path(path)
    im = None
    try:
        # no ``with``: closing the image would also free the pixels of an RGB result returned as is;
        # load() already closes the file of a single-frame image, and ``finally`` covers the failures
        im = Image.open(path)
        im.load()
        if exif_transpose:
            im = ImageOps.exif_transpose(im)
        rgb = _to_rgb(im)
        if rgb is im:
            im = None
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
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL reports truncated or corrupt data as OSError, and some broken headers as SyntaxError/ValueError
        reason = f"cannot decode: {exc or type(exc).__name__}"
    finally:
        if im is not None:
            im.close()
    raise ImageLoadError(f"{path}: {reason}")


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


def build_transform(train: bool, image_size: int = 224, resize: int | None = None) -> transforms.Compose:
    """The transforms the VSE++ family uses on raw images.

    train: RandomResizedCrop(image_size) + horizontal flip (``resize`` is not used).
    eval: Resize(resize, default image_size * 256 / 224, i.e. 256 for 224) + CenterCrop(image_size).
    Both end with ToTensor and ImageNet normalisation.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    normalize = transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if train:
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(image_size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalize,
            ]
        )
    resize = round(image_size * 256 / 224) if resize is None else resize
    if resize < image_size:
        raise ValueError(f"resize ({resize}) must be >= image_size ({image_size}) for a centre crop")
    return transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
