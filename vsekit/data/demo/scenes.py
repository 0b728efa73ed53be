"""The demo world: what a scene can hold, its ground truth, its label, and how scenes are sampled.

Everything here is independent of wording (:mod:`.captions`) and of pixels (:mod:`.render`): a
:class:`Scene` is the truth that both are derived from, and what the JSON stores under ``scene``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# Nominal RGB of each colour; rendered objects deviate by at most COLOUR_JITTER per channel plus noise.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 100, 235), "yellow": (235, 215, 40),
    "purple": (155, 65, 205), "orange": (245, 140, 25), "white": (235, 235, 235)}
SIZES: tuple[str, ...] = ("small", "large")

# Grid cells as (column, row); names are stored in the JSON, phrases (in .captions) are what captions say.
SLOT_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top left", (1, 0): "top", (2, 0): "top right",
    (0, 1): "left", (1, 1): "centre", (2, 1): "right",
    (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right"}
SLOTS: tuple[tuple[int, int], ...] = tuple(sorted(SLOT_NAMES, key=lambda s: (s[1], s[0])))

CLASS_NAMES: list[str] = [f"{shape}/{count}" for shape in SHAPES for count in (1, 2, 3)]

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
        return [{"shape": o.shape, "colour": o.colour, "size": o.size, "position": SLOT_NAMES[o.slot]}
                for o in self.objects]

    @classmethod
    def from_json(cls, items: Sequence[dict]) -> Scene:
        slot_of = {name: slot for slot, name in SLOT_NAMES.items()}
        return cls.of([SceneObject(d["shape"], d["colour"], d["size"], slot_of[d["position"]])
                       for d in items])


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
        shape, colour, size = rng.choice(SHAPES), rng.choice(tuple(COLOURS)), rng.choice(SIZES)
        objs.append(SceneObject(shape, colour, size, rng.choice(free)))
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
