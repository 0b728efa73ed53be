"""Search indexes: build/search round trip on the demo set, incremental add == fresh build, removal,
refusal of a foreign checkpoint, crash safety of writes, approximate kinds, order-similarity models."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from vsekit.checkpoint import load_checkpoint, save_checkpoint
from vsekit.cli import main
from vsekit.data.images import load_rgb
from vsekit.index import (
    AnnParams,
    IndexMismatchError,
    SearchIndex,
    SearchIndexError,
    build_index,
    corpus_from_folder,
    generations,
    read_manifest,
)
from vsekit.index.backends.faiss import build_faiss
from vsekit.index.backends.numpy import exact_top_k, recall_at_k
from vsekit.inference import Embedder

INDEX_IMAGES = 8  # images of the demo index (the test model tells them apart: conftest.py)


def cli(*argv: str) -> int:
    return main([str(a) for a in argv])


def png_of_size(width: int, height: int) -> bytes:
    """A valid black 8-bit greyscale PNG of ``width`` x ``height`` pixels, streamed through zlib: a 100000 x 1
    image takes a few hundred bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def build_demo_index(ckpt: Path, out: Path, *extra: str, max_images: int = INDEX_IMAGES) -> Path:
    rc = cli("index", "build", ckpt, "--data", "demo", "--split", "train", "--max-images", max_images,
             "--out", out, "-q", *extra)
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def demo_index(ckpt, tmp_path_factory) -> Path:
    return build_demo_index(ckpt, tmp_path_factory.mktemp("ix") / "demo")


@pytest.fixture(scope="module")
def hnsw_index(ckpt, tmp_path_factory) -> Path:
    """An index with FAISS files (the approximate kinds have them)."""
    return build_demo_index(ckpt, tmp_path_factory.mktemp("ix") / "hnsw", "--kind", "hnsw")


def index_holding(name: str, demo_index: Path, hnsw_index: Path) -> Path:
    return hnsw_index if name.endswith(".faiss") else demo_index


@pytest.fixture(scope="module")
def sx(demo_index, emb) -> SearchIndex:
    return SearchIndex.open(demo_index, emb)


