"""Index backends: NumPy exact search (one memory-mapped copy, ties by row), parity of FAISS flat, NumPy and
Qdrant on the same vectors, and Qdrant indexes (the client's local mode) through build, search, add, remove
and the command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_index import INDEX_IMAGES, build_demo_index, cli, foreign_checkpoint

from vsekit.index import SearchIndex, SearchIndexError, read_manifest
from vsekit.index.backends import (
    FaissAnn,
    NumpyExact,
    QdrantBackend,
    QdrantConfig,
    create_backend,
    open_backend,
    point_id,
)
from vsekit.index.backends import numpy as numpy_backend
from vsekit.index.backends.faiss import build_faiss, faiss_module
from vsekit.index.data import AnnParams, IndexData
from vsekit.index.generations import file_record, load_data
from vsekit.inference import Embedder

qdrant_client = pytest.importorskip("qdrant_client")  # installed by `make test` (the qdrant extra)

QUERIES = ["a red circle left of a square", "two blue shapes", "a big yellow triangle", "a purple star"]


@pytest.fixture(scope="module")
def local_index(ckpt, tmp_path_factory) -> Path:
    return build_demo_index(ckpt, tmp_path_factory.mktemp("local") / "demo")


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def records(n: int) -> list[dict]:
    return [{"id": f"item{i}", "path": None, "captions": []} for i in range(n)]


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: every score, then a full sort by (score descending, row ascending)."""
    s = queries @ vectors.T
    order = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), -s), axis=-1)[:, :k]
    return np.take_along_axis(s, order, 1), order


# -- NumPy exact search ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 7, 50, 2990, 4000])
def test_numpy_exact_equals_brute_force_with_ties_by_row(monkeypatch, k):
    """Entries are -1/2, 0 or 1/2 in 6 dimensions: every score is exact in float32 and one of 25 values, so
    the order is checked exactly, ties included; blocks of 1024 rows make the merge across blocks count."""
    rng = np.random.default_rng(0)
    v = (rng.integers(-1, 2, size=(3000, 6)) / 2).astype(np.float32)
    q = (rng.integers(-1, 2, size=(7, 6)) / 2).astype(np.float32)
    monkeypatch.setattr(numpy_backend, "_EXACT_BLOCK_SCORES", 7 * 1024)  # 7 queries -> blocks of 1024 rows
    backend = NumpyExact("exact", AnnParams())
    backend.build(IndexData(v, records(3000)))
    scores, rows = backend.search("images", q, k)
    want_s, want_r = brute_force(v, q, min(k, 3000))
    if k < 3000:  # the k-th score is shared with rows left out: the rows decide which are kept
        assert (((q @ v.T) == want_s[:, -1:]).sum(1) > (want_s == want_s[:, -1:]).sum(1)).sum() >= 5
    else:  # every row returned: the order among equal scores is by row
        assert (want_s[:, 1:] == want_s[:, :-1]).any()
    np.testing.assert_array_equal(rows, want_r)
    np.testing.assert_array_equal(scores, want_s)


def no_ties(vectors: np.ndarray, queries: np.ndarray, k: int) -> None:
    """Precondition of a parity test: the top k + 1 scores of each query are apart by more than float noise,
    so every correct search must return the same rows in the same order."""
    s, _ = brute_force(vectors, queries, k + 1)
    assert np.min(-np.diff(s, axis=1)) > 1e-5


