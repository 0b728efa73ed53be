"""The caption grammar: five true captions per scene, from template families with synonyms.

Each caption comes from a different family (a listing with positions, a spatial relation, counts, sizes, a
position-first sentence) and only states facts of its scene; synonyms ("circle"/"round disc"/"disc",
"to the left of"/"left of", "above"/"over", ...) vary the wording over one small shared vocabulary.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence

from vsekit.data.demo.scenes import Scene, SceneObject, describe_scene

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
# What captions say for each grid cell (column, row) of scenes.SLOT_NAMES.
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

# Example text -> image queries (`vsekit demo` searches with them); every word occurs in the captions.
DEMO_QUERIES: list[str] = [
    "a red circle to the left of a blue square",
    "a blue square to the left of a red circle",
    "two yellow stars",
    "a small white cross at the top",
    "a big green triangle in the middle",
    "a purple box below an orange disc",
    "three shapes: a red star, a white circle and a blue triangle",
]


# ---------------------------------------------------------------------------------------------------
# Wording helpers


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
    prefix = rng.choice(("", "there is", "an image with", "a picture showing", "this picture shows",
                         "we can see"))
    return f"{prefix} {body}".strip()


def _relational(scene: Scene, rng: random.Random) -> str:
    objs = scene.objects
    if len(objs) == 1:
        o = objs[0]
        return rng.choice((f"a single {_describe(o, rng)} {_where(o, rng)}",
                           f"only one shape, {_mention(o, rng)} {_where(o, rng)}",
                           f"{_mention(o, rng)} alone {_where(o, rng)}"))
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
        return rng.choice((f"{NUMBER_WORDS[n]} {things}: {listed}",
                           f"{listed}, {NUMBER_WORDS[n]} {things} in all"))
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