def copy_index(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def snapshot(index_dir: Path) -> dict:
    """Everything a reader sees: manifest, vectors and records of the current generation."""
    m = read_manifest(index_dir)
    d = generations.load_data(index_dir, m, mmap=False)
    return {"manifest": m, "images": d.images, "captions": d.captions, "iv": d.image_vectors.copy(),
            "cv": None if d.caption_vectors is None else d.caption_vectors.copy()}


def assert_same(a: dict, b: dict) -> None:
    assert a["manifest"] == b["manifest"] and a["images"] == b["images"] and a["captions"] == b["captions"]
    np.testing.assert_array_equal(a["iv"], b["iv"])
    np.testing.assert_array_equal(a["cv"], b["cv"])


# -- build and search ----------------------------------------------------------------------------------------
def test_build_writes_manifest_embeddings_and_metadata(demo_index, emb):
    m = read_manifest(demo_index)
    assert m["format"] == "vsekit-index" and m["version"] == 1
    assert m["fingerprint"] == emb.fingerprint and m["similarity"] == "cosine" and m["kind"] == "exact"
    assert m["backend"] == "local"
    assert Path(m["checkpoint"]) == Path(emb.checkpoint_path).resolve()
    assert m["num_images"] == INDEX_IMAGES and m["num_captions"] == 5 * INDEX_IMAGES and m["dim"] == 128
    gen = demo_index / m["generation"]
    # an exact index is searched on its .npy files: no FAISS file (a second copy of the vectors)
    assert {p.name for p in gen.iterdir()} == {f"{t}.{ext}" for t in ("images", "captions")
                                              for ext in ("npy", "jsonl")} | {"images.thumbs", "images.thumbs.npy"}
    iv = np.load(gen / "images.npy")
    assert iv.dtype == np.float32 and iv.shape == (INDEX_IMAGES, 128)
    np.testing.assert_allclose(np.linalg.norm(iv, axis=1), 1.0, atol=1e-4)
    recs = [json.loads(line) for line in (gen / "images.jsonl").read_text().splitlines()]
    assert all(Path(r["path"]).is_absolute() and Path(r["path"]).is_file() and len(r["captions"]) == 5 for r in recs)
    caps = [json.loads(line) for line in (gen / "captions.jsonl").read_text().splitlines()]
    assert caps[0] == {"id": f"{recs[0]['id']}#0", "text": recs[0]["captions"][0], "image": recs[0]["id"]}


def test_each_caption_finds_its_own_image(sx):
    """The round trip: captions of the indexed images, searched as text queries, find their image."""
    first = top3 = 0
    for cap in sx.data.captions:
        hits = sx.search_text(cap["text"], k=3)
        ids = [h.image_id for h in hits]
        first += ids[0] == cap["image"]
        top3 += cap["image"] in ids
    n = len(sx.data.captions)
    assert first / n >= 0.7, f"own image first for only {first}/{n} captions"  # chance: 1/8
    assert top3 / n >= 0.9, f"own image in the top 3 for only {top3}/{n} captions"  # chance: 3/8


def test_search_scores_equal_brute_force_model_scores(sx, emb):
    q = emb.encode_texts(["a purple disc above a large purple disc"])
    want = (q @ np.asarray(sx.data.image_vectors).T)[0]
    hits = sx.search_text("a purple disc above a large purple disc", k=INDEX_IMAGES)
    assert [h.rank for h in hits] == list(range(1, INDEX_IMAGES + 1))
    np.testing.assert_allclose([h.score for h in hits], np.sort(want)[::-1], rtol=1e-5, atol=1e-5)
    assert sx.search_text("a red star", k=100)[-1].rank == INDEX_IMAGES  # k > N: all images


def test_image_search_image_to_text_and_image_to_image(sx):
    rec = sx.data.images[3]
    same = sx.search_image(rec["path"], k=2, target="images")
    assert same[0].id == rec["id"] and same[0].score == pytest.approx(1.0, abs=1e-4)
    caps = sx.search_image(rec["path"], k=5)  # default target: captions
    assert len(caps) == 5 and all(h.target == "captions" and h.text for h in caps)
    assert all(h.image_id == h.id.split("#")[0] and h.path for h in caps)
    with pytest.raises(SearchIndexError, match="target must be one of"):
        sx.search_image(rec["path"], target="videos")
    with pytest.raises(SearchIndexError, match="empty"):
        sx.search_text("   ")


def test_cli_search_prints_rank_score_and_path(demo_index, sx, capsys):
    assert cli("search", demo_index, sx.data.captions[0]["text"], "-k", "3") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].split()[0] == "1"
    assert float(lines[0].split()[1]) >= float(lines[1].split()[1])
    assert lines[0].split()[2].endswith(".png")
    assert cli("search", demo_index, "--image", sx.data.images[0]["path"], "-k", "2", "--json") == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2] and hits[0]["target"] == "captions"
    assert cli("search", demo_index) == 2 and "either a text query or --image" in capsys.readouterr().err


# -- incremental updates -------------------------------------------------------------------------------------
def test_incremental_add_equals_fresh_build(ckpt, emb, tmp_path, capsys):
    grown = build_demo_index(ckpt, tmp_path / "grown", max_images=4)
    capsys.readouterr()
    assert cli("index", "add", grown, "--data", "demo", "--split", "train", "--max-images", INDEX_IMAGES, "-q") == 0
    assert "added 4 images (4 already in the index)" in capsys.readouterr().out
    fresh = build_demo_index(ckpt, tmp_path / "fresh")
    a, b = SearchIndex.open(grown, emb), SearchIndex.open(fresh, emb)
    assert sorted(r["id"] for r in a.data.images) == sorted(r["id"] for r in b.data.images)
    for target in ("images", "captions"):
        rows_a = {r["id"]: i for i, r in enumerate(a.data.records(target))}
        rows_b = {r["id"]: i for i, r in enumerate(b.data.records(target))}
        assert rows_a.keys() == rows_b.keys()
        ids = sorted(rows_a)
        np.testing.assert_allclose(a.data.vectors(target)[[rows_a[i] for i in ids]],
                                   b.data.vectors(target)[[rows_b[i] for i in ids]], atol=1e-5)
    for query in ("a red circle left of a square", "two blue shapes", b.data.captions[7]["text"]):
        ha, hb = a.search_text(query, k=5), b.search_text(query, k=5)
        assert [h.id for h in ha] == [h.id for h in hb]
        np.testing.assert_allclose([h.score for h in ha], [h.score for h in hb], atol=1e-5)
    path = b.data.images[5]["path"]
    assert [h.id for h in a.search_image(path, k=6)] == [h.id for h in b.search_image(path, k=6)]


