"""Karpathy / precomp / pairs readers and ``load_corpus`` dispatch, on tiny files generated in tmp_path."""

from __future__ import annotations

import io
import json
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vsekit.data.checks import check_images, select_images
from vsekit.data.corpus import DataError
from vsekit.data.karpathy import read_karpathy
from vsekit.data.pairs import read_pairs
from vsekit.data.precomp import read_precomp
from vsekit.data.sources import load_corpus, source_names
from vsekit.errors import ConfigError

# ---------------------------------------------------------------- Karpathy


def _sentences(first_id: int, count: int, stem: str) -> list[dict]:
    return [
        {"raw": f"{stem} caption {k} ", "tokens": [stem, "caption", str(k)], "sentid": first_id + k}
        for k in range(count)
    ]


def _karpathy_data() -> dict:
    """Five images: caption counts 1, 3, 5, 7, 2; splits train, restval, val, test, train."""
    spec = [("train", 1), ("restval", 3), ("val", 5), ("test", 7), ("train", 2)]
    images, sentid = [], 100
    for i, (split, count) in enumerate(spec):
        images.append(
            {
                "filepath": "train2014" if split in ("train", "restval") else "val2014",
                "filename": f"img{i}.jpg",
                "split": split,
                "imgid": i,
                "cocoid": 9000 + i,
                "label": i % 3,
                "sentences": _sentences(sentid, count, f"im{i}"),
            }
        )
        sentid += count
    return {"images": images, "dataset": "tiny"}


