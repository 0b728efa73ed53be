"""Drawing a scene: the pixels, with nuisance the captions do not mention.

An image is a dark background (random tint, a linear gradient) with the scene's objects drawn in their
grid cells, plus a small position jitter, colour jitter, a random rotation of polygons and pixel noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vsekit.data.demo.scenes import COLOURS, Scene

COLOUR_JITTER = 12  # max deviation per channel from the nominal RGB in scenes.COLOURS
NOISE_STD = 4.0


def _polygon(cx: float, cy: float, points: Sequence[tuple[float, float]],
             angle: float) -> list[tuple[float, float]]:
    c, s = np.cos(angle), np.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float,
                 fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    if shape == "square":
        h = 0.8 * r
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        pts = [(0.0, -r), (0.95 * r, 0.75 * r), (-0.95 * r, 0.75 * r)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((rad * np.cos(a), rad * np.sin(a)))
    elif shape == "cross":
        t, e = 0.33 * r, r
        pts = [(-t, -e), (t, -e), (t, -t), (e, -t), (e, t), (t, t),
               (t, e), (-t, e), (-t, t), (-e, t), (-e, -t), (-t, -t)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    draw.polygon(_polygon(cx, cy, pts, angle), fill=fill)


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene``; ``rng`` supplies the nuisance (background, jitter, rotation, noise)."""
    s = image_size
    base = rng.integers(8, 40, size=3)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = np.linspace(-0.5, 0.5, s)
    gradient = rng.uniform(0.0, 24.0) * (ramp[None, :] * np.cos(angle) + ramp[:, None] * np.sin(angle))
    background = np.clip(base[None, None, :] + gradient[:, :, None], 0, 255).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    # Large objects first, so a small neighbour is never hidden under a large one.
    for o in sorted(scene.objects, key=lambda o: o.size != "large"):
        cx = (0.2 + 0.3 * o.col + rng.uniform(-0.02, 0.02)) * s
        cy = (0.2 + 0.3 * o.row + rng.uniform(-0.02, 0.02)) * s
        radius = (0.125 if o.size == "large" else 0.075) * s
        tilt = rng.uniform(-0.35, 0.35)
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        fill = np.clip(np.array(COLOURS[o.colour]) + jitter, 0, 255)
        _draw_object(draw, o.shape, cx, cy, radius, tilt, tuple(int(v) for v in fill))
    noise = NOISE_STD * rng.standard_normal((s, s, 3), dtype=np.float32)
    pixels = np.asarray(image, dtype=np.float32) + noise
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG", compress_level=1)  # the noise barely compresses; favour speed