def test_add_encodes_only_new_files_and_skips_duplicates(emb, ckpt, demo_index, tmp_path, monkeypatch, capsys):
    demo = [Path(r["path"]) for r in snapshot(demo_index)["images"]]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    for p in demo[:4]:
        shutil.copy(p, one / p.name)
    for p in demo[2:7]:  # 2 of the same names as in one/, but different files
        shutil.copy(p, two / p.name)
    assert cli("index", "build", ckpt, "--images", one, "--out", tmp_path / "ix", "-q") == 0

    encoded = []
    real = Embedder.encode_images

    def spy(self, corpus, *a, rows=None, **kw):
        encoded.extend(corpus.image_paths[r].name for r in (rows if rows is not None else range(corpus.num_images)))
        return real(self, corpus, *a, rows=rows, **kw)

    monkeypatch.setattr(Embedder, "encode_images", spy)
    capsys.readouterr()
    assert cli("index", "add", tmp_path / "ix", "--images", two, "-q") == 0
    assert len(encoded) == 5 and "added 5 images (0 already" in capsys.readouterr().out
    encoded.clear()
    assert cli("index", "add", tmp_path / "ix", "--images", one, "-q") == 0
    assert encoded == [] and "added 0 images (4 already" in capsys.readouterr().out
    ids = [r["id"] for r in SearchIndex.open(tmp_path / "ix", emb).data.images]
    assert len(ids) == len(set(ids)) == 9
    assert {f"{demo[2].name}~2", f"{demo[3].name}~2"} <= set(ids)


def test_remove_by_id_and_by_path(demo_index, emb, tmp_path, capsys):
    ix = copy_index(demo_index, tmp_path / "ix")
    before = SearchIndex.open(ix, emb)
    gone_id, gone_path = before.data.images[0]["id"], before.data.images[1]["path"]
    gone = {gone_id, before.data.images[1]["id"]}
    assert cli("index", "remove", ix, "--ids", gone_id, "--paths", gone_path) == 0
    after = SearchIndex.open(ix, emb)
    assert after.num_images == INDEX_IMAGES - 2 and after.num_captions == 5 * (INDEX_IMAGES - 2)
    assert not gone & {r["id"] for r in after.data.images} and not gone & {c["image"] for c in after.data.captions}
    hits = after.search_text(before.data.captions[0]["text"], k=INDEX_IMAGES)
    assert len(hits) == INDEX_IMAGES - 2 and not gone & {h.id for h in hits}
    assert not gone & {h.image_id for h in after.search_image(before.data.images[0]["path"], k=50)}
    keep = {r["id"]: i for i, r in enumerate(before.data.images)}
    for i, r in enumerate(after.data.images):
        np.testing.assert_array_equal(after.data.image_vectors[i], before.data.image_vectors[keep[r["id"]]])
    snap = snapshot(ix)
    capsys.readouterr()
    assert cli("index", "remove", ix, "--ids", "no-such-id", after.data.images[0]["id"]) == 2
    assert "not in the index: no-such-id" in capsys.readouterr().err
    assert_same(snapshot(ix), snap)  # nothing removed


# -- refusals ------------------------------------------------------------------------------------------------
def foreign_checkpoint(ckpt: Path, out: Path, **config_changes) -> Path:
    state = load_checkpoint(ckpt)
    state.pop("path", None)
    if config_changes:
        state["config"] = {**state["config"], "model": {**state["config"]["model"], **config_changes}}
    else:
        name = next(k for k, v in state["model"].items() if v.is_floating_point())
        state["model"][name] = state["model"][name] + 0.01
    save_checkpoint(out, state)
    return out


def test_foreign_checkpoint_is_refused_naming_both_fingerprints(demo_index, ckpt, emb, tmp_path, capsys):
    other = foreign_checkpoint(ckpt, tmp_path / "other.pt")
    other_fp = Embedder.from_checkpoint(other).fingerprint
    assert other_fp != emb.fingerprint
    with pytest.raises(IndexMismatchError) as e:
        SearchIndex.open(demo_index, checkpoint=other)
    assert emb.fingerprint in str(e.value) and other_fp in str(e.value)
    ix = copy_index(demo_index, tmp_path / "ix")
    snap = snapshot(ix)
    rc = cli("index", "add", ix, "--data", "demo", "--split", "val", "--checkpoint", other, "-q")
    err = capsys.readouterr().err
    assert rc == 2 and emb.fingerprint in err and other_fp in err and "not comparable" in err
    assert cli("search", ix, "red", "--checkpoint", other) == 2
    assert_same(snapshot(ix), snap)