def _write_json(tmp_path: Path, data: dict, name: str = "dataset_tiny.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_karpathy_split_filter_and_mapping(tmp_path: Path) -> None:
    path = _write_json(tmp_path, _karpathy_data())
    train = read_karpathy(path, tmp_path / "imgs", "train")
    assert train.name == "tiny_train"
    assert train.image_ids == ["9000", "9004"]
    assert train.captions == ["im0 caption 0", "im4 caption 0", "im4 caption 1"]
    assert train.caption_to_image.tolist() == [0, 1, 1]
    assert train.caption_ids == ["100", "116", "117"]
    assert train.image_paths == [tmp_path / "imgs/train2014/img0.jpg", tmp_path / "imgs/train2014/img4.jpg"]
    assert train.labels.tolist() == [0, 1]
    assert train.captions_per_image().tolist() == [1, 2]

    test = read_karpathy(path, tmp_path, "test")
    assert test.num_images == 1 and test.num_captions == 7
    assert test.caption_to_image.tolist() == [0] * 7

    for alias in ("val", "dev"):
        val = read_karpathy(path, tmp_path, alias)
        assert val.image_ids == ["9002"] and val.num_captions == 5 and val.name == "tiny_val"


def test_karpathy_restval_merge_keeps_file_order(tmp_path: Path) -> None:
    path = _write_json(tmp_path, _karpathy_data())
    merged = read_karpathy(path, tmp_path, "train", restval_into_train=True)
    assert merged.image_ids == ["9000", "9001", "9004"]
    assert merged.caption_to_image.tolist() == [0, 1, 1, 1, 2, 2]
    assert merged.meta["restval_into_train"] is True
    restval = read_karpathy(path, tmp_path, "restval")
    assert restval.image_ids == ["9001"]
    # the flag only widens train
    assert read_karpathy(path, tmp_path, "test", restval_into_train=True).image_ids == ["9003"]


def test_karpathy_max_images_keeps_all_captions(tmp_path: Path) -> None:
    path = _write_json(tmp_path, _karpathy_data())
    first = read_karpathy(path, tmp_path, "train", restval_into_train=True, max_images=2)
    assert first.image_ids == ["9000", "9001"] and first.num_captions == 4


def test_karpathy_ids_tokens_fallback_and_no_labels(tmp_path: Path) -> None:
    data = {
        "images": [
            {
                "filename": "a.jpg",
                "split": "test",
                "imgid": 7,
                "sentences": [{"tokens": ["a", "dog"], "sentid": 1}],
            },
            {"filename": "b.jpg", "split": "test", "sentences": [{"raw": "a cat"}]},
        ]
    }
    path = _write_json(tmp_path, data, "dataset_flickr8k.json")
    corpus = read_karpathy(path, None, "test")
    assert corpus.name == "flickr8k_test"
    assert corpus.image_ids == ["7", "b.jpg"]  # imgid, else the file name
    assert corpus.captions == ["a dog", "a cat"]
    assert corpus.caption_ids == ["1", "b.jpg#0"]
    assert corpus.image_paths == [tmp_path / "a.jpg", tmp_path / "b.jpg"]  # no filepath, root = JSON folder
    assert corpus.labels is None


def test_karpathy_empty_caption_names_file_image_and_sentence(tmp_path: Path) -> None:
    data = _karpathy_data()
    data["images"][3]["sentences"][4]["raw"] = "   "
    path = _write_json(tmp_path, data)
    with pytest.raises(DataError) as err:
        read_karpathy(path, tmp_path, "test")
    message = str(err.value)
    assert str(path) in message and "images[3]" in message and "sentences[4]" in message
    assert "empty caption" in message


def test_karpathy_missing_sentences(tmp_path: Path) -> None:
    data = _karpathy_data()
    del data["images"][2]["sentences"]
    path = _write_json(tmp_path, data)
    with pytest.raises(DataError, match=r"images\[2\] has no 'sentences'"):
        read_karpathy(path, tmp_path, "val")


def test_karpathy_unknown_split_value_and_request(tmp_path: Path) -> None:
    data = _karpathy_data()
    data["images"][4]["split"] = "holdout"
    path = _write_json(tmp_path, data)
    with pytest.raises(DataError, match=r"images\[4\] has unknown split 'holdout'"):
        read_karpathy(path, tmp_path, "train")
    good = _write_json(tmp_path, _karpathy_data(), "dataset_good.json")
    with pytest.raises(DataError, match="unknown split 'testall'"):
        read_karpathy(good, tmp_path, "testall")


def test_karpathy_training_image_without_sentences(tmp_path: Path) -> None:
    data = _karpathy_data()
    data["images"][1]["sentences"] = []  # restval
    path = _write_json(tmp_path, data)
    assert read_karpathy(path, tmp_path, "train").num_images == 2  # restval not used
    with pytest.raises(DataError, match=r"images\[1\].*no sentences"):
        read_karpathy(path, tmp_path, "train", restval_into_train=True)
    # an evaluation image without captions is a legitimate distractor
    data["images"][3]["sentences"] = []
    path = _write_json(tmp_path, data, "dataset_eval.json")
    assert read_karpathy(path, tmp_path, "test").num_captions == 0


def test_karpathy_missing_filename_and_bad_label(tmp_path: Path) -> None:
    data = _karpathy_data()
    del data["images"][0]["filename"]
    with pytest.raises(DataError, match=r"images\[0\] has no 'filename'"):
        read_karpathy(_write_json(tmp_path, data), tmp_path, "train")
    data = _karpathy_data()
    data["images"][0]["label"] = "cat"
    with pytest.raises(DataError, match=r"images\[0\]: 'label' must be an integer"):
        read_karpathy(_write_json(tmp_path, data), tmp_path, "train")
    with pytest.raises(DataError, match="file not found"):
        read_karpathy(tmp_path / "nope.json", tmp_path, "train")


# ---------------------------------------------------------------- precomp


def _write_precomp(root: Path, split: str, shape: tuple[int, ...], captions: list[str]) -> np.ndarray:
    root.mkdir(parents=True, exist_ok=True)
    feats = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.save(root / f"{split}_ims.npy", feats)
    (root / f"{split}_caps.txt").write_text("".join(c + "\n" for c in captions), encoding="utf-8")
    return feats


@pytest.mark.parametrize("shape", [(4, 6), (4, 3, 6)], ids=["global", "regions"])
def test_precomp_ratio_five(tmp_path: Path, shape: tuple[int, ...]) -> None:
    caps = [f"caption {j} é" for j in range(20)]
    feats = _write_precomp(tmp_path / "f30k", "train", shape, caps)
    corpus = read_precomp(tmp_path / "f30k", "train")
    assert isinstance(corpus.features, np.memmap)
    assert corpus.features.shape == shape
    np.testing.assert_array_equal(np.asarray(corpus.features), feats)
    assert corpus.captions == caps
    assert corpus.caption_to_image.tolist() == [j // 5 for j in range(20)]
    assert corpus.meta["captions_per_image"] == 5
    assert corpus.caption_ids[0] == "train_caps.txt:1"
    assert corpus.image_ids == ["0", "1", "2", "3"]


def test_precomp_ratio_one_and_max_images(tmp_path: Path) -> None:
    _write_precomp(tmp_path, "test", (5, 4), [f"c{j}" for j in range(5)])
    corpus = read_precomp(tmp_path, "test")
    assert corpus.caption_to_image.tolist() == [0, 1, 2, 3, 4]
    _write_precomp(tmp_path, "testall", (6, 2, 4), [f"c{j}" for j in range(30)])
    first = read_precomp(tmp_path, "testall", max_images=2)
    assert isinstance(first.features, np.memmap) and first.features.shape == (2, 2, 4)
    assert first.num_captions == 10 and first.caption_to_image.max() == 1


def test_precomp_val_falls_back_to_dev(tmp_path: Path) -> None:
    _write_precomp(tmp_path, "dev", (2, 3), ["a", "b"])
    corpus = read_precomp(tmp_path, "val")
    assert corpus.meta["file_split"] == "dev" and corpus.num_images == 2


def test_precomp_counts_that_do_not_divide(tmp_path: Path) -> None:
    _write_precomp(tmp_path, "train", (4, 3), [f"c{j}" for j in range(11)])
    with pytest.raises(DataError) as err:
        read_precomp(tmp_path, "train")
    message = str(err.value)
    assert "train_caps.txt" in message and "train_ims.npy" in message
    assert "11" in message and " 4 " in message


def test_precomp_empty_caption_line(tmp_path: Path) -> None:
    _write_precomp(tmp_path, "train", (2, 3), ["one", "two", "", "four"])
    with pytest.raises(DataError, match=r"train_caps\.txt:3: empty caption line"):
        read_precomp(tmp_path, "train")


def test_precomp_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"expected .*val_ims\.npy or .*dev_ims\.npy"):
        read_precomp(tmp_path, "val")
    np.save(tmp_path / "test_ims.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(DataError, match=r"test_caps\.txt: caption file not found"):
        read_precomp(tmp_path, "test")


def test_precomp_captions_split_on_newlines_only(tmp_path: Path) -> None:
    _write_precomp(tmp_path, "train", (2, 3), ["a\u2028b", "c\x0cd"])
    assert read_precomp(tmp_path, "train").num_captions == 2


# ---------------------------------------------------------------- pairs


def _write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_pairs_csv_grouping_split_and_labels(tmp_path: Path) -> None:
    path = _write_csv(
        tmp_path / "pairs.csv",
        [
            "image,caption,split,label",
            "b.png,a bird,train,2",
            "a.png,a cat,train,1",
            'b.png,"a bird, flying",train,2',
            "c.png,a car,test,",
            "a.png,another cat,train,",
        ],
    )
    train = read_pairs(path, "train")
    assert train.image_ids == ["b.png", "a.png"]
    assert train.captions == ["a bird", "a cat", "a bird, flying", "another cat"]
    assert train.caption_to_image.tolist() == [0, 1, 0, 1]
    assert train.labels.tolist() == [2, 1]
    assert train.image_paths == [tmp_path / "b.png", tmp_path / "a.png"]
    assert train.caption_ids == ["pairs.csv:2", "pairs.csv:3", "pairs.csv:4", "pairs.csv:6"]

    test = read_pairs(path, "test", image_root=tmp_path / "imgs")
    assert test.image_ids == ["c.png"] and test.labels is None  # no row of this split carries a label
    assert test.image_paths == [tmp_path / "imgs" / "c.png"]

    everything = read_pairs(path)
    assert everything.num_images == 3 and everything.num_captions == 5

    with pytest.raises(DataError, match="no rows with split 'val'; splits present: test, train"):
        read_pairs(path, "val")


def test_pairs_jsonl_and_absolute_paths(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere" / "x.jpg"
    rows = [
        {"image": "sub/y.jpg", "caption": "why", "split": "dev"},
        {"image": str(absolute), "caption": "ex", "split": "val", "label": 4},
        {"image": "sub/y.jpg", "caption": "why again", "split": "val"},
    ]
    path = tmp_path / "data" / "pairs.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    corpus = read_pairs(path, "val")  # dev and val are one split
    assert corpus.image_ids == ["sub/y.jpg", str(absolute)]
    assert corpus.image_paths == [tmp_path / "data" / "sub" / "y.jpg", absolute]
    assert corpus.caption_to_image.tolist() == [0, 1, 0]
    assert corpus.labels.tolist() == [-1, 4]


def test_pairs_json_array(tmp_path: Path) -> None:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"image": "a.png", "caption": "x"}, {"image": "a.png", "caption": ""}]))
    with pytest.raises(DataError, match="entry 2: empty caption"):
        read_pairs(path)


