"""The data layer: one registry of sources, ``sniff`` for ``--data``, one ``load_split`` used by every command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from _configs import small_recipe_config
from PIL import Image

from vsekit.config import ConfigError, resolve_config
from vsekit.data.corpus import Corpus, DataError
from vsekit.data.sources import (
    SOURCES,
    DataConfig,
    FolderData,
    data_config,
    load_split,
    register_source,
    sniff_order,
    sniff_source,
    source_names,
)
from vsekit.data.sources import base as sources_base
from vsekit.registry import Registry

RECIPES = Path(__file__).resolve().parents[1] / "vsekit" / "configs"


def _png(path: Path, colour=(200, 0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_registered_sources():
    assert set(source_names()) >= {"karpathy", "precomp", "pairs", "folder", "demo"}
    assert isinstance(data_config({"format": "folder", "path": "x"}), FolderData)


def test_sniff_recognises_each_kind(tmp_path):
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "test_caps.txt").write_text("a\n")
    np.save(tmp_path / "pre" / "test_ims.npy", np.zeros((1, 2), np.float32))
    (tmp_path / "dataset_x.json").write_text("{}")
    (tmp_path / "rows.json").write_text('  [{"image": "a.png", "caption": "a cat"}]')  # a pairs array
    _png(tmp_path / "mixed" / "b.png")  # images with a stray *_caps.txt: not precomputed features
    (tmp_path / "mixed" / "train_caps.txt").write_text("x\n")
    (tmp_path / "pairs.csv").write_text("image,caption\n")
    (tmp_path / "pairs.jsonl").write_text("")
    _png(tmp_path / "photos" / "a.png")
    base = data_config({"format": "demo", "check_images": False, "skip_missing_images": True})
    kinds = {name: sniff_source(str(tmp_path / name), base=base).format
             for name in ("pre", "dataset_x.json", "pairs.csv", "pairs.jsonl", "photos", "rows.json", "mixed")}
    assert kinds == {"pre": "precomp", "dataset_x.json": "karpathy", "pairs.csv": "pairs", "pairs.jsonl": "pairs",
                     "photos": "folder", "rows.json": "pairs", "mixed": "folder"}
    sniffed = sniff_source(str(tmp_path / "pairs.csv"), image_root="/imgs", base=base)
    assert (sniffed.image_root, sniffed.check_images, sniffed.skip_missing_images) == ("/imgs", False, True)
    assert sniff_source("demo", base=base) is base  # the checkpoint's own demo options
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not a data set vsekit recognises"):
        sniff_source(str(tmp_path / "notes.txt"))
    with pytest.raises(DataError, match="no such file"):
        sniff_source(str(tmp_path / "missing"))


def _copy_of_sources(names: list[str] | None = None) -> Registry:
    """A registry of the built-in sources, registered again with their own priorities in the order of
    ``names``, as if their modules were imported in that order."""
    classes = {n: SOURCES.get(n) for n in SOURCES.names()}
    copy = Registry("data format")
    for name in names or SOURCES.names():
        copy.register(name)(classes[name])
    return copy


def test_sniff_order_does_not_depend_on_import_order(tmp_path, monkeypatch):
    """Each format declares its own sniff priority (shards and xmodal used to share one, so which of them
    read a folder holding both depended on which module was imported first)."""
    order = sniff_order()
    priorities = [SOURCES.get(n).sniff_priority for n in order]
    assert len(set(priorities)) == len(priorities) == 6
    assert order == ["precomp", "shards", "xmodal", "karpathy", "pairs", "folder"]
    both = tmp_path / "both"
    both.mkdir()
    (both / "train-000000.tar").write_bytes(b"")
    np.save(both / "train_img.npy", np.zeros((1, 2), np.float32))
    assert sniff_source(str(both)).format == "shards"
    for names in (SOURCES.names(), SOURCES.names()[::-1]):
        monkeypatch.setattr(sources_base, "SOURCES", _copy_of_sources(names))
        assert sniff_order() == order and sniff_source(str(both)).format == "shards"
    with pytest.raises(KeyError, match="sniff_priority 15 is 'shards'"):
        register_source("tars", sniff_priority=15)(type("Tars", (DataConfig,), {"__doc__": "tars."}))
    assert "tars" not in source_names()


def test_folder_source_reads_images_and_sidecar_captions(tmp_path):
    root = tmp_path / "photos"
    _png(root / "beach.png")
    (root / "beach.txt").write_text("a sandy beach\nwaves at dusk\n")
    _png(root / "sub" / "dog.jpg")
    (root / "sub" / "dog.txt").write_text("a dog\n")
    _png(root / "uncaptioned.png")
    (root / "readme.md").write_text("not an image")
    c = load_split({"format": "folder", "path": str(root)}, "test")
    assert c.image_ids == ["beach.png", "sub/dog.jpg", "uncaptioned.png"]
    assert c.captions == ["a sandy beach", "waves at dusk", "a dog"]
    assert c.caption_to_image.tolist() == [0, 0, 1] and c.caption_ids[2] == "sub/dog.txt:1"
    (root / "beach.txt").write_text("one\n\nthree\n")
    with pytest.raises(DataError, match=r"beach.txt:2: empty caption"):
        load_split({"format": "folder", "path": str(root)}, "test")
    (root / "beach.txt").write_bytes(b"ok\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"beach.txt:2: not valid UTF-8"):
        load_split({"format": "folder", "path": str(root)}, "test")


def test_folder_source_splits_by_subfolder(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            _png(tmp_path / split / f"{i}.png")
            (tmp_path / split / f"{i}.txt").write_text(f"{split} image {i}\n")
    spec = {"format": "folder", "path": str(tmp_path)}
    assert load_split(spec, "train").num_images == 3 and load_split(spec, "test").num_images == 2
    with pytest.raises(DataError, match="no val/"):
        load_split(spec, "val")


def _tiny_run(tmp_path: Path, *extra: str):
    from vsekit.train.trainer import Trainer

    cfg = small_recipe_config("demo_vsepp", tmp_path / "run", "data.num_images=40", "data.val_max_images=8",
                              "transform.image_size=48", "transform.resize=48", "train.epochs=1",
                              "train.max_steps_per_epoch=1", "train.batch_size=8", *extra)
    t = Trainer(cfg)
    t.fit()
    return cfg, t


def test_one_data_spec_gives_one_corpus_in_every_command(tmp_path, cache, capsys):
    """train, eval, encode and index build read the same demo images, whatever the training crop is
    (a 48-px crop used to make `index build --data demo` render a second, 48-px demo set)."""
    from vsekit.cli import main
    from vsekit.cli.common import data_from_arg
    from vsekit.inference import Embedder

    cfg, trainer = _tiny_run(tmp_path)
    test = load_split(cfg.data, "test")
    assert [p.parent.parent for p in trainer.train_corpus.image_paths[:1]] == [test.image_paths[0].parent.parent]
    emb = Embedder.from_checkpoint(tmp_path / "run")
    for arg in (None, "demo"):
        again = load_split(data_from_arg(arg, None, emb.config.data), "test")
        assert again.image_paths == test.image_paths and again.captions == test.captions
    assert main(["index", "build", str(tmp_path / "run"), "--data", "demo", "--out", str(tmp_path / "ix"),
                 "-q"]) == 0
    records = [json.loads(line) for gen in (tmp_path / "ix").glob("g*") for line in
               (gen / "images.jsonl").read_text().splitlines()]
    assert [Path(r["path"]) for r in records] == [p.resolve() for p in test.image_paths]
    assert main(["encode", str(tmp_path / "run"), "--images", "demo", "--out", str(tmp_path / "e.npy")]) == 0
    assert (tmp_path / "e.ids.txt").read_text().split() == test.image_ids
    with Image.open(test.image_paths[0]) as im:
        assert im.size == (64, 64)  # the demo's render size, not the 48-px crop


def test_adding_a_source_is_one_class_and_a_registry_entry(tmp_path, monkeypatch):
    """What docs/data.md shows: a new format plugs into validation, sniffing and load_split."""
    monkeypatch.setattr(sources_base, "SOURCES", _copy_of_sources())

    @register_source("tsvfeats", sniff_priority=5)
    class TsvFeatures(DataConfig):
        """a .feats file of caption<TAB>feature values."""

        format: Literal["tsvfeats"] = "tsvfeats"
        path: str
        reads_image_files = False

        def read(self, split: str, max_images: int | None) -> Corpus:
            rows = [line.split("\t") for line in Path(self.path).read_text().splitlines()]
            feats = np.array([[float(v) for v in r[1].split()] for r in rows], dtype=np.float32)
            return Corpus(name=self.path, captions=[r[0] for r in rows], caption_to_image=np.arange(len(rows)),
                          image_ids=[str(i) for i in range(len(rows))], features=feats)

        @classmethod
        def sniff(cls, path: Path) -> bool:
            return path.suffix == ".feats"

    f = tmp_path / "x.feats"
    f.write_text("a cat\t1 0\na dog\t0 1\na fox\t1 1\n")
    assert sniff_source(str(f)).format == "tsvfeats"
    cfg = resolve_config(None, ["data.format=tsvfeats", f"data.path={f}", "data.max_images=2"])
    assert load_split(cfg.data, "test").captions == ["a cat", "a dog"]
    with pytest.raises(ConfigError, match="^data.pathh: unknown key; did you mean data.path"):
        resolve_config(None, ["data.format=tsvfeats", "data.pathh=x"])