def test_build_refuses_to_overwrite_and_bad_sources(demo_index, ckpt, emb, tmp_path, capsys):
    assert cli("index", "build", ckpt, "--data", "demo", "--out", demo_index, "-q") == 2
    assert "already holds an index" in capsys.readouterr().err
    assert cli("index", "build", ckpt, "--images", tmp_path / "missing", "--out", tmp_path / "x") == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli("index", "build", ckpt, "--images", tmp_path / "empty", "--out", tmp_path / "x") == 2
    assert "no image files" in capsys.readouterr().err
    assert cli("search", tmp_path / "nowhere", "red") == 2
    assert "not a vsekit index" in capsys.readouterr().err
    precomp_model = Embedder.from_checkpoint(ckpt)
    precomp_model.feature_shape = [36, 2048]
    demo = generations.load_data(demo_index, read_manifest(demo_index))
    (tmp_path / "imgs").mkdir()
    shutil.copy(demo.images[0]["path"], tmp_path / "imgs" / "a.png")
    with pytest.raises(SearchIndexError, match="precomputed features; it cannot embed image files"):
        build_index(precomp_model, corpus_from_folder(tmp_path / "imgs"), tmp_path / "y")
    with pytest.raises(SearchIndexError, match="no captions to index"):
        build_index(emb, corpus_from_folder(tmp_path / "imgs"), tmp_path / "y", captions=True)


def test_folder_index_without_captions_refuses_image_to_text(ckpt, emb, demo_index, tmp_path):
    demo = generations.load_data(demo_index, read_manifest(demo_index))
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    shutil.copy(demo.images[0]["path"], tmp_path / "imgs" / "sub" / "a.png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG broken")
    assert cli("index", "build", ckpt, "--images", tmp_path / "imgs", "--out", tmp_path / "ix", "-q") == 0
    sx = SearchIndex.open(tmp_path / "ix", emb)
    assert [r["id"] for r in sx.data.images] == ["sub/a.png"]  # the broken file is skipped with a warning
    assert not sx.has_captions and sx.search_text("a red star", k=3)[0].id == "sub/a.png"
    with pytest.raises(SearchIndexError, match="holds no captions"):
        sx.search_image(demo.images[0]["path"])


def test_captions_with_no_known_word_are_not_indexed(ckpt, emb, demo_index, tmp_path, caplog):
    """A caption of only emoji or combining marks embeds to the model's answer to nothing, which every query
    found near: "red" ranked it (0.78) above the caption that says "red". Such a query is refused; such a
    caption is not indexed (one warning naming it), on build and on add."""
    demo = generations.load_data(demo_index, read_manifest(demo_index))
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image", "caption"])
        for rec, junk in zip(demo.images[:3], ["\U0001f600\U0001f600", "\u0301\u0301\u0301", "!!! ???"]):
            shutil.copy(rec["path"], tmp_path / Path(rec["path"]).name)
            out.writerow([Path(rec["path"]).name, rec["captions"][0]])
            out.writerow([Path(rec["path"]).name, junk])
    assert emb.known_words("\U0001f600\U0001f600") == 0 and emb.known_words(demo.images[0]["captions"][0]) > 0
    with caplog.at_level("WARNING", logger="vsekit.index.build"):
        assert cli("index", "build", ckpt, "--data", tmp_path / "pairs.csv", "--out", tmp_path / "ix", "-q") == 0
    assert "3 caption(s) with no word the model knows were not indexed" in caplog.text
    sx = SearchIndex.open(tmp_path / "ix", emb)
    assert sx.num_captions == 3 and all(emb.known_words(h.text) for h in sx.search_text("red", 10, "captions"))
    assert {h.id.rsplit("#", 1)[1] for h in sx.search_text("red", 10, "captions")} == {"0"}  # ids keep their k


def test_pairs_file_without_split_column_is_indexed_whole(ckpt, emb, demo_index, tmp_path, capsys):
    """--data of a pairs file without a split column: every row, by default and with --split all; a named
    split is refused with an error that names the real option."""
    demo = generations.load_data(demo_index, read_manifest(demo_index))
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image", "caption"])
        for rec in demo.images[:3]:
            shutil.copy(rec["path"], tmp_path / Path(rec["path"]).name)
            out.writerow([Path(rec["path"]).name, rec["captions"][0]])
    assert cli("index", "build", ckpt, "--data", tmp_path / "pairs.csv", "--out", tmp_path / "a", "-q") == 0
    assert read_manifest(tmp_path / "a")["num_images"] == 3
    assert cli("index", "build", ckpt, "--data", tmp_path / "pairs.csv", "--split", "all", "--out",
               tmp_path / "b", "-q") == 0
    assert read_manifest(tmp_path / "b")["num_images"] == 3
    capsys.readouterr()
    assert cli("index", "build", ckpt, "--data", tmp_path / "pairs.csv", "--split", "test", "--out",
               tmp_path / "c", "-q") == 2
    err = capsys.readouterr().err
    assert "no 'split' column" in err and "--split all" in err and "split=None" not in err
    assert err.count("\n") == 1
    assert cli("index", "build", ckpt, "--data", "demo", "--split", "all", "--out", tmp_path / "d", "-q") == 2
    assert "--split all reads every row of a pairs file" in capsys.readouterr().err


