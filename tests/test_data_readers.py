"""Karpathy / precomp / pairs readers and ``load_split`` dispatch, on tiny files generated in tmp_path."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vsekit.data.checks import check_images, select_images
from vsekit.data.corpus import DataError
from vsekit.data.formats.karpathy import read_karpathy
from vsekit.data.formats.pairs import read_pairs
from vsekit.data.formats.precomp import read_precomp
from vsekit.data.sources import load_split, source_names
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


def test_pairs_without_split_column_error_names_real_options(tmp_path: Path) -> None:
    from vsekit.data.formats.pairs import NoSplitColumn

    path = _write_csv(tmp_path / "p.csv", ["image,caption", "a.png,x"])
    with pytest.raises(NoSplitColumn) as err:
        read_pairs(path, "test")
    assert "--split all" in str(err.value) and "data.split: null" in str(err.value)
    assert "split=None" not in str(err.value)


def test_invisible_and_control_characters_in_captions(tmp_path: Path) -> None:
    """Zero-width / format characters are dropped and control characters read as spaces, in pairs files and
    caption-line files; a caption of nothing else is an empty caption, named by its line."""
    path = tmp_path / "p.jsonl"
    rows = [{"image": "a.png", "caption": "a d\u200bog\u202e on\x07grass\ufeff"},
            {"image": "b.png", "caption": "\u200b\u200c\u200d\u2060\ufeff\x00\x1b"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n")
    assert read_pairs(path).captions == ["a dog on grass"]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:2: empty caption \(only invisible or control characters\)"):
        read_pairs(path)
    _write_precomp(tmp_path, "train", (2, 3), ["one", "tw\u200bo", "\u200b\u2063", "four"])
    with pytest.raises(DataError, match=r"train_caps\.txt:3: empty caption line \(only invisible"):
        read_precomp(tmp_path, "train")
    _write_precomp(tmp_path, "train", (2, 3), ["one", "tw\u200bo", "th\x1bree", "four"])
    assert read_precomp(tmp_path, "train").captions == ["one", "two", "th ree", "four"]


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


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_pairs_line_longer_than_the_bound_is_refused_before_it_is_parsed(tmp_path: Path, suffix: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An 85 MB CSV line of short fields held 2.9 GB as a list before its field count was checked; a JSON line
    of 3M keys 1.2 GB. Now a line past textio.MAX_LINE_CHARS is refused while it is read."""
    import vsekit.data.textio as textio

    sep = "\t" if suffix == ".tsv" else ","
    wide = sep.join(["ab"] * (textio.MAX_LINE_CHARS // 3 + 2))
    if suffix == ".jsonl":
        body = '{"image": "a.png", "caption": "ok"}\n{"image": "b.png", "caption": "' + "x" * textio.MAX_LINE_CHARS + '"}\n'
    else:
        body = f"image{sep}caption\na.png{sep}ok\n{wide}\n"
    path = tmp_path / f"pairs{suffix}"
    path.write_text(body)
    parsed = []
    real = json.loads
    monkeypatch.setattr(json, "loads", lambda text, *a, **k: parsed.append(len(text)) or real(text, *a, **k))
    line = 2 if suffix == ".jsonl" else 3
    with pytest.raises(DataError, match=rf"pairs\{suffix}:{line}: line longer than {textio.MAX_LINE_CHARS:,} characters"):
        read_pairs(path)
    assert max(parsed, default=0) < 100  # the long JSON line never reached the parser
    ok = tmp_path / f"ok{suffix}"  # a line just under the bound is read
    caption = "y" * (textio.MAX_LINE_CHARS - 200 if suffix == ".jsonl" else 100_000)  # csv's own field limit: 128K
    ok.write_text('{"image": "a.png", "caption": "' + caption + '"}\n' if suffix == ".jsonl"
                  else f"image{sep}caption\na.png{sep}{caption}\n")
    assert read_pairs(ok, image_root=tmp_path).num_captions == 1


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


# ---------------------------------------------------------------- load_split


def test_load_split_dispatch(tmp_path: Path) -> None:
    data = _karpathy_data()
    for entry in data["images"]:
        target = tmp_path / entry["filepath"] / entry["filename"]
        target.parent.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(target)
    path = _write_json(tmp_path, data)
    spec = {"format": "karpathy", "path": str(path), "image_root": str(tmp_path), "restval_into_train": True}
    assert load_split(spec, "train").num_images == 3
    assert load_split({**spec, "max_images": 1}, "train").num_images == 1

    _write_precomp(tmp_path / "pre", "dev", (3, 2), [f"c{j}" for j in range(15)])
    pre = load_split({"format": "precomp", "path": str(tmp_path / "pre"), "max_images": 2}, "val")
    assert pre.num_images == 2 and pre.num_captions == 10

    pairs_spec = {"format": "pairs", "path": str(_image_corpus(tmp_path))}
    with pytest.raises(DataError, match="no 'split' column"):
        load_split(pairs_spec, "train")
    # a file without split column is used whole only when the spec says so
    pairs_spec["split"] = None
    assert load_split({**pairs_spec, "skip_missing_images": True}, "train").num_images == 2
    with pytest.raises(DataError, match="2 of 4 images"):
        load_split(pairs_spec, "train")
    assert load_split({**pairs_spec, "check_images": False}, "val").num_images == 4
    first = load_split({**pairs_spec, "max_images": 1}, "test")
    assert first.image_ids == ["ok0.png"] and first.num_captions == 2


def test_load_split_unknown_format_and_missing_path() -> None:
    with pytest.raises(ConfigError) as err:
        load_split({"format": "webdataset"}, "train")
    assert "'webdataset'" in str(err.value)
    for fmt in source_names():
        assert fmt in str(err.value)
    with pytest.raises(ConfigError, match="^data.path: required"):
        load_split({"format": "karpathy"}, "train")
    with pytest.raises(ConfigError, match="^data.restval_into_train: unknown key"):  # not a precomp option
        load_split({"format": "precomp", "path": "x", "restval_into_train": True}, "train")


def test_load_split_demo_imports_builder_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
    corpus = load_split({"format": "demo", "root": str(tmp_path), "num_images": 10, "seed": 5}, "train")
    assert calls == [{"root": str(tmp_path), "num_images": 10, "seed": 5, "image_size": 64}]
    assert corpus.image_ids == ["0", "1"] and corpus.labels.tolist() == [0, 1]
    assert corpus.image_paths[0] == folder / "images" / "0.png"
    assert load_split({"format": "demo"}, "dev").num_images == 1


def test_sources_module_does_not_import_demo() -> None:
    import vsekit.data.formats.demo as load_module

    source = Path(load_module.__file__).read_text()
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not any("demo" in line for line in top_level)


# ---------------------------------------------------------------- errors point to the right place


def test_pairs_non_utf8_late_line_names_line_and_offset(tmp_path: Path) -> None:
    good = "a.png,a caption\n" * 14999
    csv_path = tmp_path / "late.csv"
    csv_path.write_bytes(b"image,caption\n" + good.encode() + b"b.png,caf\xe9\n" + b"c.png,x\n")
    offset = len(b"image,caption\n" + good.encode() + b"b.png,caf")
    with pytest.raises(DataError) as err:
        read_pairs(csv_path)
    message = str(err.value)
    assert message.startswith(f"{csv_path}:15001: not valid UTF-8")
    assert "byte 10 of the line" in message and f"file offset {offset}" in message and "0xe9" in message

    rows = '{"image": "a.png", "caption": "fine"}\n' * 15000
    jsonl = tmp_path / "late.jsonl"
    jsonl.write_bytes(rows.encode() + b'{"image": "b.png", "caption": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(jsonl))}:15001: not valid UTF-8 .*file offset {len(rows) + 31}\)"):
        read_pairs(jsonl)
    # lines are counted as text files count them, lone CR included; a byte-order mark is not data
    cr = tmp_path / "cr.csv"
    cr.write_bytes(b"\xef\xbb\xbfimage,caption\r\na.png,x\rb.png,\xff\n")
    with pytest.raises(DataError, match=r"cr\.csv:3: not valid UTF-8 .*byte 7 of the line, file offset 32\)"):
        read_pairs(cr)


def test_pairs_json_array_and_karpathy_non_utf8_and_syntax_name_line(tmp_path: Path) -> None:
    array = tmp_path / "pairs.json"
    array.write_bytes(b'[\n{"image": "a.png", "caption": "x"},\n{"image": "b.png", "caption": "\xc3("}\n]\n')
    with pytest.raises(DataError, match=r"pairs\.json:3: not valid UTF-8 \(invalid continuation byte 0xc3"):
        read_pairs(array)
    array.write_text('[\n{"image": "a.png", "caption": "x"},\n{"image": "b.png" "caption": "y"}\n]\n')
    with pytest.raises(DataError, match=r"pairs\.json:3:19: not valid JSON \(Expecting ','"):
        read_pairs(array)

    path = tmp_path / "dataset_bad.json"
    path.write_bytes(json.dumps(_karpathy_data(), indent=1).replace("im3 caption 2", "im3 caption \udcff",
                                                                    ).encode("utf-8", "surrogateescape"))
    with pytest.raises(DataError, match=r"dataset_bad\.json:\d+: not valid UTF-8 \(invalid start byte 0xff"):
        read_karpathy(path, tmp_path, "test")
    path.write_text('{"images": [\n  {"filename": "a.jpg",\n   "split": "test" "sentences": []}\n]}')
    with pytest.raises(DataError, match=r"dataset_bad\.json:3:20: not valid JSON"):
        read_karpathy(path, tmp_path, "test")


@pytest.mark.parametrize("garbage", [b"1" * 5000, b"[" * 100000, b"\x00\x01\x02 garbage", b"{'image': 1}",
                                     b'"just a string"', b"NaN"],
                         ids=["huge-number", "deep-nesting", "control-bytes", "python-dict", "string", "nan"])
def test_pairs_jsonl_garbage_line_names_file_and_line(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "captions.jsonl"
    path.write_bytes(b'{"image": "a.png", "caption": "x"}\n\n' + garbage + b"\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: (not valid JSON|expected a JSON object)"):
        read_pairs(path)


def test_karpathy_garbage_and_hostile_entries_name_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "dataset_x.json"
    path.write_text('{"images": [' + "[" * 100000 + "]" * 100000 + "]}")
    with pytest.raises(DataError, match=r"dataset_x\.json: not valid JSON \(nested too deeply\)"):
        read_karpathy(path, tmp_path, "test")
    cases = [
        (lambda d: d["images"][3]["sentences"].__setitem__(1, "a plain string"), r"images\[3\]\.sentences\[1\] is not a JSON object"),
        (lambda d: d["images"][3]["sentences"][2].__setitem__("raw", 5), r"images\[3\]\.sentences\[2\]: 'raw' must be a string"),
        (lambda d: d["images"][3]["sentences"][0].update(raw=None, tokens="abc"), r"images\[3\]\.sentences\[0\]: 'tokens' must be a list"),
        (lambda d: d["images"][3].pop("filename"), r"images\[3\] has no 'filename'"),
        (lambda d: d["images"][3].__setitem__("filename", ["x.jpg"]), r"images\[3\] has no 'filename'"),
        (lambda d: d["images"][1].__setitem__("split", ["train"]), r"images\[1\] has unknown split \['train'\]"),
        (lambda d: d["images"][1].pop("split"), r"images\[1\] has no 'split' field"),
        (lambda d: d["images"].__setitem__(2, 7), r"images\[2\] is not a JSON object \(got a number\)"),
        (lambda d: d["images"][3].__setitem__("label", 2**70), r"images\[3\]: 'label' must be an integer"),
        (lambda d: d.__setitem__("dataset", {"name": "x"}), r"'dataset' must be a string"),
    ]
    for change, message in cases:
        data = _karpathy_data()
        change(data)
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: .*{message}"):
            read_karpathy(_write_json(tmp_path, data, path.name), tmp_path, "test")


def test_pairs_label_out_of_range_and_csv_errors_name_the_line(tmp_path: Path) -> None:
    label = _write_csv(tmp_path / "l.csv", ["image,caption,label", "a.png,x,1", f"b.png,y,{2**70}"])
    with pytest.raises(DataError, match=r"l\.csv:3: label 1180591620717411303424 is out of range"):
        read_pairs(label)
    huge = _write_csv(tmp_path / "h.csv", ["image,caption", "a.png,x", "b.png," + "y" * 200_000])
    with pytest.raises(DataError, match=r"h\.csv:3: malformed CSV \(field larger than field limit"):
        read_pairs(huge)
    twice = _write_csv(tmp_path / "t.csv", ["image,caption,caption", "a.png,x,y"])
    with pytest.raises(DataError, match=r"t\.csv:1: header names column 'caption' more than once"):
        read_pairs(twice)


def test_missing_image_error_names_the_row_that_lists_it(tmp_path: Path) -> None:
    path = _image_corpus(tmp_path)  # gone.png first named on line 5, garbage.jpg on line 3
    with pytest.raises(DataError) as err:
        check_images(read_pairs(path))
    message = str(err.value)
    assert f"{tmp_path / 'gone.png'} (file not found, named at {path}:5)" in message
    assert f"{tmp_path / 'garbage.jpg'} (not a recognised image, named at {path}:3)" in message
    logged: list[str] = []
    kept = check_images(read_pairs(path), skip_missing=True, log=logged.append)
    assert f"named at {path}:5" in logged[0]
    # the map follows the rows through a selection (max_images, skipping)
    first = select_images(read_pairs(path), np.array([False, False, False, True]))
    with pytest.raises(DataError, match=rf"gone\.png \(file not found, named at {re.escape(str(path))}:5\)"):
        check_images(first)
    assert kept.num_images == 2

    data = _karpathy_data()
    jpath = _write_json(tmp_path, data)
    with pytest.raises(DataError, match=r"img3\.jpg \(file not found, named at .*dataset_tiny\.json: images\[3\]\)"):
        check_images(read_karpathy(jpath, tmp_path, "test"))


# ---------------------------------------------------------------- check_images: "decode"


def _truncated_png(path: Path) -> None:
    """A PNG whose header is intact but whose pixel data is cut: ``Image.open`` works, decoding fails."""
    noise = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _truncated_corpus(tmp_path: Path) -> Path:
    for i in range(3):
        Image.new("RGB", (6, 4), (i, 0, 0)).save(tmp_path / f"ok{i}.png")
    _truncated_png(tmp_path / "cut.png")
    rows = ["image,caption", "ok0.png,zero", "cut.png,cut a", "ok1.png,one", "cut.png,cut b", "ok2.png,two"]
    return _write_csv(tmp_path / "pairs.csv", rows)


def test_check_images_decode_catches_truncated_png(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _truncated_corpus(tmp_path)
    corpus = read_pairs(path)
    assert check_images(corpus) is corpus  # the header scan passes it: this is what stopped training
    with pytest.raises(DataError) as err:
        check_images(corpus, decode=True)
    message = str(err.value)
    assert "1 of 4 images are missing or undecodable" in message
    assert f"{tmp_path / 'cut.png'} (cannot decode: " in message and f"named at {path}:3" in message
    logged: list[str] = []
    with caplog.at_level(logging.INFO, logger="vsekit.data.checks"):
        kept = check_images(corpus, skip_missing=True, decode=True, log=logged.append)
    assert kept.image_ids == ["ok0.png", "ok1.png", "ok2.png"] and kept.captions == ["zero", "one", "two"]
    assert kept.meta["dropped_images"] == 1 and kept.meta["dropped_captions"] == 2
    assert len(logged) == 1 and "skipping 1 of 4 images that are missing or undecodable" in logged[0]
    assert "decoded 4 images in" in caplog.text and "1 cannot be decoded" in caplog.text


def test_check_images_decode_threaded(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    rows = ["image,caption"]
    for i in range(300):  # several chunks of decode work
        (tmp_path / f"{i}.png").write_bytes(buffer.getvalue())
        rows.append(f"{i}.png,caption {i}")
    _truncated_png(tmp_path / "123.png")
    corpus = read_pairs(_write_csv(tmp_path / "many.csv", rows))
    assert check_images(corpus, num_threads=4) is corpus
    with pytest.raises(DataError, match=r"1 of 300 images .*123\.png \(cannot decode.*many\.csv:125\)"):
        check_images(corpus, decode=True, num_threads=4)


def test_load_split_check_images_decode_option(tmp_path: Path) -> None:
    spec = {"format": "pairs", "path": str(_truncated_corpus(tmp_path)), "split": None}
    assert load_split(spec, "train").num_images == 4  # headers only (true, the default)
    with pytest.raises(DataError, match="1 of 4 images are missing or undecodable"):
        load_split({**spec, "check_images": "decode"}, "train")
    assert load_split({**spec, "check_images": "decode", "skip_missing_images": True}, "train").num_images == 3
    assert load_split({**spec, "check_images": False}, "train").num_images == 4
    with pytest.raises(ConfigError, match=r"^data\.check_images: .*\"decode\""):
        load_split({**spec, "check_images": "full"}, "train")


# ---------------------------------------------------------------- precomp: NaN/inf, encodings


def test_precomp_nan_and_inf_rows_are_named(tmp_path: Path) -> None:
    from vsekit.data.formats import precomp

    feats = _write_precomp(tmp_path, "train", (6, 3, 4), [f"c{j}" for j in range(12)])
    feats[4, 1, 2] = np.nan
    feats[4, 2, 0] = np.inf
    feats[5, 0, 0] = -np.inf
    np.save(tmp_path / "train_ims.npy", feats)
    with pytest.raises(DataError) as err:
        read_precomp(tmp_path, "train")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'train_ims.npy'}: row 4 (the image of train_caps.txt lines 9-10)")
    assert "1 NaN and 1 inf of its 12 values" in message and "first non-finite row" in message
    assert read_precomp(tmp_path, "train", max_images=4).num_images == 4  # the bad rows are not read
    # small chunks: the bad row is found in a later chunk, and the result is remembered for the file
    precomp._FINITE.clear()
    old = precomp._CHUNK_BYTES
    try:
        precomp._CHUNK_BYTES = 3 * 4 * 4
        read_precomp(tmp_path, "train", max_images=2)
        assert list(precomp._FINITE.values()) == [(2, None)]
        with pytest.raises(DataError, match=r"row 4 "):
            read_precomp(tmp_path, "train")
        assert list(precomp._FINITE.values()) == [(4, 4)]
    finally:
        precomp._CHUNK_BYTES = old
    # float16 features whose sum overflows are not mistaken for inf
    np.save(tmp_path / "train_ims.npy", np.full((6, 3, 4), 60000, dtype=np.float16))
    assert read_precomp(tmp_path, "train").num_images == 6


def test_precomp_hostile_files_name_the_file(tmp_path: Path) -> None:
    _write_precomp(tmp_path, "train", (2, 3), ["one", "two"])
    (tmp_path / "train_caps.txt").write_bytes(b"one\ntw\xf0\x28o\n")
    with pytest.raises(DataError, match=r"train_caps\.txt:2: not valid UTF-8 .*byte 3 of the line, file offset 6\)"):
        read_precomp(tmp_path, "train")
    (tmp_path / "train_caps.txt").write_bytes(b"\xef\xbb\xbfone\ntwo\n")
    assert read_precomp(tmp_path, "train").captions == ["one", "two"]  # a byte-order mark is not a caption
    for content, message in [(b"", "is empty"), (b"PK\x03\x04 zip", "is not a .npy file"),
                             (b"\x93NUMPY\x01\x00garbage", "cannot memory-map")]:
        (tmp_path / "train_ims.npy").write_bytes(content)
        with pytest.raises(DataError, match=rf"train_ims\.npy: {re.escape(message)}"):
            read_precomp(tmp_path, "train")
    for array, message in [(np.zeros((2, 3), dtype=bool), "dtype bool"), (np.zeros((2, 0)), "rows are empty"),
                           (np.zeros((2, 3), dtype=np.complex64), "dtype complex64")]:
        np.save(tmp_path / "train_ims.npy", array)
        with pytest.raises(DataError, match=rf"train_ims\.npy: .*{message}"):
            read_precomp(tmp_path, "train")
