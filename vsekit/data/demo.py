"""The embedded demo data set: synthetic scenes of coloured shapes, five true captions per image.

Why it exists: ``make demo``, the tests and the loss ablations need an image-caption collection that is
available offline, builds in seconds, and is learnable by a small CNN + GRU on CPU in minutes, yet is not
trivial. It must also contain what LSEH feeds on (semantically related captions): wrong captions that are
semantically close to the right one ("a red circle left of a blue box" vs "... right of a blue box").

Scenes. An image shows 1-3 objects on a dark background (random tint, a linear gradient, pixel noise).
Each object has a shape (circle, square, triangle, star, cross), a colour (red, green, blue, yellow,
purple, orange, white), a size (small, large) and one of the nine cells of a 3x3 grid (top left ... bottom
right); two objects never share a cell. Rendering adds nuisance that captions do not mention: a small
position jitter, colour jitter and a random rotation of polygons. About a third of the scenes are
*siblings*: copies of an earlier scene with one edit (a colour, a shape, a size, a move, a swap of two
objects, one object added or dropped), so near-duplicate scenes are common. Exact duplicates are avoided
by rejection sampling; the count that remains is stored under ``stats.duplicate_scenes``.

Captions. Five per image, each from a different template family (a listing with positions, a spatial
relation, counts, sizes, a position-first sentence), with synonyms ("circle"/"round disc"/"disc",
"square"/"box"/"block", "to the left of"/"left of", "above"/"over", ...). Every caption only states facts
of its scene, and all images share one small vocabulary.

Labels. ``label = shape of the main object x number of objects`` (5 x 3 = 15 classes, names
``"circle/1"`` ... ``"cross/3"``). The main object is the large one; among equals, the first in reading
order (top row first, then left to right).

Output. A Karpathy-style JSON (``dataset_demo.json``) next to an ``images/`` folder of PNGs; each image
entry also holds its ``scene`` (the ground truth the captions were written from). Everything is a pure
function of ``(num_images, seed, image_size)``: the same bytes every run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from vsekit.utils.io import cache_root

GENERATOR_VERSION = 1
DATASET_FILE = "dataset_demo.json"
IMAGE_DIR = "images"

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# Nominal RGB of each colour; rendered objects deviate by at most COLOUR_JITTER per channel plus noise.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 100, 235),
    "yellow": (235, 215, 40),
    "purple": (155, 65, 205),
    "orange": (245, 140, 25),
    "white": (235, 235, 235),
}
SIZES: tuple[str, ...] = ("small", "large")
COLOUR_JITTER = 12
NOISE_STD = 4.0

# (singular, plural) wordings of each shape.
SHAPE_NOUNS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("round disc", "round discs"), ("disc", "discs")),
    "square": (("square", "squares"), ("box", "boxes"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"),),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}

# Grid cells as (column, row); names are stored in the JSON, phrases are what captions say.
SLOT_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (1, 0): "top",
    (2, 0): "top right",
    (0, 1): "left",
    (1, 1): "centre",
    (2, 1): "right",
    (0, 2): "bottom left",
    (1, 2): "bottom",
    (2, 2): "bottom right",
}
POSITION_PHRASES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("in the top left corner", "at the top left"),
    (1, 0): ("at the top", "near the top"),
    (2, 0): ("in the top right corner", "at the top right"),
    (0, 1): ("on the left", "on the left side"),
    (1, 1): ("in the centre", "in the middle"),
    (2, 1): ("on the right", "on the right side"),
    (0, 2): ("in the bottom left corner", "at the bottom left"),
    (1, 2): ("at the bottom", "near the bottom"),
    (2, 2): ("in the bottom right corner", "at the bottom right"),
}
SLOTS: tuple[tuple[int, int], ...] = tuple(sorted(SLOT_NAMES, key=lambda s: (s[1], s[0])))

CLASS_NAMES: list[str] = [f"{shape}/{count}" for shape in SHAPES for count in (1, 2, 3)]

DEMO_QUERIES: list[str] = [
    "a red circle to the left of a blue square",
    "a blue square to the left of a red circle",
    "two yellow stars",
    "a small white cross at the top",
    "a big green triangle in the middle",
    "a purple box below an orange disc",
    "three shapes: a red star, a white circle and a blue triangle",
]

_OBJECT_COUNT_WEIGHTS = (0.2, 0.4, 0.4)  # P(1 object), P(2), P(3)
_SIBLING_RATE = 0.35
_MAX_TRIES = 100


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    slot: tuple[int, int]  # (column, row) in the 3x3 grid

    @property
    def col(self) -> int:
        return self.slot[0]

    @property
    def row(self) -> int:
        return self.slot[1]


@dataclass(frozen=True)
class Scene:
    """What is drawn, up to rendering nuisance. Objects are kept in reading order, so equal scenes compare
    (and hash) equal."""

    objects: tuple[SceneObject, ...]

    @classmethod
    def of(cls, objects: Sequence[SceneObject]) -> Scene:
        slots = [o.slot for o in objects]
        if not objects or len(set(slots)) != len(slots):
            raise ValueError(f"a scene needs 1+ objects in distinct cells, got {objects}")
        return cls(tuple(sorted(objects, key=lambda o: (o.row, o.col))))

    def to_json(self) -> list[dict]:
        return [
            {"shape": o.shape, "colour": o.colour, "size": o.size, "position": SLOT_NAMES[o.slot]}
            for o in self.objects
        ]

    @classmethod
    def from_json(cls, items: Sequence[dict]) -> Scene:
        slot_of = {name: slot for slot, name in SLOT_NAMES.items()}
        return cls.of(
            [SceneObject(d["shape"], d["colour"], d["size"], slot_of[d["position"]]) for d in items]
        )


def describe_scene(scene: Scene) -> str:
    """Canonical one-line description; two scenes are duplicates iff their descriptions are equal."""
    return "; ".join(f"{o.size} {o.colour} {o.shape} at {SLOT_NAMES[o.slot]}" for o in scene.objects)


def main_object(scene: Scene) -> SceneObject:
    """The large object, or the first in reading order among equally sized ones."""
    return max(scene.objects, key=lambda o: o.size == "large")  # max keeps the first of equal keys


def scene_label(scene: Scene) -> int:
    """Index into CLASS_NAMES: shape of the main object x number of objects."""
    return SHAPES.index(main_object(scene).shape) * 3 + len(scene.objects) - 1


# ---------------------------------------------------------------------------------------------------
# Scene sampling


def _random_scene(rng: random.Random) -> Scene:
    n = rng.choices((1, 2, 3), weights=_OBJECT_COUNT_WEIGHTS)[0]
    objects: list[SceneObject] = []
    for slot in rng.sample(SLOTS, n):
        shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
        # Repeats inside a scene make count captions ("two red circles") worth learning.
        if objects and rng.random() < 0.25:
            colour = rng.choice(objects).colour
        if objects and rng.random() < 0.25:
            shape = rng.choice(objects).shape
        objects.append(SceneObject(shape, colour, rng.choice(SIZES), slot))
    return Scene.of(objects)


def _edit_scene(scene: Scene, rng: random.Random) -> Scene:
    """A sibling: the scene with exactly one thing changed (may equal the input; callers reject that)."""
    objs = list(scene.objects)
    free = [s for s in SLOTS if s not in {o.slot for o in objs}]
    edits = ["colour", "shape", "size", "move"]
    if len(objs) > 1:
        edits += ["swap", "drop"]
    if len(objs) < 3:
        edits.append("add")
    edit = rng.choice(edits)
    i = rng.randrange(len(objs))
    o = objs[i]
    if edit == "colour":
        objs[i] = SceneObject(o.shape, rng.choice([c for c in COLOURS if c != o.colour]), o.size, o.slot)
    elif edit == "shape":
        objs[i] = SceneObject(rng.choice([s for s in SHAPES if s != o.shape]), o.colour, o.size, o.slot)
    elif edit == "size":
        objs[i] = SceneObject(o.shape, o.colour, "small" if o.size == "large" else "large", o.slot)
    elif edit == "move":
        objs[i] = SceneObject(o.shape, o.colour, o.size, rng.choice(free))
    elif edit == "swap":
        j = rng.choice([k for k in range(len(objs)) if k != i])
        p = objs[j]
        objs[i] = SceneObject(o.shape, o.colour, o.size, p.slot)
        objs[j] = SceneObject(p.shape, p.colour, p.size, o.slot)
    elif edit == "drop":
        del objs[i]
    else:
        objs.append(
            SceneObject(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), rng.choice(SIZES), rng.choice(free))
        )
    return Scene.of(objs)


def sample_scenes(num_images: int, seed: int) -> list[Scene]:
    """``num_images`` scenes, a share of them one-edit siblings of earlier ones, duplicates rejected."""
    rng = random.Random(f"vsekit-demo/{seed}/scenes")
    scenes: list[Scene] = []
    seen: set[Scene] = set()
    for _ in range(num_images):
        for _ in range(_MAX_TRIES):
            if scenes and rng.random() < _SIBLING_RATE:
                candidate = _edit_scene(rng.choice(scenes), rng)
            else:
                candidate = _random_scene(rng)
            if candidate not in seen:
                break
        seen.add(candidate)  # after _MAX_TRIES a duplicate is kept (and counted in stats)
        scenes.append(candidate)
    return scenes


def assign_splits(num_images: int, seed: int) -> list[str]:
    """80/10/10 train/val/test, by a seeded permutation (so siblings land in different splits)."""
    n_held = max(1, int(num_images * 0.1 + 0.5))
    order = random.Random(f"vsekit-demo/{seed}/splits").sample(range(num_images), num_images)
    splits = ["train"] * num_images
    for k in order[:n_held]:
        splits[k] = "val"
    for k in order[n_held : 2 * n_held]:
        splits[k] = "test"
    return splits


# ---------------------------------------------------------------------------------------------------
# Captions


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(shape: str, rng: random.Random, plural: bool = False) -> str:
    singular, plural_form = rng.choice(SHAPE_NOUNS[shape])
    return plural_form if plural else singular


def _describe(o: SceneObject, rng: random.Random, size: bool | None = None) -> str:
    """'big red circle' / 'red round disc'; the size is shown when asked, else at random."""
    if size is None:
        size = rng.random() < 0.5
    words = [rng.choice(SIZE_WORDS[o.size])] if size else []
    return " ".join([*words, o.colour, _noun(o.shape, rng)])


def _mention(o: SceneObject, rng: random.Random, size: bool | None = None) -> str:
    return _article(_describe(o, rng, size))


def _where(o: SceneObject, rng: random.Random) -> str:
    return rng.choice(POSITION_PHRASES[o.slot])


def _relation(a: SceneObject, b: SceneObject, rng: random.Random) -> str:
    """A phrase R that makes 'a R b' true (cells differ, so there is always one)."""
    options: list[str] = []
    if a.col < b.col:
        options += ["to the left of", "left of"]
    if a.col > b.col:
        options += ["to the right of", "right of"]
    if a.row < b.row:
        options += ["above", "over"]
    if a.row > b.row:
        options += ["below", "under", "beneath"]
    if a.row == b.row and abs(a.col - b.col) == 1:
        options += ["next to", "beside"]
    return rng.choice(options)


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _count(k: int, rng: random.Random, phrase: str) -> str:
    if k == 1:
        return rng.choice((_article(phrase), f"one {phrase}"))
    return f"{NUMBER_WORDS[k]} {phrase}"


def _shuffled(objs: Sequence[SceneObject], rng: random.Random) -> list[SceneObject]:
    return rng.sample(list(objs), len(objs))


def _listing(scene: Scene, rng: random.Random) -> str:
    body = _join([f"{_mention(o, rng)} {_where(o, rng)}" for o in _shuffled(scene.objects, rng)])
    prefix = rng.choice(
        ("", "there is", "an image with", "a picture showing", "this picture shows", "we can see")
    )
    return f"{prefix} {body}".strip()


def _relational(scene: Scene, rng: random.Random) -> str:
    objs = scene.objects
    if len(objs) == 1:
        o = objs[0]
        return rng.choice(
            (
                f"a single {_describe(o, rng)} {_where(o, rng)}",
                f"only one shape, {_mention(o, rng)} {_where(o, rng)}",
                f"{_mention(o, rng)} alone {_where(o, rng)}",
            )
        )
    a, b = rng.sample(list(objs), 2)
    text = f"{_mention(a, rng)} {_relation(a, b, rng)} {_mention(b, rng)}"
    if len(objs) == 3:
        (c,) = [o for o in objs if o not in (a, b)]
        if rng.random() < 0.5:
            text += f" and {_relation(a, c, rng)} {_mention(c, rng)}"
        else:
            text += f", and {_mention(c, rng)} {_where(c, rng)}"
    return rng.choice(("", "", "a picture of", "an image showing")) + " " + text


def _counting(scene: Scene, rng: random.Random) -> str:
    objs = scene.objects
    n = len(objs)
    style = rng.choice(("groups", "total", "colours", "shapes"))
    if style == "groups":
        groups = Counter((o.colour, o.shape) for o in objs)
        text = _join([_count(k, rng, f"{c} {_noun(s, rng, plural=k > 1)}") for (c, s), k in groups.items()])
        return ("there are " if n > 1 and rng.random() < 0.4 else "") + text
    if style == "total":
        things = "shape" if n == 1 else rng.choice(("shapes", "objects"))
        listed = _join([_mention(o, rng) for o in _shuffled(objs, rng)])
        return rng.choice(
            (f"{NUMBER_WORDS[n]} {things}: {listed}", f"{listed}, {NUMBER_WORDS[n]} {things} in all")
        )
    if style == "colours":
        groups = Counter(o.colour for o in objs)
        if len(groups) == 1 and n > 1:
            return f"{'both' if n == 2 else 'all three'} shapes are {objs[0].colour}"
        return _join([_count(k, rng, f"{c} {'shape' if k == 1 else 'shapes'}") for c, k in groups.items()])
    if n == 1:
        return f"{rng.choice(('just', 'only'))} one {objs[0].colour} {_noun(objs[0].shape, rng)}"
    groups = Counter(o.shape for o in objs)
    text = _join([_count(k, rng, _noun(s, rng, plural=k > 1)) for s, k in groups.items()])
    colours = _join(list(dict.fromkeys(o.colour for o in objs)))
    return text + rng.choice((f", in {colours}", " on a dark background", " and nothing else"))


def _sizes(scene: Scene, rng: random.Random) -> str:
    objs = scene.objects
    n = len(objs)
    style = rng.choice(("all", "with", "odd") if n > 1 else ("all",))
    if style == "all":
        text = _join([_mention(o, rng, size=True) for o in _shuffled(objs, rng)])
        return rng.choice(("", "just ", "a dark picture with ")) + text if n == 1 else text
    if style == "with":
        a, b = rng.sample(list(objs), 2)
        return f"{_mention(a, rng, size=True)} with {_mention(b, rng, size=True)} {_relation(b, a, rng)} it"
    large = [o for o in objs if o.size == "large"]
    small = [o for o in objs if o.size == "small"]
    if len(large) == 1:
        lead = rng.choice(("the largest shape is", "the biggest shape is", "the only big shape is"))
        return f"{lead} {_mention(large[0], rng, size=False)}"
    if len(small) == 1:
        lead = rng.choice(("the smallest shape is", "the only small shape is"))
        return f"{lead} {_mention(small[0], rng, size=False)}"
    quantifier = "both" if n == 2 else "all three"
    listed = _join([_mention(o, rng, size=False) for o in _shuffled(objs, rng)])
    return f"{quantifier} shapes are {rng.choice(SIZE_WORDS[objs[0].size])}: {listed}"


def _position_first(scene: Scene, rng: random.Random) -> str:
    parts = []
    for k, o in enumerate(_shuffled(scene.objects, rng)):
        glue = " there is " if k == 0 and rng.random() < 0.5 else " "
        parts.append(f"{_where(o, rng)}{glue}{_mention(o, rng)}")
    return _join(parts)


_CAPTION_FAMILIES = (_listing, _relational, _counting, _sizes, _position_first)


def caption_scene(scene: Scene, rng: random.Random, num_captions: int = 5) -> list[str]:
    """``num_captions`` distinct true captions, cycling through the template families in random order."""
    families = rng.sample(_CAPTION_FAMILIES, len(_CAPTION_FAMILIES))
    captions: list[str] = []
    for attempt in range(50 * num_captions):
        text = families[attempt % len(families)](scene, rng)
        text = re.sub(r"\s+", " ", text).strip()
        text = text[0].upper() + text[1:] + "."
        if text not in captions:
            captions.append(text)
            if len(captions) == num_captions:
                return captions
    raise RuntimeError(f"could not word {num_captions} distinct captions for {describe_scene(scene)}")


def tokenize(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


# ---------------------------------------------------------------------------------------------------
# Rendering


def _polygon(
    cx: float, cy: float, points: Sequence[tuple[float, float]], angle: float
) -> list[tuple[float, float]]:
    c, s = np.cos(angle), np.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _draw_object(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    angle: float,
    fill: tuple[int, int, int],
) -> None:
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
        pts = [
            (-t, -e),
            (t, -e),
            (t, -t),
            (e, -t),
            (e, t),
            (t, t),
            (t, e),
            (-t, e),
            (-t, t),
            (-e, t),
            (-e, -t),
            (-t, -t),
        ]
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
        fill = np.clip(
            np.array(COLOURS[o.colour]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3), 0, 255
        )
        _draw_object(draw, o.shape, cx, cy, radius, tilt, tuple(int(v) for v in fill))
    pixels = np.asarray(image, dtype=np.float32) + NOISE_STD * rng.standard_normal(
        (s, s, 3), dtype=np.float32
    )
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG", compress_level=1)  # the noise barely compresses; favour speed


# ---------------------------------------------------------------------------------------------------
# Building and caching


def default_root(num_images: int = 3000, seed: int = 0, image_size: int = 64) -> Path:
    return cache_root() / f"demo-v{GENERATOR_VERSION}-n{num_images}-s{seed}-px{image_size}"


def _generator_block(num_images: int, seed: int, image_size: int) -> dict:
    return {"version": GENERATOR_VERSION, "num_images": num_images, "seed": seed, "image_size": image_size}


def _is_built(json_path: Path, generator: dict) -> bool:
    try:
        with open(json_path, encoding="utf-8") as f:
            return json.load(f).get("generator") == generator
    except (OSError, ValueError, AttributeError):
        return False


def _generate(folder: Path, num_images: int, seed: int, image_size: int) -> None:
    scenes = sample_scenes(num_images, seed)
    splits = assign_splits(num_images, seed)
    (folder / IMAGE_DIR).mkdir()
    entries = []
    sentid = 0
    progress = tqdm(scenes, desc="building demo set", unit="img", delay=2.0, leave=False)
    for imgid, scene in enumerate(progress):
        filename = f"{imgid:06d}.png"
        _save_png(
            render_scene(scene, image_size, np.random.default_rng([seed, imgid])),
            folder / IMAGE_DIR / filename,
        )
        captions = caption_scene(scene, random.Random(f"vsekit-demo/{seed}/captions/{imgid}"))
        sentences = [
            {"raw": c, "tokens": tokenize(c), "sentid": sentid + k, "imgid": imgid}
            for k, c in enumerate(captions)
        ]
        entries.append(
            {
                "filepath": IMAGE_DIR,
                "filename": filename,
                "split": splits[imgid],
                "imgid": imgid,
                "label": scene_label(scene),
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
                "scene": scene.to_json(),
            }
        )
        sentid += len(sentences)
    data = {
        "dataset": "demo",
        "images": entries,
        "classes": CLASS_NAMES,
        "generator": _generator_block(num_images, seed, image_size),
        "stats": {"duplicate_scenes": num_images - len(set(scenes))},
    }
    with open(folder / DATASET_FILE, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_work(root: Path) -> None:
    """Delete build/trash folders that a killed builder left next to ``root``."""
    for path in root.parent.glob(f".{root.name}.*-*-*"):
        match = re.fullmatch(rf"\.{re.escape(root.name)}\.(building|old)-(\d+)-[0-9a-f]+", path.name)
        if match and int(match.group(2)) != os.getpid() and not _pid_alive(int(match.group(2))):
            shutil.rmtree(path, ignore_errors=True)


def _publish(work: Path, root: Path, generator: dict, force: bool) -> None:
    """Move the finished ``work`` folder to ``root``. Renaming a folder is atomic, so readers see either
    the old set, no set, or the new complete one. If another builder got there first with the same set,
    keep theirs."""
    for _ in range(5):
        try:
            os.rename(work, root)  # succeeds when root is missing or an empty folder
            return
        except OSError:
            if not root.exists() and not work.exists():
                raise
            if not root.exists():
                continue  # root vanished in between (another builder is replacing it); try again
        if not force and _is_built(root / DATASET_FILE, generator):
            return
        trash = root.parent / f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(root, trash)
        except FileNotFoundError:
            continue  # someone else moved it; try again
        force = False  # the old set is out of the way; a set that appears now is a fresh one
        shutil.rmtree(trash, ignore_errors=True)
    raise RuntimeError(f"could not move the demo set into {root}: other processes keep replacing it")


def build_demo(
    root: str | Path | None = None,
    *,
    num_images: int = 3000,
    seed: int = 0,
    image_size: int = 64,
    force: bool = False,
) -> Path:
    """Build (or reuse) the demo set and return the path of its ``dataset_demo.json``.

    ``root`` defaults to ``$VSEKIT_CACHE/demo-v1-n{num_images}-s{seed}-px{image_size}`` (``VSEKIT_CACHE``
    defaults to ``~/.cache/vsekit``). An existing build with the same generator block is reused unless
    ``force``. The set is generated in a temporary sibling folder and renamed into place, so an interrupted
    build never leaves a complete-looking set behind, and concurrent builders do not mix their files.
    """
    if num_images < 10:
        raise ValueError(f"num_images must be at least 10 (one per held-out split), got {num_images}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    root = Path(root).expanduser() if root is not None else default_root(num_images, seed, image_size)
    generator = _generator_block(num_images, seed, image_size)
    json_path = root / DATASET_FILE
    if not force and _is_built(json_path, generator):
        return json_path
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not json_path.exists())):
        raise FileExistsError(f"{root} exists and does not hold a vsekit demo set; refusing to replace it")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_work(root)
    work = root.parent / f".{root.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        _generate(work, num_images, seed, image_size)
        _publish(work, root, generator, force)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return json_path
