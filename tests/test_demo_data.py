"""The embedded demo set: deterministic, cached, atomic, and its captions tell the truth."""

from __future__ import annotations

import json
import os
import random
import re
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vsekit.data.demo import DATASET_FILE, DEMO_QUERIES, build_demo, render, scenes

N = 200

# Written out here rather than imported, so the test checks the generator's wording against an
# independent reading of it.
COLOUR_WORDS = {"red", "green", "blue", "yellow", "purple", "orange", "white"}
SIZE_OF_WORD = {"small": "small", "little": "small", "large": "large", "big": "large"}
SHAPE_OF_NOUN = {
    "circle": "circle", "circles": "circle", "round disc": "circle", "round discs": "circle",
    "disc": "circle", "discs": "circle",
    "square": "square", "squares": "square", "box": "square", "boxes": "square",
    "block": "square", "blocks": "square",
    "triangle": "triangle", "triangles": "triangle",
    "star": "star", "stars": "star",
    "cross": "cross", "crosses": "cross", "plus sign": "cross", "plus signs": "cross",
}  # fmt: skip
SLOT_OF_PHRASE = {
    "in the top left corner": "top left", "at the top left": "top left",
    "at the top": "top", "near the top": "top",
    "in the top right corner": "top right", "at the top right": "top right",
    "on the left side": "left", "on the left": "left",
    "in the centre": "centre", "in the middle": "centre",
    "on the right side": "right", "on the right": "right",
    "in the bottom left corner": "bottom left", "at the bottom left": "bottom left",
    "at the bottom": "bottom", "near the bottom": "bottom",
    "in the bottom right corner": "bottom right", "at the bottom right": "bottom right",
}  # fmt: skip
CELL = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "centre": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}  # fmt: skip
NUMBERS = {"one": 1, "two": 2, "three": 3}


def _alt(words) -> str:
    return "|".join(sorted(map(re.escape, words), key=len, reverse=True))


COLOUR_RE = _alt(COLOUR_WORDS)
NOUN_RE = _alt(SHAPE_OF_NOUN)
SIZE_RE = _alt(SIZE_OF_WORD)
POS_RE = _alt(SLOT_OF_PHRASE)
MENTION = rf"(?:(?P<{{0}}z>{SIZE_RE}) )?(?P<{{0}}c>{COLOUR_RE}) (?P<{{0}}s>{NOUN_RE})\b"
REL_RE = r"to the left of|left of|to the right of|right of|above|over|below|under|beneath|next to|beside"


def _holds(rel: str, a: dict, b: dict) -> bool:
    (ax, ay), (bx, by) = CELL[a["position"]], CELL[b["position"]]
    return {
        "to the left of": ax < bx, "left of": ax < bx, "to the right of": ax > bx, "right of": ax > bx,
        "above": ay < by, "over": ay < by, "below": ay > by, "under": ay > by, "beneath": ay > by,
        "next to": ay == by and abs(ax - bx) == 1, "beside": ay == by and abs(ax - bx) == 1,
    }[rel]  # fmt: skip


def _find(objs: list[dict], colour: str, noun: str) -> list[dict]:
    return [o for o in objs if o["colour"] == colour and o["shape"] == SHAPE_OF_NOUN[noun]]