@pytest.mark.parametrize("query", ["!!!", "...?!", "\u200b\u200b\u200b", " \u200d\ufeff\u2060 ", "\x00\x01\x1f",
                                   "\u202e!", "qwzx vvvqz", "\u00ad-\u00ad"])
def test_a_query_without_known_words_is_refused(sx, query):
    from vsekit.index.search import NoKnownWordsError

    with pytest.raises(NoKnownWordsError, match="the query has no known words") as err:
        sx.search_text(query)
    assert err.value.status == 422
    assert sx.search_text("a red\u200b star!", k=1)  # a known word among them: searched


def test_no_known_words_is_one_cli_line_and_http_422(demo_index, sx, capsys):
    from fastapi.testclient import TestClient

    from vsekit.serve.app import create_app

    assert cli("search", demo_index, "?!") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the query has no known words" in err
    with TestClient(create_app(sx)) as c:
        r = c.get("/search", params={"q": "\u200b\u200b"})
        assert r.status_code == 422 and "no known words" in r.json()["error"]
        assert c.get("/search", params={"q": "a red star"}).status_code == 200


def test_invisible_and_control_characters_in_captions_at_index_time(emb, tmp_path):
    """Zero-width and control characters neither split a caption's words nor make a caption of their own."""
    from vsekit.data.corpus import DataError
    from vsekit.data.formats.pairs import read_pairs

    (tmp_path / "p.csv").write_text("image,caption\na.png,a red\u200b st\u200dar\x1b[2J\n")
    corpus = read_pairs(tmp_path / "p.csv")
    assert corpus.captions == ["a red star [2J"]  # the escape sequence cannot reach a terminal
    assert emb.tokenize("a red\u200b st\u200dar") == emb.tokenize("a red star")
    (tmp_path / "q.csv").write_text("image,caption\na.png,a red star\nb.png,\u200b\u200c\x00\n")
    with pytest.raises(DataError, match=r"q.csv:3: empty caption \(only invisible or control characters\)"):
        read_pairs(tmp_path / "q.csv")


# -- crash safety -------------------------------------------------------------------------------------------
def test_failed_write_leaves_the_old_index_intact(demo_index, emb, tmp_path, monkeypatch):
    from vsekit.index.build import remove_from_index

    ix = copy_index(demo_index, tmp_path / "ix")
    before = snapshot(ix)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(generations, "write_manifest", boom)
    with pytest.raises(OSError, match="disk full"):
        remove_from_index(ix, ids=[before["images"][0]["id"]])
    assert_same(snapshot(ix), before)
    assert sorted(p.name for p in ix.iterdir()) == sorted([".lock", "manifest.json", before["manifest"]["generation"]])


