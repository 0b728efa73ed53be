"""Building and caching the demo set: generate into a work folder, then publish it with renames only.

Everything in the output is a pure function of ``(num_images, seed, image_size)``; the JSON's
``generator`` block records them, and a folder whose block matches is reused instead of rebuilt.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np

from vsekit.data.demo import render
from vsekit.data.demo.captions import caption_scene
from vsekit.data.demo.render import render_scene
from vsekit.data.demo.scenes import CLASS_NAMES, assign_splits, sample_scenes, scene_label
from vsekit.text.tokenizer import tokenize
from vsekit.utils.fs import make_work_dir, publish_dir, remove_stale_work
from vsekit.utils.io import cache_root
from vsekit.utils.progress import iterate

GENERATOR_VERSION = 1
DATASET_FILE = "dataset_demo.json"
IMAGE_DIR = "images"


def default_root(num_images: int = 3000, seed: int = 0, image_size: int = 64) -> Path:
    """Where :func:`build_demo` caches a set by default: one folder per generator block."""
    return cache_root() / f"demo-v{GENERATOR_VERSION}-n{num_images}-s{seed}-px{image_size}"


def _generator_block(num_images: int, seed: int, image_size: int) -> dict:
    return {"version": GENERATOR_VERSION, "num_images": num_images, "seed": seed, "image_size": image_size}


def _is_built(json_path: Path, generator: dict) -> bool:
    try:
        with open(json_path, encoding="utf-8") as f:
            return json.load(f).get("generator") == generator
    except (OSError, ValueError, AttributeError):
        return False


def _words(caption: str) -> list[str]:
    """vsekit's caption tokens without the punctuation ones: the JSON's ``tokens`` field lists words."""
    return [t for t in tokenize(caption) if t[0].isalnum()]


def _generate(folder: Path, num_images: int, seed: int, image_size: int) -> None:
    scenes = sample_scenes(num_images, seed)
    splits = assign_splits(num_images, seed)
    (folder / IMAGE_DIR).mkdir()
    entries = []
    sentid = 0
    progress = iterate(scenes, desc="building demo set", unit="img", every_seconds=10.0)
    for imgid, scene in enumerate(progress):
        filename = f"{imgid:06d}.png"
        render._save_png(render_scene(scene, image_size, np.random.default_rng([seed, imgid])),
                         folder / IMAGE_DIR / filename)
        captions = caption_scene(scene, random.Random(f"vsekit-demo/{seed}/captions/{imgid}"))
        sentences = [{"raw": c, "tokens": _words(c), "sentid": sentid + k, "imgid": imgid}
                     for k, c in enumerate(captions)]
        entries.append({"filepath": IMAGE_DIR, "filename": filename, "split": splits[imgid], "imgid": imgid,
                        "label": scene_label(scene), "sentids": [s["sentid"] for s in sentences],
                        "sentences": sentences, "scene": scene.to_json()})
        sentid += len(sentences)
    data = {"dataset": "demo", "images": entries, "classes": CLASS_NAMES,
            "generator": _generator_block(num_images, seed, image_size),
            "stats": {"duplicate_scenes": num_images - len(set(scenes))}}
    with open(folder / DATASET_FILE, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def build_demo(root: str | Path | None = None, *, num_images: int = 3000, seed: int = 0, image_size: int = 64,
               force: bool = False) -> Path:
    """Build (or reuse) the demo set and return the path of its ``dataset_demo.json``.

    ``root`` defaults to ``$VSEKIT_CACHE/demo-v1-n{num_images}-s{seed}-px{image_size}`` (``VSEKIT_CACHE``
    defaults to ``~/.cache/vsekit``). An existing build with the same generator block is reused unless
    ``force``. The set is generated in a temporary sibling folder and renamed into place
    (:func:`vsekit.utils.fs.publish_dir`), so an interrupted build never leaves a complete-looking set
    behind, and concurrent builders do not mix their files: if another builder got there first with the
    same set, theirs is kept.
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
    remove_stale_work(root)
    work = make_work_dir(root)
    try:
        _generate(work, num_images, seed, image_size)
        publish_dir(work, root, keep=lambda target: _is_built(target / DATASET_FILE, generator), force=force)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return json_path