def test_faiss_flat_numpy_exact_and_qdrant_return_the_same_top_k(tmp_path):
    x, q, k = unit_rows(60, 24, 0), unit_rows(15, 24, 1), 10
    no_ties(x, q, k)
    want_s, want_r = brute_force(x, q, k)
    flat_s, flat_r = build_faiss(x, "exact", AnnParams()).search(q, k)  # what exact indexes held before
    numpy = NumpyExact("exact", AnnParams())
    numpy.build(IndexData(x, records(60)))
    np_s, np_r = numpy.search("images", q, k)
    qd = create_backend(QdrantConfig(path=str(tmp_path / "qdrant")), index_dir=tmp_path / "ix", kind="exact",
                        params=AnnParams(), similarity="cosine", targets=("images",))
    try:
        qd.build(IndexData(x, records(60)))
        qd_s, qd_r = qd.search("images", q, k)
        qd.kind = "hnsw"  # local mode scans every point whatever the kind: the same answer
        hn_s, hn_r = qd.search("images", q, k)
    finally:
        qd.close()
    for rows in (flat_r, np_r, qd_r, hn_r):
        np.testing.assert_array_equal(rows, want_r)
    for scores in (flat_s, np_s, qd_s, hn_s):
        np.testing.assert_allclose(scores, want_s, atol=1e-5)


def test_exact_index_holds_one_memory_mapped_copy(local_index, emb, monkeypatch):
    """No FAISS structure is made or read for an exact index: its searches read the .npy memory maps."""
    faiss = faiss_module()

    def refuse(*a, **k):
        raise AssertionError("an exact index made or read a FAISS index")

    for name in ("IndexFlatIP", "read_index", "IndexFlat"):
        monkeypatch.setattr(faiss, name, refuse)
    m = read_manifest(local_index)
    assert m["kind"] == "exact" and not any(f.endswith(".faiss") for f in m["files"])
    sx = SearchIndex.open(local_index, emb)
    assert isinstance(sx.backend, NumpyExact) and sx.data.ann == {}
    for target in ("images", "captions"):
        v = sx.data.vectors(target)
        assert isinstance(v, np.memmap) and not v.flags.writeable
    q = emb.encode_texts(QUERIES)
    want_s, want_r = brute_force(np.asarray(sx.data.image_vectors), q, 5)
    hits = sx.search_vectors(q, "captions", "images", 5)
    assert [[sx.data.images[r]["id"] for r in row] for row in want_r] == [[h.id for h in hs] for hs in hits]
    np.testing.assert_allclose([[h.score for h in hs] for hs in hits], want_s, atol=1e-6)


def test_an_exact_index_with_a_flat_faiss_file_is_refused(local_index, emb, tmp_path, capsys):
    """Exact indexes of a vsekit before 0.1.0 held images.faiss (IndexFlatIP): one line naming the file, saying
    to rebuild."""
    ix = tmp_path / "old"
    shutil.copytree(local_index, ix)
    m = json.loads((ix / "manifest.json").read_text())
    gen = ix / m["generation"]
    faiss_module().write_index(build_faiss(np.load(gen / "images.npy"), "exact", AnnParams()),
                                     str(gen / "images.faiss"))
    m["files"]["images.faiss"] = file_record(gen / "images.faiss")
    (ix / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SearchIndexError, match=r"images.faiss: an exact index with a FAISS file.*before 0.1.0"):
        SearchIndex.open(ix, emb)
    capsys.readouterr()
    assert cli("search", ix, "red") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(gen / "images.faiss") in err and "rebuild" in err, err


def test_open_backend_picks_the_class_from_the_manifest(local_index, tmp_path):
    m = read_manifest(local_index)
    data = load_data(local_index, m)
    assert type(open_backend(m, data)) is NumpyExact
    assert type(open_backend({k: v for k, v in m.items() if k != "backend"}, data)) is NumpyExact  # old manifests
    x = unit_rows(200, 8, 0)
    hnsw = FaissAnn("hnsw", AnnParams(ef_search=5))
    data = hnsw.build(IndexData(x, records(200)))
    assert hnsw.manifest_fields()["recall_at_10"]["images"] > 0
    with pytest.raises(SearchIndexError, match="the local backend has no 'flat' index; its kinds: exact, ivf"):
        open_backend({**m, "kind": "flat"}, data)


# -- Qdrant ----------------------------------------------------------------------------------------------
def qdrant_args(folder: Path, *extra: str) -> list[str]:
    return ["--backend", "qdrant", "--qdrant-path", str(folder), *extra]