def test_pairs_split_requested_without_split_column(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "p.csv", ["image,caption", "a.png,x"])
    assert read_pairs(path).num_captions == 1
    with pytest.raises(DataError, match="no 'split' column"):
        read_pairs(path, "train")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        '{"image": "a.png", "caption": "x"}\n{"image": "b.png", "caption": "y", "split": "train"}\n'
    )
    with pytest.raises(DataError, match=r"p\.jsonl:1: no split value"):
        read_pairs(jsonl, "train")


def test_pairs_malformed(tmp_path: Path) -> None:
    missing = _write_csv(tmp_path / "m.csv", ["image,text", "a.png,x"])
    with pytest.raises(DataError, match=r"m\.csv:1: header has no 'caption' column"):
        read_pairs(missing)
    empty = _write_csv(tmp_path / "e.csv", ["image,caption", "a.png,x", "", "b.png,  "])
    with pytest.raises(DataError, match=r"e\.csv:4: empty caption"):
        read_pairs(empty)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"image": "a.png", "caption": "x"}\n{"image": "b.png", "caption": \n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: not valid JSON"):
        read_pairs(bad)
    no_key = tmp_path / "k.jsonl"
    no_key.write_text('{"image": "a.png"}\n')
    with pytest.raises(DataError, match=r"k\.jsonl:1: missing 'caption'"):
        read_pairs(no_key)
    label = _write_csv(tmp_path / "l.csv", ["image,caption,label", "a.png,x,1", "a.png,y,one"])
    with pytest.raises(DataError, match=r"l\.csv:3: label must be an integer"):
        read_pairs(label)
    with pytest.raises(DataError, match="unknown pairs file type '.txt'"):
        read_pairs(_write_csv(tmp_path / "p.txt", ["image,caption"]))


def test_pairs_inconsistent_label_names_lines(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "p.csv", ["image,caption,label", "a.png,x,1", "b.png,z,0", "a.png,y,2"])
    with pytest.raises(DataError) as err:
        read_pairs(path)
    message = str(err.value)
    assert "'a.png'" in message and "line 2" in message and "line 4" in message


def test_pairs_multiline_csv_record_line_numbers(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "p.csv", ["image,caption", 'a.png,"two', 'lines"', "b.png,", "c.png,z"])
    with pytest.raises(DataError, match=r"p\.csv:4: empty caption"):
        read_pairs(path)


def test_pairs_cross_split_image_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write_csv(tmp_path / "p.csv", ["image,caption,split", "a.png,x,train", "a.png,y,test"])
    with caplog.at_level(logging.WARNING, logger="vsekit.data.pairs"):
        read_pairs(path, "train")
    assert "more than one split" in caplog.text


# ---------------------------------------------------------------- check_images / select_images


def _image_corpus(tmp_path: Path) -> Path:
    """Pairs file with 4 images (the second and fourth are broken) and 7 captions."""
    Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / "ok0.png")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image")
    Image.new("L", (5, 5), 128).save(tmp_path / "ok2.jpg")
    rows = [
        "image,caption,label",
        "ok0.png,zero a,0",
        "garbage.jpg,one a,1",
        "ok2.jpg,two a,2",
        "gone.png,three a,3",
        "ok0.png,zero b,0",
        "ok2.jpg,two b,2",
        "gone.png,three b,3",
    ]
    return _write_csv(tmp_path / "pairs.csv", rows)