def check_caption(raw: str, objs: list[dict]) -> None:
    """Fail unless every fact this parser can read from ``raw`` is true of the scene ``objs``."""
    text = raw.lower()
    words = re.findall(r"[a-z]+", text)
    assert set(words) & COLOUR_WORDS <= {o["colour"] for o in objs}, raw
    assert {SIZE_OF_WORD[w] for w in words if w in SIZE_OF_WORD} <= {o["size"] for o in objs}, raw
    nouns = re.findall(rf"\b(?:{NOUN_RE})\b", text)
    assert nouns or re.search(r"\bshapes?\b", text), raw
    assert {SHAPE_OF_NOUN[w] for w in nouns} <= {o["shape"] for o in objs}, raw
    # "a big red circle": some object has this colour, shape and (if said) size.
    for m in re.finditer(MENTION.format(""), text):
        sizes = {o["size"] for o in _find(objs, m["c"], m["s"])}
        assert sizes and (m["z"] is None or SIZE_OF_WORD[m["z"]] in sizes), (raw, m.group(0))
    # "two red circles", "three shapes", "one red shape", "two stars": exact counts.
    count_re = rf"\b(?P<n>one|two|three) (?:(?P<c>{COLOUR_RE}) )?(?P<s>{NOUN_RE}|shapes?|objects?)\b"
    for m in re.finditer(count_re, text):
        hits = [o for o in objs if m["c"] in (None, o["colour"])]
        if m["s"] in SHAPE_OF_NOUN:
            hits = [o for o in hits if o["shape"] == SHAPE_OF_NOUN[m["s"]]]
        assert len(hits) == NUMBERS[m["n"]], (raw, m.group(0))
    if re.search(r"\bboth shapes\b", text):
        assert len(objs) == 2, raw
    # "a red circle on the left", "at the top a blue box": positions.
    for m in re.finditer(rf"{MENTION.format('')} (?P<p>{POS_RE})\b", text):
        slots = {o["position"] for o in _find(objs, m["c"], m["s"])}
        assert SLOT_OF_PHRASE[m["p"]] in slots, (raw, m.group(0))
    for m in re.finditer(rf"(?P<p>{POS_RE}) (?:there is )?an? {MENTION.format('')}", text):
        slots = {o["position"] for o in _find(objs, m["c"], m["s"])}
        assert SLOT_OF_PHRASE[m["p"]] in slots, (raw, m.group(0))
    # "a red circle to the left of a big blue box": relations between some matching pair.
    pair_re = rf"{MENTION.format('a')} (?P<r>{REL_RE}) an? {MENTION.format('b')}"
    for m in re.finditer(pair_re, text):
        pairs = [
            (a, b) for a in _find(objs, m["ac"], m["as"]) for b in _find(objs, m["bc"], m["bs"]) if a is not b
        ]
        assert any(_holds(m["r"], a, b) for a, b in pairs), (raw, m.group(0))


def _load(json_path: Path) -> dict:
    return json.loads(json_path.read_text(encoding="utf-8"))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    path = build_demo(tmp_path_factory.mktemp("demo") / "set", num_images=N, seed=3)
    return path, _load(path)


def test_builds_are_byte_identical(tmp_path, built):
    path_a, _ = built
    path_b = build_demo(tmp_path / "b", num_images=N, seed=3)
    tree_a, tree_b = _tree(path_a.parent), _tree(path_b.parent)
    assert len(tree_a) == N + 1
    assert tree_a == tree_b
    other = build_demo(tmp_path / "c", num_images=N, seed=4)
    assert other.read_bytes() != path_a.read_bytes()