def hits_of(sx: SearchIndex, target: str = "images", k: int = 5) -> list[list[tuple[str, float]]]:
    if target == "images":
        return [[(h.id, h.score) for h in sx.search_text(t, k=k)] for t in QUERIES]
    return [[(h.id, h.score) for h in sx.search_image(r["path"], k=k)] for r in sx.data.images[:3]]


def assert_same_hits(a, b) -> None:
    assert [[i for i, _ in row] for row in a] == [[i for i, _ in row] for row in b]
    np.testing.assert_allclose([[s for _, s in row] for row in a], [[s for _, s in row] for row in b], atol=1e-5)


def test_qdrant_build_add_remove_match_the_local_index(ckpt, emb, local_index, tmp_path, capsys):
    """A Qdrant index grown from 4 to 8 images answers as the local index of the 8 does; removal takes the
    points out of the collections; the folder keeps the manifest and records only."""
    qd, ix = tmp_path / "qdrant", tmp_path / "ix"
    build_demo_index(ckpt, ix, *qdrant_args(qd, "--collection", "shapes"), max_images=4)
    m = read_manifest(ix)
    assert m["backend"] == "qdrant" and m["version"] == 2 and m["kind"] == "exact" and m["dim"] == 128
    assert m["qdrant"] == {"path": str(qd.resolve()), "distance": "dot",
                           "collections": {"images": "shapes-images", "captions": "shapes-captions"}}
    assert set(m["files"]) == {"images.jsonl", "captions.jsonl"}  # and the thumbnails, which every backend keeps
    assert {p.name for p in (ix / m["generation"]).iterdir()} == {*m["files"], *m["thumbnails"]["files"]}
    assert cli("index", "add", ix, "--data", "demo", "--split", "train", "--max-images", INDEX_IMAGES, "-q") == 0
    assert "added 4 images (4 already" in capsys.readouterr().out

    sx, ref = SearchIndex.open(ix, emb), SearchIndex.open(local_index, emb)
    try:
        assert isinstance(sx.backend, QdrantBackend) and sx.data.image_vectors is None
        assert sx.num_images == INDEX_IMAGES and sx.num_captions == 5 * INDEX_IMAGES
        assert_same_hits(hits_of(sx), hits_of(ref))
        assert_same_hits(hits_of(sx, "captions"), hits_of(ref, "captions"))
        assert_same_hits([[(h.id, h.score) for h in sx.search_text("red", k=100)]],
                         [[(h.id, h.score) for h in ref.search_text("red", k=100)]])  # k > N: all of them

        gone = [sx.data.images[0]["id"], sx.data.images[5]["id"]]
        assert cli("index", "remove", ix, "--ids", *gone) == 0
        client = sx.backend.client  # the process's one client of the local-mode folder
        assert client.count("shapes-images").count == INDEX_IMAGES - 2
        assert client.count("shapes-captions").count == 5 * (INDEX_IMAGES - 2)
    finally:
        sx.close()
    after = SearchIndex.open(ix, emb)
    try:
        assert after.num_images == INDEX_IMAGES - 2
        ids = {h.image_id for row in QUERIES for h in after.search_text(row, k=INDEX_IMAGES)}
        assert len(ids) == INDEX_IMAGES - 2 and not ids & set(gone)
        assert all(after.has_thumbnail(i) for i in ids) and after.data.thumbnails.count == INDEX_IMAGES - 2
        assert not {h.image_id for h in after.search_image(ref.data.images[0]["path"], k=50)} & set(gone)
    finally:
        after.close()
        ref.close()


