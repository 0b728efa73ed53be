"""Colour and shape agreement of demo images (issue 25: do generated images show what their caption names?)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from vsekit.data.demo.render import render_scene
from vsekit.data.demo.scenes import SLOTS, Scene, SceneObject
from vsekit.eval.appearance import (
    ShapeClassifier,
    agreement,
    as_pixels,
    blob_features,
    dominant_colour,
    main_objects,
)


def _canvas(size: int = 16) -> np.ndarray:
    return np.full((size, size, 3), 20.0)  # a dark demo-like ground


def test_dominant_colour_is_the_palette_colour_of_most_foreground_pixels():
    img = _canvas()
    img[2:12, 2:12] = (210, 50, 45)    # a large red square (100 pixels, near red's (220, 40, 40))
    img[13:16, 13:16] = (50, 100, 235)  # a small blue one (9 pixels)
    assert dominant_colour(img) == "red"
    img[13:16, 0:16] = (245, 140, 25)  # orange, 48 pixels: still fewer than red's
    assert dominant_colour(img) == "red"
    assert dominant_colour(_canvas()) is None  # nothing bright enough to be drawn
    assert dominant_colour(_canvas() + 60) is None  # a lighter ground is still ground (max channel 80 < 100)


def test_as_pixels_reads_uint8_float_and_channels_first():
    u8 = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    u8[..., 0] = 255
    np.testing.assert_array_equal(as_pixels(u8), u8.astype(float))
    np.testing.assert_allclose(as_pixels(u8.astype(np.float32) / 255.0), u8.astype(float))
    np.testing.assert_allclose(as_pixels(u8.transpose(0, 3, 1, 2)), u8.astype(float))
    with pytest.raises(ValueError, match="3 colour channels"):
        as_pixels(np.zeros((2, 4, 4, 2)))


def test_blob_features_read_the_largest_blob_only():
    one, two = _canvas(32), _canvas(32)
    one[4:14, 4:20] = 255.0                       # a 10 x 16 rectangle
    two[4:14, 4:20] = 255.0
    two[25:28, 25:28] = 255.0                     # plus a small square elsewhere
    np.testing.assert_allclose(blob_features(one), blob_features(two))
    assert blob_features(one)[-2:] == pytest.approx([10 / 16, 1.0])  # aspect, fill of its box
    assert not blob_features(_canvas(32)).any()


def test_shape_classifier_tells_rendered_circles_from_crosses():
    rng, py = np.random.default_rng(0), random.Random(0)

    def scenes(n):
        out = []
        for i in range(n):
            shape = ("circle", "cross")[i % 2]
            out.append((shape, Scene.of([SceneObject(shape, py.choice(["red", "blue", "white"]), "large",
                                                     py.choice(SLOTS))])))
        return out

    def images(sc):
        return np.stack([np.asarray(render_scene(s, 64, rng)) for _, s in sc])

    train, test = scenes(40), scenes(20)
    clf = ShapeClassifier().fit(images(train), [s for s, _ in train])
    assert agreement(clf.predict(images(test)), [s for s, _ in test])["agreement"] >= 0.9
    with pytest.raises(ValueError, match="at least two shapes"):
        ShapeClassifier().fit(images(train[:1]), ["circle"])


def test_agreement_and_its_chance_by_hand():
    got = agreement(["a", "a", None, "b"], ["a", "b", "b", "b"])
    # hits: image 0 and 3; chance: P(pred a) P(true a) + P(pred b) P(true b) = 2/4 * 1/4 + 1/4 * 3/4
    assert got == pytest.approx({"agreement": 0.5, "chance": 5 / 16})
    assert agreement(["a"] * 4, ["a", "b", "c", "d"]) == pytest.approx({"agreement": 0.25, "chance": 0.25})
    with pytest.raises(ValueError, match="3 predictions for 2 targets"):
        agreement(["a"] * 3, ["a", "b"])


def test_main_objects_come_from_the_scenes_of_a_demo_json(tmp_path):
    scene = [{"shape": "star", "colour": "blue", "size": "small", "position": "left"},
             {"shape": "cross", "colour": "red", "size": "large", "position": "bottom"}]
    path = tmp_path / "dataset_demo.json"
    path.write_text(json.dumps({"images": [{"filename": "000001.png", "scene": scene},
                                           {"filename": "000002.png", "scene": scene[:1]}]}))
    assert main_objects(path, ["images/000002.png", "000001.png"]) == [("blue", "star"), ("red", "cross")]
    with pytest.raises(ValueError, match="no scene for 1 of the images"):
        main_objects(path, ["000003.png"])
