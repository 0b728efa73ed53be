"""Do generated demo images show what their caption names? Colour and shape agreement on the demo set.

The demo's scenes are coloured shapes on a dark ground (:mod:`vsekit.data.demo`), and every caption names
them, so an image drawn from a caption can be checked without a matching model:

- :func:`dominant_colour`: the palette colour nearest to most of the image's foreground pixels (the pixels
  brighter than the darkest palette colour's brightest channel allows a background to be);
- :class:`ShapeClassifier`: the shape of the image's largest blob, by a small classifier (sklearn) fitted on
  real demo images; its accuracy on real test images is the ceiling of the measure;
- :func:`agreement`: the share of images whose prediction equals the target, and the chance of that share for
  predictions independent of the targets (the sum over classes of the two frequencies' product);
- :func:`main_objects`: the targets, the colour and shape of each image's main object (the class label's).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vsekit.data.demo.scenes import COLOURS, Scene, main_object

# brightest channel of a foreground pixel: demo backgrounds stay below ~70 (a base of 8-40, a gradient of at
# most +-12, noise), and every palette colour has a channel of 190 or more
FOREGROUND = 100
BLOB_SIZE = 16  # side of the resampled blob mask the shape classifier reads


def as_pixels(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) float 0-255 from uint8 (N, H, W, 3) images or float ones in [0, 1], channels last or
    (N, 3, H, W)."""
    a = np.asarray(images)
    if a.ndim != 4:
        raise ValueError(f"expected a batch of RGB images (N, H, W, 3) or (N, 3, H, W), got shape {a.shape}")
    if a.shape[-1] != 3 and a.shape[1] == 3:
        a = a.transpose(0, 2, 3, 1)
    if a.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {a.shape}")
    return a.astype(np.float64) if a.dtype == np.uint8 else np.asarray(a, dtype=np.float64) * 255.0


def dominant_colour(image: np.ndarray, palette: dict[str, tuple[int, int, int]] = COLOURS) -> str | None:
    """The name of the ``palette`` colour nearest (RGB distance) to the most foreground pixels of one
    (H, W, 3) 0-255 image; None when no pixel is bright enough to be foreground."""
    px = np.asarray(image, dtype=np.float64).reshape(-1, 3)
    fg = px[px.max(1) >= FOREGROUND]
    if not len(fg):
        return None
    names = list(palette)
    centres = np.array([palette[n] for n in names], dtype=np.float64)
    nearest = ((fg[:, None, :] - centres[None]) ** 2).sum(2).argmin(1)
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]


def blob_features(image: np.ndarray) -> np.ndarray:
    """(BLOB_SIZE² + 2,) features of the largest connected foreground blob of one (H, W, 3) 0-255 image: its
    mask cut to its bounding box and resampled to BLOB_SIZE x BLOB_SIZE, its bounding box's aspect ratio and
    the share of the box it fills. All zeros without foreground."""
    from PIL import Image
    from scipy import ndimage

    mask = np.asarray(image).max(2) >= FOREGROUND
    blobs, n = ndimage.label(mask)
    if not n:
        return np.zeros(BLOB_SIZE * BLOB_SIZE + 2)
    largest = 1 + int(np.bincount(blobs.ravel())[1:].argmax())
    ys, xs = np.nonzero(blobs == largest)
    box = blobs[ys.min():ys.max() + 1, xs.min():xs.max() + 1] == largest
    small = Image.fromarray(box.astype(np.uint8) * 255).resize((BLOB_SIZE, BLOB_SIZE), Image.BILINEAR)
    h, w = box.shape
    return np.concatenate([np.asarray(small, dtype=np.float64).ravel() / 255.0, [h / w, box.mean()]])


class ShapeClassifier:
    """The shape of an image's largest blob: logistic regression on :func:`blob_features`, fitted on real
    images and their main objects' shapes."""

    def __init__(self, seed: int = 0) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))

    @staticmethod
    def features(images: np.ndarray) -> np.ndarray:
        return np.stack([blob_features(im) for im in as_pixels(images)])

    def fit(self, images: np.ndarray, shapes: Sequence[str]) -> ShapeClassifier:
        if len(set(shapes)) < 2:
            raise ValueError("the shape classifier needs images of at least two shapes")
        self.model.fit(self.features(images), list(shapes))
        return self

    def predict(self, images: np.ndarray) -> list[str]:
        return [str(s) for s in self.model.predict(self.features(images))]


def agreement(predicted: Sequence[str | None], targets: Sequence[str]) -> dict[str, float]:
    """``agreement``: the share of predictions equal to their target (None never is); ``chance``: its
    expectation for predictions drawn independently of the targets with the same frequencies."""
    if len(predicted) != len(targets) or not len(targets):
        raise ValueError(f"agreement: {len(predicted)} predictions for {len(targets)} targets (need as many, >= 1)")
    n = len(targets)
    hits = sum(p == t for p, t in zip(predicted, targets))
    p_pred, p_true = Counter(predicted), Counter(targets)
    chance = sum(p_pred[c] * p_true[c] for c in p_true) / (n * n)
    return {"agreement": hits / n, "chance": chance}


def main_objects(json_path: str | Path, image_ids: Sequence[str]) -> list[tuple[str, str]]:
    """(colour, shape) of the main object (:func:`~vsekit.data.demo.scenes.main_object`, the class label's)
    of each image in ``image_ids`` (its file name or path), from a demo set's JSON."""
    images = json.loads(Path(json_path).read_text(encoding="utf-8"))["images"]
    scenes = {im["filename"]: im["scene"] for im in images if "scene" in im}
    missing = [i for i in image_ids if Path(i).name not in scenes]
    if missing:
        raise ValueError(f"{json_path}: no scene for {len(missing)} of the images, e.g. {missing[0]!r}; is it a "
                         "demo set's JSON?")
    out = []
    for i in image_ids:
        o = main_object(Scene.from_json(scenes[Path(i).name]))
        out.append((o.colour, o.shape))
    return out