@pytest.mark.parametrize("where", ["mid_files", "before_manifest"])
def test_killed_write_leaves_the_old_index_intact(demo_index, ckpt, tmp_path, where):
    """A process killed (os._exit: no cleanup runs) in the middle of an add keeps the old index readable,
    and the next write removes what the dead one left behind."""
    ix = copy_index(demo_index, tmp_path / "ix")
    before = snapshot(ix)
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import pytest
        from test_index import cli
        from vsekit.index import generations
        if {where!r} == "mid_files":
            real = generations._save_jsonl
            def save_then_die(path, records):
                real(path, records[: len(records) // 2])
                os._exit(9)
            generations._save_jsonl = save_then_die
        else:
            generations.write_manifest = lambda *a, **k: os._exit(9)
        cli("index", "add", {str(ix)!r}, "--data", "demo", "--split", "val", "--max-images", "3", "-q")
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert len(list(ix.iterdir())) > 3  # the dead writer's leftovers are there...
    assert_same(snapshot(ix), before)  # ...but readers still see the old index
    emb = Embedder.from_checkpoint(ckpt)
    assert SearchIndex.open(ix, emb).search_text("a red star", k=3)
    assert cli("index", "add", ix, "--data", "demo", "--split", "val", "--max-images", "3", "-q") == 0
    m = read_manifest(ix)
    assert m["num_images"] == INDEX_IMAGES + 3
    assert sorted(p.name for p in ix.iterdir()) == sorted([".lock", "manifest.json", m["generation"]])


# -- approximate kinds, order similarity, exact top-k ------------------------------------------------------
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_reports_recall_against_exact(ckpt, emb, tmp_path, kind, capsys):
    out = tmp_path / kind
    assert cli("index", "build", ckpt, "--data", "demo", "--split", "train", "--out", out, "--kind", kind,
               "--nlist", "4", "--nprobe", "2", "-q") == 0
    printed = capsys.readouterr().out
    m = read_manifest(out)
    assert m["kind"] == kind and set(m["recall_at_10"]) == {"images", "captions"}
    assert all(0.0 < r <= 1.0 for r in m["recall_at_10"].values())
    assert f"images {m['recall_at_10']['images']:.3f}" in printed
    sx = SearchIndex.open(out, emb)
    exact = sx.search_vectors(sx.data.caption_vectors[:5], "captions", "images", 3)
    assert all(len(hits) == 3 for hits in exact)
    # removal rebuilds the approximate structure (IVF keeps its trained lists)
    assert cli("index", "remove", out, "--ids", sx.data.images[0]["id"]) == 0
    assert SearchIndex.open(out, emb).data.ann["images"].ntotal == sx.num_images - 1


def test_ann_recall_on_random_vectors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:100] + 0.1 * rng.standard_normal((100, 32)).astype(np.float32)
    full = build_faiss(x, "ivf", AnnParams(nlist=20, nprobe=20))
    assert recall_at_k(full.search, x, q) == 1.0  # every list scanned == exact
    assert recall_at_k(build_faiss(x, "ivf", AnnParams(nlist=20, nprobe=1)).search, x, q) < 1.0
    assert recall_at_k(build_faiss(x, "hnsw", AnnParams()).search, x, q) > 0.8
    assert recall_at_k(build_faiss(x, "exact", AnnParams()).search, x, q) == 1.0
    with pytest.raises(SearchIndexError, match="needs at least 50 vectors"):
        build_faiss(x[:10], "ivf", AnnParams(nlist=50))


def test_exact_top_k_chunked_equals_full_sort_with_ties():
    rng = np.random.default_rng(1)
    s = np.round(rng.standard_normal((7, 103)), 1).astype(np.float32)  # rounding makes ties
    scores, rows = exact_top_k(lambda a, b: s[:, a:b], 103, 10, chunk=16)
    order = np.lexsort((np.broadcast_to(np.arange(103), s.shape), -s), axis=-1)[:, :10]
    np.testing.assert_array_equal(rows, order)
    np.testing.assert_array_equal(scores, np.take_along_axis(s, order, 1))


def test_order_model_is_scored_exactly_and_refuses_faiss_kinds(ckpt, tmp_path, capsys):
    from vsekit.models.similarity import order_sim

    order_ckpt = foreign_checkpoint(ckpt, tmp_path / "order.pt", similarity="order")
    assert cli("index", "build", order_ckpt, "--data", "demo", "--split", "train", "--max-images", INDEX_IMAGES,
               "--out", tmp_path / "ivf", "--kind", "ivf", "-q") == 2
    assert "'order' similarity, which is not an inner product" in capsys.readouterr().err
    out = build_demo_index(order_ckpt, tmp_path / "order")
    m = read_manifest(out)
    assert m["similarity"] == "order" and not (out / m["generation"] / "images.faiss").exists()
    emb = Embedder.from_checkpoint(order_ckpt)
    sx = SearchIndex.open(out, emb)
    q = emb.encode_texts(["a big yellow triangle"])
    want = order_sim(torch.from_numpy(np.array(sx.data.image_vectors)), torch.from_numpy(q))[:, 0].numpy()
    hits = sx.search_text("a big yellow triangle", k=INDEX_IMAGES)
    np.testing.assert_allclose([h.score for h in hits], np.sort(want)[::-1], rtol=1e-5, atol=1e-6)
    assert [sx.data.images[i]["id"] for i in np.argsort(-want, kind="stable")] == [h.id for h in hits]
    with torch.no_grad():
        img = emb.model.encode_images(emb.eval_transform()(load_rgb(hits[0].path))[None]).numpy()
    want_t = order_sim(torch.from_numpy(img), torch.from_numpy(np.array(sx.data.caption_vectors)))[0].numpy()
    got = sx.search_image(hits[0].path, k=4)
    np.testing.assert_allclose([h.score for h in got], np.sort(want_t)[::-1][:4], rtol=1e-5, atol=1e-6)
    # same weights, other similarity: refused even though the fingerprints agree
    with pytest.raises(IndexMismatchError, match="similarity"):
        SearchIndex.open(out, checkpoint=ckpt)


def test_index_info_and_size_parsing(demo_index, capsys):
    from vsekit.cli.common import parse_size

    assert cli("index", "info", demo_index) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == INDEX_IMAGES
    assert [parse_size(s) for s in ("123", "512K", "10M", "1GiB", "2 mb")] == [123, 512 * 1024, 10 * 1024**2,
                                                                               1024**3, 2 * 1024**2]
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_size("ten megs")


# -- integrity: checksums, corrupt files, manifest validation ----------------------------------------------
def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # overwrite 16 bytes in the middle: same size, other content
        mid = len(data) // 2
        data[mid: mid + 16] = bytes(b ^ 0xFF for b in data[mid: mid + 16])
        path.write_bytes(bytes(data))


def _strip_checksums(index_dir: Path) -> None:
    """Make the manifest look like one written before checksums existed."""
    m = json.loads((index_dir / "manifest.json").read_text())
    m.pop("files")
    (index_dir / "manifest.json").write_text(json.dumps(m))


def test_manifest_records_size_and_sha256_of_every_file(demo_index):
    import hashlib

    m = read_manifest(demo_index)
    gen = demo_index / m["generation"]
    assert set(m["files"]) | set(m["thumbnails"]["files"]) == {p.name for p in gen.iterdir()}
    for name, rec in {**m["files"], **m["thumbnails"]["files"]}.items():
        data = (gen / name).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("name, how", [
    ("images.faiss", "truncate"), ("images.faiss", "overwrite"), ("images.npy", "truncate"),
    ("images.npy", "overwrite"), ("captions.jsonl", "overwrite"), ("captions.npy", "overwrite"),
])
def test_corrupt_index_file_is_one_line_error_naming_it(demo_index, hnsw_index, emb, tmp_path, capfd, name,
                                                        how):
    ix = copy_index(index_holding(name, demo_index, hnsw_index), tmp_path / "ix")
    path = ix / read_manifest(ix)["generation"] / name
    _corrupt(path, how)
    with pytest.raises(SearchIndexError) as e:
        SearchIndex.open(ix, emb)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg and ("bytes" in msg if how == "truncate" else "sha256" in msg)
    capfd.readouterr()
    assert cli("search", ix, "red") == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vsekit: error: ") and str(path) in err[0], err


def test_an_index_without_checksums_is_refused(demo_index, emb, tmp_path, capfd):
    """A manifest without checksums (a vsekit before 0.1.0): one line naming it, saying to rebuild."""
    ix = copy_index(demo_index, tmp_path / "ix")
    _strip_checksums(ix)
    with pytest.raises(SearchIndexError, match=r"manifest.json: an index without checksums.*before 0.1.0.*rebuild"):
        SearchIndex.open(ix, emb)
    capfd.readouterr()
    assert cli("search", ix, "red") == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(ix / "manifest.json") in err[0], err


def test_add_and_remove_refuse_a_corrupt_index(demo_index, ckpt, tmp_path, capsys):
    ix = copy_index(demo_index, tmp_path / "ix")
    path = ix / read_manifest(ix)["generation"] / "images.npy"
    _corrupt(path, "overwrite")
    snap = path.read_bytes()
    assert cli("index", "add", ix, "--data", "demo", "--split", "val", "--max-images", "2", "-q") == 2
    assert cli("index", "remove", ix, "--ids", "0") == 2
    err = capsys.readouterr().err
    assert err.count(f"{path}: corrupt index file") == 2
    assert path.read_bytes() == snap  # nothing was built on top of it
    # --overwrite replaces even a broken index
    (ix / "manifest.json").write_text('{"format": "vsekit-index", "version": 1, "kind": "bogus"}')
    build_demo_index(ckpt, ix, "--overwrite")
    assert read_manifest(ix)["num_images"] == INDEX_IMAGES


@pytest.mark.parametrize("change, field", [
    ({"kind": "bogus"}, "kind"),
    ({"dim": "abc"}, "dim"),
    ({"dim": 0}, "dim"),
    ({"dim": True}, "dim"),
    ({"num_images": -3}, "num_images"),
    ({"num_captions": 2.5}, "num_captions"),
    ({"generation": "../x"}, "generation"),
    ({"generation": "/etc"}, "generation"),
    ({"generation": "g000001/../../x"}, "generation"),
    ({"version": "abc"}, "version"),
    ({"has_captions": "yes"}, "has_captions"),
    ({"fingerprint": 12}, "fingerprint"),
    ({"params": {"nprobe": 0}}, "params.nprobe"),
    ({"params": {"nprobe": 4, "surprise": 1}}, "params.surprise"),
    ({"files": {"../../etc/passwd": {"bytes": 1, "sha256": "0" * 64}}}, "files"),
    ({"files": {"images.npy": {"bytes": 1, "sha256": "not-hex"}}}, "files.images.npy.sha256"),
    ({"sources": "demo"}, "sources"),
    ({"dim": None}, "dim"),
])
def test_bad_manifest_fields_are_refused_naming_the_field(demo_index, tmp_path, capsys, change, field):
    ix = copy_index(demo_index, tmp_path / "ix")
    m = {**json.loads((ix / "manifest.json").read_text()), **change}
    (ix / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SearchIndexError, match="invalid manifest") as e:
        read_manifest(ix)
    msg = str(e.value)
    assert f"{field}:" in msg and "\n" not in msg, msg
    assert cli("index", "info", ix) == 2 and f"{field}:" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["dim", "kind", "generation", "fingerprint", "num_images", "has_captions"])