def test_qdrant_cli_round_trip(ckpt, tmp_path, capsys, caplog):
    qd, ix = tmp_path / "qdrant", tmp_path / "ix"
    assert cli("index", "build", ckpt, "--data", "demo", "--split", "train", "--max-images", "4", "--no-captions",
               "--out", ix, "-q", *qdrant_args(qd)) == 0
    out = capsys.readouterr().out
    assert f"qdrant {qd.resolve()}: collections ix-images" in out and "4 images, 0 captions" in out
    assert cli("search", ix, "a red circle", "-k", "3", "--json") == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3] and all(h["target"] == "images" and h["path"] for h in hits)
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert cli("index", "info", ix) == 0
    assert json.loads(capsys.readouterr().out)["qdrant"]["collections"] == {"images": "ix-images"}
    # the same collection again: refused without --overwrite, replaced with it
    again = ["index", "build", ckpt, "--data", "demo", "--split", "train", "--max-images", "2", "--no-captions",
             "-q", *qdrant_args(qd, "--collection", "ix")]
    assert cli(*again, "--out", tmp_path / "other") == 2
    assert "collection 'ix-images' already exists; pass --overwrite" in capsys.readouterr().err
    assert cli(*again, "--out", ix, "--overwrite") == 0
    assert read_manifest(ix)["num_images"] == 2 and "no longer used" not in caplog.text
    # replaced by a local index: the collections are left alone, and named
    assert cli(*again[:-len(qdrant_args(qd, "--collection", "ix"))], "--out", ix, "--overwrite") == 0
    assert read_manifest(ix)["backend"] == "local"
    assert "Qdrant collections ix-images" in caplog.text and "no longer used" in caplog.text