def test_second_call_reuses_and_force_rebuilds(tmp_path, monkeypatch):
    writes = []
    real_save = render._save_png
    monkeypatch.setattr(render, "_save_png", lambda img, path: (writes.append(path), real_save(img, path)))
    path = build_demo(tmp_path / "set", num_images=30)
    assert len(writes) == 30
    before = path.stat()
    assert build_demo(tmp_path / "set", num_images=30) == path
    assert len(writes) == 30 and path.stat().st_mtime_ns == before.st_mtime_ns
    build_demo(tmp_path / "set", num_images=30, force=True)
    assert len(writes) == 60
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns)
    # A different generator block at the same root is rebuilt, not reused.
    build_demo(tmp_path / "set", num_images=30, seed=1)
    assert len(writes) == 90 and _load(path)["generator"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no work or trash folders left


def test_default_root_is_under_vsekit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VSEKIT_CACHE", str(tmp_path / "cache"))
    path = build_demo(num_images=20, seed=2, image_size=32)
    assert path == tmp_path / "cache" / "demo-v1-n20-s2-px32" / DATASET_FILE


def test_structure(built):
    path, data = built
    images = data["images"]
    assert data["dataset"] == "demo"
    assert data["generator"] == {"version": 1, "num_images": N, "seed": 3, "image_size": 64}
    assert [e["imgid"] for e in images] == list(range(N))
    assert Counter(e["split"] for e in images) == {"train": 160, "val": 20, "test": 20}
    sentids = [s["sentid"] for e in images for s in e["sentences"]]
    assert len(set(sentids)) == len(sentids) == 5 * N
    for e in images:
        assert 0 <= e["label"] < len(data["classes"])
        assert len(e["sentences"]) == 5 and len({s["raw"] for s in e["sentences"]}) == 5
        assert e["sentids"] == [s["sentid"] for s in e["sentences"]]
        for s in e["sentences"]:
            assert s["raw"].strip() and len(s["tokens"]) >= 3
            assert all(re.fullmatch(r"[a-z]+", t) for t in s["tokens"])
    for e in images[:: N // 10]:
        with Image.open(path.parent / e["filepath"] / e["filename"]) as im:
            assert im.mode == "RGB" and im.size == (64, 64)


def test_image_size_and_small_splits(tmp_path):
    data = _load(build_demo(tmp_path / "s", num_images=25, image_size=32))
    assert Counter(e["split"] for e in data["images"]) == {"train": 19, "val": 3, "test": 3}
    with Image.open(tmp_path / "s" / "images" / data["images"][0]["filename"]) as im:
        assert im.size == (32, 32)
    with pytest.raises(ValueError):
        build_demo(tmp_path / "t", num_images=5)


def test_captions_are_true_of_their_scene(built):
    _, data = built
    for e in data["images"]:
        for s in e["sentences"]:
            check_caption(s["raw"], e["scene"])


def test_checker_rejects_false_captions():
    objs = [
        {"shape": "circle", "colour": "red", "size": "large", "position": "left"},
        {"shape": "square", "colour": "blue", "size": "small", "position": "right"},
    ]
    check_caption("A big red circle to the left of a small blue box.", objs)
    for lie in (
        "A red circle to the right of a blue box.",
        "A green circle on the left.",
        "Three shapes: a red circle and a blue box.",
        "Two red circles.",
        "A blue box on the left.",
        "On the right there is a red disc.",
        "A small red circle.",
    ):
        with pytest.raises(AssertionError):
            check_caption(lie, objs)


def test_named_colours_are_drawn(built):
    path, data = built
    for e in data["images"][::4]:
        with Image.open(path.parent / "images" / e["filename"]) as im:
            pixels = np.asarray(im, dtype=np.float64)
        for name, rgb in scenes.COLOURS.items():
            dist = np.linalg.norm(pixels - np.array(rgb), axis=-1)
            near = int((dist < 60).sum())
            if name in {o["colour"] for o in e["scene"]}:
                assert near >= 15, (e["filename"], name, near)
            else:
                assert not (dist < 40).any(), (e["filename"], name)


def test_labels_follow_the_documented_rule(built):
    _, data = built
    for e in data["images"]:
        objs = e["scene"]  # stored in reading order
        main = next((o for o in objs if o["size"] == "large"), objs[0])
        assert data["classes"][e["label"]] == f"{main['shape']}/{len(objs)}"
    assert len(data["classes"]) == 15
    assert len({e["label"] for e in data["images"]}) >= 12


def _scene_key(objs: list[dict]) -> frozenset:
    return frozenset((o["shape"], o["colour"], o["size"], o["position"]) for o in objs)


def _one_edit_apart(a: list[dict], b: list[dict]) -> bool:
    """Same number of objects, all equal but one object that differs in exactly one field."""
    if len(a) != len(b):
        return False
    ka, kb = _scene_key(a), _scene_key(b)
    (left,), (right,) = (ka - kb, kb - ka) if len(ka - kb) == 1 == len(kb - ka) else ((None,), (None,))
    return left is not None and sum(x != y for x, y in zip(left, right)) == 1


def test_no_duplicates_but_many_near_duplicates(built):
    _, data = built
    scenes = [e["scene"] for e in data["images"]]
    assert len({_scene_key(s) for s in scenes}) == N
    assert data["stats"]["duplicate_scenes"] == 0
    near = sum(_one_edit_apart(scenes[i], scenes[j]) for i in range(N) for j in range(i + 1, N))
    assert near >= N // 4


def test_captions_share_one_vocabulary(built):
    _, data = built
    word_sets = [{t for s in e["sentences"] for t in s["tokens"]} for e in data["images"]]
    doc_freq = Counter(w for ws in word_sets for w in ws)
    assert len(doc_freq) < 120
    common = [w for w, k in doc_freq.items() if k >= 0.05 * N]
    assert len(common) >= 0.6 * len(doc_freq)
    tokens = [t for e in data["images"] for s in e["sentences"] for t in s["tokens"]]
    assert sum(doc_freq[t] >= 0.1 * N for t in tokens) >= 0.9 * len(tokens)
    rng = random.Random(0)
    pairs = [rng.sample(range(N), 2) for _ in range(500)]
    jaccard = [len(word_sets[i] & word_sets[j]) / len(word_sets[i] | word_sets[j]) for i, j in pairs]
    assert np.mean(jaccard) > 0.25


def test_relation_flips_exist(built):
    """LSEH needs captions that differ from the truth in one relation: swapped twins must occur."""
    _, data = built
    by_pair = Counter()
    for e in data["images"]:
        objs = e["scene"]
        if len(objs) == 2:
            by_pair[frozenset((o["shape"], o["colour"], o["size"]) for o in objs)] += 1
    assert max(by_pair.values()) >= 2


def test_interrupted_build_leaves_nothing_complete(tmp_path, monkeypatch):
    calls = []
    real_save = render._save_png

    def failing_save(image, path):
        calls.append(path)
        if len(calls) == 17:
            raise OSError("disk full (simulated)")
        real_save(image, path)

    monkeypatch.setattr(render, "_save_png", failing_save)
    with pytest.raises(OSError, match="simulated"):
        build_demo(tmp_path / "set", num_images=40)
    assert list(tmp_path.iterdir()) == []
    # A killed forced rebuild keeps the previous complete set in place.
    monkeypatch.setattr(render, "_save_png", real_save)
    path = build_demo(tmp_path / "set", num_images=40)
    good = _tree(tmp_path / "set")
    calls.clear()
    monkeypatch.setattr(render, "_save_png", failing_save)
    with pytest.raises(OSError, match="simulated"):
        build_demo(tmp_path / "set", num_images=40, force=True)
    assert _tree(tmp_path / "set") == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    assert _load(path)["generator"]["num_images"] == 40


def test_stale_work_from_a_killed_builder_is_removed(tmp_path):
    stale = tmp_path / ".set.building-999999999-0badcafe"
    (stale / "images").mkdir(parents=True)
    (stale / DATASET_FILE).write_text("{}")
    build_demo(tmp_path / "set", num_images=20)
    assert not stale.exists() or os.name != "posix"


def test_concurrent_builders_agree(tmp_path):
    results, errors = [], []

    def run():
        try:
            results.append(build_demo(tmp_path / "set", num_images=60))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert len(list((tmp_path / "set" / "images").iterdir())) == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_demo(tmp_path / "mine", num_images=20)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_demo_queries_use_the_caption_vocabulary(built):
    _, data = built
    vocab = {t for e in data["images"] for s in e["sentences"] for t in s["tokens"]}
    for query in DEMO_QUERIES:
        assert set(re.findall(r"[a-z]+", query)) <= vocab, query


def test_describe_scene_round_trips(built):
    _, data = built
    for e in data["images"][:20]:
        scene = scenes.Scene.from_json(e["scene"])
        assert scene.to_json() == e["scene"]
        assert scenes.describe_scene(scene).count(";") == len(e["scene"]) - 1


def test_grid_regions_are_patch_means(tmp_path):
    from vsekit.data.sources import data_config, load_split

    cfg = data_config({"format": "demo", "root": str(tmp_path / "demo"), "num_images": 20, "regions": "grid",
                       "grid": 2, "patch": 2})
    corpus = load_split(cfg, "train")
    assert corpus.is_precomputed and corpus.features.shape == (corpus.num_images, 4, 12)
    raw = load_split(data_config({"format": "demo", "root": str(tmp_path / "demo"), "num_images": 20}), "train")
    img = np.asarray(Image.open(raw.image_paths[0]).convert("RGB"), dtype=np.float64) / 255.0  # 64 x 64
    # region 1 = top-right patch (rows 0-31, columns 32-63); its pixel (0, 1) averages rows 0-15, columns 48-63
    expected = img[0:16, 48:64].mean(axis=(0, 1))
    np.testing.assert_allclose(corpus.features[0, 1].reshape(2, 2, 3)[0, 1], expected, atol=1e-5)
    again = load_split(cfg, "train")  # the cached array
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(corpus.features))