def test_check_images_default_raises_naming_file(tmp_path: Path) -> None:
    corpus = read_pairs(_image_corpus(tmp_path))
    with pytest.raises(DataError) as err:
        check_images(corpus)
    message = str(err.value)
    assert "2 of 4 images" in message and "garbage.jpg" in message and "gone.png" in message


def test_check_images_skip_mode_remaps(tmp_path: Path) -> None:
    corpus = read_pairs(_image_corpus(tmp_path))
    messages: list[str] = []
    kept = check_images(corpus, skip_missing=True, log=messages.append)
    assert kept.image_ids == ["ok0.png", "ok2.jpg"]
    assert kept.captions == ["zero a", "two a", "zero b", "two b"]
    assert kept.caption_to_image.tolist() == [0, 1, 0, 1]
    assert kept.labels.tolist() == [0, 2]
    assert kept.caption_ids == ["pairs.csv:2", "pairs.csv:4", "pairs.csv:6", "pairs.csv:7"]
    assert kept.meta["dropped_images"] == 2 and kept.meta["dropped_captions"] == 3
    assert len(messages) == 1 and "2 of 4" in messages[0] and "gone.png" in messages[0]
    assert corpus.num_images == 4  # the input is not modified
    assert check_images(kept) is kept


def test_check_images_many_files_threaded(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    rows = ["image,caption"]
    for i in range(1100):  # more than one chunk of work, so the thread pool is used
        if i != 777:
            (tmp_path / f"{i}.png").write_bytes(buffer.getvalue())
        rows.append(f"{i}.png,caption {i}")
    corpus = read_pairs(_write_csv(tmp_path / "many.csv", rows))
    with pytest.raises(DataError, match=r"1 of 1100 images .*777\.png"):
        check_images(corpus, num_threads=4)
    kept = check_images(corpus, skip_missing=True, log=lambda _: None)
    assert kept.num_images == 1099 and "777.png" not in kept.image_ids
    assert kept.caption_to_image.tolist() == list(range(1099))


def test_select_images_keeps_memmap_prefix(tmp_path: Path) -> None:
    _write_precomp(tmp_path, "train", (4, 3), [f"c{j}" for j in range(8)])
    corpus = read_precomp(tmp_path, "train")
    prefix = select_images(corpus, np.array([True, True, False, False]))
    assert isinstance(prefix.features, np.memmap) and prefix.num_captions == 4
    picked = select_images(corpus, np.array([False, True, False, True]))
    np.testing.assert_array_equal(picked.features, np.asarray(corpus.features)[[1, 3]])
    assert picked.caption_to_image.tolist() == [0, 0, 1, 1]
    assert picked.captions == ["c2", "c3", "c6", "c7"]


# ---------------------------------------------------------------- load_corpus


def test_load_corpus_dispatch(tmp_path: Path) -> None:
    data = _karpathy_data()
    for entry in data["images"]:
        target = tmp_path / entry["filepath"] / entry["filename"]
        target.parent.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(target)
    path = _write_json(tmp_path, data)
    spec = {"format": "karpathy", "path": str(path), "image_root": str(tmp_path), "restval_into_train": True}
    assert load_corpus(spec, "train").num_images == 3
    assert load_corpus({**spec, "max_images": 1}, "train").num_images == 1

    _write_precomp(tmp_path / "pre", "dev", (3, 2), [f"c{j}" for j in range(15)])
    pre = load_corpus({"format": "precomp", "path": str(tmp_path / "pre"), "max_images": 2}, "val")
    assert pre.num_images == 2 and pre.num_captions == 10

    pairs_spec = {"format": "pairs", "path": str(_image_corpus(tmp_path))}
    with pytest.raises(DataError, match="no 'split' column"):
        load_corpus(pairs_spec, "train")
    # a file without split column is used whole only when the spec says so
    pairs_spec["split"] = None
    assert load_corpus({**pairs_spec, "skip_missing_images": True}, "train").num_images == 2
    with pytest.raises(DataError, match="2 of 4 images"):
        load_corpus(pairs_spec, "train")
    assert load_corpus({**pairs_spec, "check_images": False}, "val").num_images == 4
    first = load_corpus({**pairs_spec, "max_images": 1}, "test")
    assert first.image_ids == ["ok0.png"] and first.num_captions == 2


def test_load_corpus_unknown_format_and_missing_path() -> None:
    with pytest.raises(ConfigError) as err:
        load_corpus({"format": "webdataset"}, "train")
    assert "'webdataset'" in str(err.value)
    for fmt in source_names():
        assert fmt in str(err.value)
    with pytest.raises(ConfigError, match="^data.path: required"):
        load_corpus({"format": "karpathy"}, "train")
    with pytest.raises(ConfigError, match="^data.restval_into_train: unknown key"):  # not a precomp option
        load_corpus({"format": "precomp", "path": "x", "restval_into_train": True}, "train")


def test_load_corpus_demo_imports_builder_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "demo"
    (folder / "images").mkdir(parents=True)
    images = []
    for i, split in enumerate(["train", "train", "val"]):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / "images" / f"{i}.png")
        images.append(
            {
                "filepath": "images",
                "filename": f"{i}.png",
                "split": split,
                "imgid": i,
                "label": i,
                "sentences": [{"raw": f"red {i}", "sentid": i}],
            }
        )
    json_path = _write_json(folder, {"images": images, "dataset": "demo"}, "dataset_demo.json")
    calls: list[dict] = []

    def fake_build_demo(root=None, *, num_images=3000, seed=0, image_size=64):
        calls.append({"root": root, "num_images": num_images, "seed": seed, "image_size": image_size})
        return json_path

    fake = types.ModuleType("vsekit.data.demo")
    fake.build_demo = fake_build_demo
    monkeypatch.setitem(sys.modules, "vsekit.data.demo", fake)
    corpus = load_corpus({"format": "demo", "root": str(tmp_path), "num_images": 10, "seed": 5}, "train")
    assert calls == [{"root": str(tmp_path), "num_images": 10, "seed": 5, "image_size": 64}]
    assert corpus.image_ids == ["0", "1"] and corpus.labels.tolist() == [0, 1]
    assert corpus.image_paths[0] == folder / "images" / "0.png"
    assert load_corpus({"format": "demo"}, "dev").num_images == 1


def test_sources_module_does_not_import_demo() -> None:
    import vsekit.data.sources.demo as load_module

    source = Path(load_module.__file__).read_text()
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not any("demo" in line for line in top_level)