def test_qdrant_refusals_come_before_encoding(ckpt, tmp_path, capsys, monkeypatch):
    def no_encoding(*a, **k):
        raise AssertionError("encoded before refusing")

    monkeypatch.setattr(Embedder, "encode_images", no_encoding)
    base = ["index", "build", ckpt, "--data", "demo", "--split", "train", "--max-images", "2", "-q"]
    cases = [
        (["--out", tmp_path / "a", *qdrant_args(tmp_path / "q"), "--kind", "ivf"],
         "the qdrant backend has no 'ivf' index; its kinds: exact, hnsw"),
        (["--out", tmp_path / "a", "--url", "http://localhost:6333"], "--url: options of --backend qdrant"),
        (["--out", tmp_path / "a", "--backend", "qdrant"], "exactly one of --url (a Qdrant server) and --qdrant-path"),
        (["--out", tmp_path / "a", "--backend", "qdrant", "--url", "localhost:6333"], "not an http(s) URL"),
        (["--out", tmp_path / "a", *qdrant_args(tmp_path / "q", "--collection", "../x")], "--collection '../x'"),
        # nothing listens on port 9: a one-line error naming the server
        (["--out", tmp_path / "a", "--backend", "qdrant", "--url", "http://127.0.0.1:9"],
         "qdrant at http://127.0.0.1:9: could not check the collections"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert cli(*base, *extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    order = foreign_checkpoint(ckpt, tmp_path / "order.pt", similarity="order")
    assert cli("index", "build", order, "--data", "demo", "--split", "train", "--out", tmp_path / "o", "-q",
               *qdrant_args(tmp_path / "q")) == 2
    assert "'order' similarity, which is not an inner product: a vector database" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "o" / "manifest.json").exists()


@pytest.fixture
def small_qdrant(ckpt, tmp_path) -> Path:
    ix = tmp_path / "ix"
    build_demo_index(ckpt, ix, *qdrant_args(tmp_path / "qdrant"), max_images=3)
    return ix


@pytest.fixture(scope="module")
def shared_qdrant(ckpt, tmp_path_factory) -> Path:
    """A qdrant index for tests that only read (or copy) its folder."""
    root = tmp_path_factory.mktemp("shared-qdrant")
    return build_demo_index(ckpt, root / "ix", *qdrant_args(root / "qdrant"), max_images=3)


def test_points_the_records_do_not_know_are_skipped_then_deleted(small_qdrant, emb):
    """A write that died between its upsert and its commit leaves points the records do not hold: searches
    never return them (and still fill k), and the next write deletes them."""
    sx = SearchIndex.open(small_qdrant, emb)
    try:
        client, name = sx.backend.client, sx.backend.collections["images"]
        want = hits_of(sx, k=3)
        models = qdrant_client.models
        q = emb.encode_texts(QUERIES)
        strays = [models.PointStruct(id=point_id(f"stray{i}"), vector=(q[i % len(q)] * 1.5).tolist(),
                                     payload={"id": f"stray{i}"}) for i in range(6)]  # they would top every list
        client.upsert(name, points=strays, wait=True)
        assert_same_hits(hits_of(sx, k=3), want)
        assert cli("index", "remove", small_qdrant, "--ids", sx.data.images[2]["id"]) == 0
        assert client.count(name).count == 2
    finally:
        sx.close()


def test_a_collection_changed_outside_the_index_is_refused(small_qdrant, emb):
    sx = SearchIndex.open(small_qdrant, emb)
    client, name = sx.backend.client, sx.backend.collections["captions"]
    client.delete(name, points_selector=qdrant_client.models.PointIdsList(points=[point_id(sx.data.captions[0]["id"])]))
    sx.close()
    with pytest.raises(SearchIndexError, match=f"collection '{name}' holds 14 points, but the index records 15 "
                                               "captions: it was changed outside this index; rebuild"):
        SearchIndex.open(small_qdrant, emb)


@pytest.mark.parametrize("change, field", [
    ({"qdrant": None, "backend": "qdrant"}, "qdrant: missing"),
    ({"qdrant": {"collections": {"images": "a-images"}}}, "exactly one of url"),
    ({"qdrant": {"url": "http://h:6333", "path": "/x", "collections": {"images": "a"}}}, "exactly one of url"),
    ({"qdrant": {"url": "http://h:6333", "collections": {"images": "../../a"}}}, "not a collection name"),
    ({"qdrant": {"url": "http://h:6333", "collections": {"captions": "a"}}}, "names no images collection"),
    ({"qdrant": {"url": "http://h:6333", "collections": {"images": "a"}, "shards": 0}}, "qdrant.shards"),
    ({"kind": "ivf"}, "not ivf"),
    ({"backend": "milvus"}, "backend"),
])
def test_bad_qdrant_manifest_fields_are_named(shared_qdrant, tmp_path, change, field):
    ix = tmp_path / "copy"
    shutil.copytree(shared_qdrant, ix)
    m = {**json.loads((ix / "manifest.json").read_text()), **change}
    (ix / "manifest.json").write_text(json.dumps({k: v for k, v in m.items() if v is not None}))
    with pytest.raises(SearchIndexError, match="invalid manifest") as e:
        read_manifest(ix)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_a_local_mode_folder_used_by_another_process_is_a_clear_error(shared_qdrant, emb):
    folder = read_manifest(shared_qdrant)["qdrant"]["path"]
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, qdrant_client; c = qdrant_client.QdrantClient("
                               f"path={folder!r}); print('ready', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(SearchIndexError, match="in use by another process.*run a Qdrant server"):
            SearchIndex.open(shared_qdrant, emb)
    finally:
        holder.communicate("", timeout=30)


def test_the_server_serves_a_qdrant_index(shared_qdrant, emb):
    from fastapi.testclient import TestClient

    from vsekit.serve.app import create_app

    sx = SearchIndex.open(shared_qdrant, emb)
    try:
        with TestClient(create_app(sx)) as client:
            resp = client.get("/search", params={"q": "a red circle", "k": 2})
            assert resp.status_code == 200, resp.text
            hits = resp.json()["results"]
            assert [h["rank"] for h in hits] == [1, 2] and hits[0]["id"] in {r["id"] for r in sx.data.images}
            assert client.get("/health").json()["images"] == 3
    finally:
        sx.close()


def test_a_local_client_left_open_is_closed_at_exit_without_an_error(tmp_path):
    code = ("import sys; from vsekit.index.backends.qdrant import _acquire_local; "
            f"_acquire_local({str(tmp_path / 'q')!r}); print('opened')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "opened" in p.stdout
    assert "Exception ignored" not in p.stderr and "Traceback" not in p.stderr, p.stderr