def test_manifest_missing_keys_are_named(demo_index, tmp_path, key):
    ix = copy_index(demo_index, tmp_path / "ix")
    m = json.loads((ix / "manifest.json").read_text())
    del m[key]
    (ix / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SearchIndexError, match=f"invalid manifest: {key}: missing"):
        read_manifest(ix)


def test_manifest_unknown_keys_and_newer_versions(demo_index, tmp_path):
    ix = copy_index(demo_index, tmp_path / "ix")
    m = json.loads((ix / "manifest.json").read_text())
    (ix / "manifest.json").write_text(json.dumps({**m, "comment": "kept"}))
    assert read_manifest(ix)["comment"] == "kept"  # keys from elsewhere pass through
    (ix / "manifest.json").write_text(json.dumps({**m, "version": 99}))
    with pytest.raises(SearchIndexError, match="version 99 is newer"):
        read_manifest(ix)
    (ix / "manifest.json").write_text("[1, 2]")
    with pytest.raises(SearchIndexError, match="not a vsekit index manifest"):
        read_manifest(ix)


def test_search_image_refuses_huge_aspect_files_from_their_header(sx, tmp_path, monkeypatch, capsys):
    """A 100000 x 1 PNG of a few hundred bytes would be resized to 3200000 x 32 (the test model's resize);
    the library refuses it from the header, before decoding or transforming it."""
    from vsekit.index.search import ImageSizeError

    path = tmp_path / "strip.png"
    path.write_bytes(png_of_size(100_000, 1))
    assert path.stat().st_size < 1000
    monkeypatch.setattr(sx.embedder, "eval_transform", lambda: pytest.fail("transformed"))
    with pytest.raises(ImageSizeError, match="aspect ratio of 100000:1"):
        sx.search_image(path)
    assert cli("search", sx.index_dir, "--image", path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "aspect ratio" in err[0]


def test_resized_size_matches_the_eval_transform(sx):
    """check_image_size bounds what the transform's Resize makes; its formula must agree with torchvision."""
    from PIL import Image
    from torchvision import transforms

    resize = next(t for t in sx.embedder.eval_transform().transforms if isinstance(t, transforms.Resize))
    for w, h in [(32, 32), (100, 7), (7, 100), (333, 100), (45, 1000), (31, 30)]:
        assert resize(Image.new("RGB", (w, h))).size == sx.resized_size(w, h), (w, h)


# -- one image-loading policy: EXIF orientation (issue 21) ----------------------------------------------------
def test_a_rotated_phone_photo_indexed_from_a_folder_finds_itself_first(ckpt, demo_index, tmp_path, capsys):
    """A JPEG stored sideways with EXIF orientation 6 (as phones write them) is indexed upright, as a query
    of the same file is loaded, so ``vsekit search --image`` of the file finds it first with score 1. The
    index used to embed the stored (sideways) pixels while the query was turned upright."""
    from PIL import Image

    demo = [Path(r["path"]) for r in snapshot(demo_index)["images"]]
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, p in enumerate(demo[1:6]):
        load_rgb(p).save(folder / f"other{i}.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the pixels are stored turned the other way
    upright = load_rgb(demo[0])
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "phone.jpg", quality=95, exif=exif)
    assert cli("index", "build", ckpt, "--images", folder, "--out", tmp_path / "ix", "-q") == 0
    capsys.readouterr()
    assert cli("search", tmp_path / "ix", "--image", folder / "phone.jpg", "--target", "images", "-k", "3",
               "--json") == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["id"] == "phone.jpg" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4), hits
