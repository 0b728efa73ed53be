"""The index's own thumbnails, the only image bytes the server sends (issue 21, section 1).

Each attack that used to make ``GET /images/{id}`` send a file other than a thumbnail of an indexed image is
reproduced here: a record's ``path`` edited to name a file outside the index, a shard member named
``../../secret/x.png``, an indexed image replaced by a symlink after the build, and an SVG that Pillow also
decodes (served as ``image/svg+xml``, its script ran on the API's origin); and an index built from shards,
which had no images to show at all. Then the thumbnail files themselves are attacked: replaced by a link,
an SVG or a huge file, none of which may be sent.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_index import INDEX_IMAGES, build_demo_index, cli, copy_index

from vsekit.data.sources import load_split
from vsekit.index import SearchIndex, SearchIndexError, read_manifest
from vsekit.index import thumbnails as thumbs
from vsekit.index.generations import file_record
from vsekit.serve.app import create_app

SECRET = b"TOP SECRET: the server must never send this\n"
CSP = "default-src 'none'; sandbox"


@pytest.fixture(scope="module")
def index_dir(ckpt, tmp_path_factory) -> Path:
    return build_demo_index(ckpt, tmp_path_factory.mktemp("thumbs") / "demo")


def client_of(index_dir: Path, emb) -> TestClient:
    return TestClient(create_app(SearchIndex.open(index_dir, emb)))


def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "secret.png"  # named like an image: the name must not matter
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(SECRET)
    return path


def assert_thumbnail(resp, *, max_side: int = thumbs.DEFAULT_MAX_SIDE) -> Image.Image:
    """The reply is one of the index's JPEG thumbnails, sent so that nothing in it can run."""
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/jpeg"
    assert resp.headers["content-security-policy"] == CSP
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert "max-age" in resp.headers["cache-control"]
    body = resp.content
    assert body.startswith(b"\xff\xd8\xff") and body.endswith(b"\xff\xd9")
    assert SECRET not in body and b"<svg" not in body and b"<script" not in body
    im = Image.open(io.BytesIO(body))
    assert im.format == "JPEG" and max(im.size) <= max_side
    return im


def assert_json_404(resp, *words: str) -> None:
    assert resp.status_code == 404, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["status"] == 404
    for w in words:
        assert w in body["error"], body["error"]
    assert "/" not in body["error"].replace("/images", "")  # no server path in the reply


def edit_records(index_dir: Path, change) -> None:
    """Change the image records of the current generation and record their new checksum in the manifest,
    as someone who can write the index folder would."""
    m = read_manifest(index_dir)
    path = index_dir / m["generation"] / "images.jsonl"
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    change(recs)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    m["files"]["images.jsonl"] = file_record(path)
    (index_dir / "manifest.json").write_text(json.dumps(m), encoding="utf-8")


# -- what an index keeps --------------------------------------------------------------------------------------
def test_build_keeps_reencoded_thumbnails_of_every_image(index_dir, emb, capsys):
    m = read_manifest(index_dir)
    t = m["thumbnails"]
    assert t["count"] == INDEX_IMAGES and t["generation"] == m["generation"] and t["max_side"] == 256
    assert set(t["files"]) == set(thumbs.FILE_NAMES) and not set(t["files"]) & set(m["files"])
    sx = SearchIndex.open(index_dir, emb)
    for rec in sx.data.images:
        data = sx.thumbnail(rec["id"])
        im = Image.open(io.BytesIO(data))
        src = Image.open(rec["path"]).convert("RGB")
        assert im.format == "JPEG" and im.size == src.size  # 64 px demo images: never enlarged
        diff = np.abs(np.asarray(im.convert("RGB"), np.int16) - np.asarray(src, np.int16)).mean()
        assert diff < 12  # the same picture, through JPEG
        assert data != Path(rec["path"]).read_bytes()
    assert cli("index", "info", index_dir) == 0
    assert json.loads(capsys.readouterr().out)["thumbnails"]["count"] == INDEX_IMAGES


@pytest.mark.parametrize("change, words", [
    (lambda t: t["files"].update({"../../etc/passwd": t["files"]["images.thumbs"]}), "thumbnails.files"),
    (lambda t: t["files"].pop("images.thumbs.npy"), "thumbnails.files"),
    (lambda t: t.update(format="svg"), "thumbnails.format"),
    (lambda t: t.update(max_side=100000), "thumbnails.max_side"),
    (lambda t: t.update(generation="../g000001"), "thumbnails.generation"),
], ids=["foreign-file", "missing-file", "format", "max-side", "generation"])
def test_bad_thumbnails_sections_are_refused_naming_the_field(index_dir, tmp_path, change, words):
    ix = copy_index(index_dir, tmp_path / "ix")
    m = read_manifest(ix)
    change(m["thumbnails"])
    (ix / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    with pytest.raises(SearchIndexError, match="invalid manifest") as e:
        read_manifest(ix)
    assert words in str(e.value)


def test_build_says_how_many_images_have_thumbnails(ckpt, tmp_path, capsys):
    build_demo_index(ckpt, tmp_path / "ix", max_images=2)
    assert capsys.readouterr().out.rstrip().endswith("; thumbnails of 2 images")


def test_thumbnails_are_bounded_and_carry_nothing_of_the_source(tmp_path):
    im = Image.new("RGB", (1200, 300), (10, 200, 30))
    exif = Image.Exif()
    exif[0x010E] = "<script>alert(1)</script>"  # ImageDescription
    im.save(tmp_path / "big.jpg", "JPEG", exif=exif.tobytes(), comment=b"<script>alert(2)</script>",
            icc_profile=b"\0" * 128)
    data = thumbs.make_thumbnail(tmp_path / "big.jpg", 256)
    out = Image.open(io.BytesIO(data))
    assert out.size == (256, 64) and b"script" not in data and "icc_profile" not in out.info
    with pytest.raises(thumbs.ThumbnailError, match="1..1024"):
        thumbs.check_max_side(0)
    assert thumbs.is_jpeg(data)
    assert not thumbs.is_jpeg(b"\xff\xd8\xff<svg><script>alert(1)</script></svg>\xff\xd9")  # the markers alone


# -- the attacks -------------------------------------------------------------------------------------------
def test_record_path_naming_a_file_outside_the_index_is_not_served(index_dir, emb, tmp_path):
    ix = copy_index(index_dir, tmp_path / "ix")
    secret = secret_file(tmp_path)
    edit_records(ix, lambda recs: recs[0].update(path=str(secret)))
    with client_of(ix, emb) as c:
        rec_id = c.app.state.index.data.images[0]["id"]
        assert c.app.state.index.data.images[0]["path"] == str(secret)
        assert_thumbnail(c.get(f"/images/{rec_id}"))


def test_shard_member_climbing_out_of_the_shard_is_refused(ckpt, tmp_path, capsys):
    from test_shards import _tar

    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(png, "PNG")
    (secret_dir / "x.png").write_bytes(png.getvalue())  # a real image there: only the name is wrong
    shards = tmp_path / "a" / "shards"
    shards.mkdir(parents=True)
    _tar(shards / "train-000000.tar", [("../../secret/x.png", png.getvalue()),
                                        ("../../secret/x.json", b'{"captions": ["a red square"]}')])
    capsys.readouterr()
    assert cli("index", "build", ckpt, "--data", shards, "--split", "train", "--out", tmp_path / "ix", "-q") == 2
    err = capsys.readouterr().err
    assert "train-000000.tar" in err and "../../secret/x.png" in err and "'..'" in err
    assert not (tmp_path / "ix" / "manifest.json").exists()


def test_indexed_image_replaced_by_a_symlink_is_not_served(ckpt, emb, tmp_path):
    src = load_split({"format": "demo", "num_images": 30}, "train")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in src.image_paths[:3]:
        shutil.copy(p, folder / Path(p).name)
    assert cli("index", "build", ckpt, "--images", folder, "--out", tmp_path / "ix", "-q") == 0
    victim = sorted(folder.iterdir())[0]
    victim.unlink()
    victim.symlink_to(secret_file(tmp_path))
    with client_of(tmp_path / "ix", emb) as c:
        assert_thumbnail(c.get(f"/images/{victim.name}"))


def polyglot_svg() -> bytes:
    """A valid SVG with a script that Pillow also decodes, as a Kodak PhotoCD image (its header is looked
    for at byte 2048, which the SVG hides in a comment)."""
    head = (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
            b"<script>alert(document.domain)</script><!--")
    data = head.ljust(2048, b"A") + b"PCD_".ljust(1539, b"A")
    return data.ljust(96 * 2048 + 768 * 512 * 3 // 2, b"A") + b"--></svg>\n"


def test_svg_polyglot_is_served_as_a_jpeg_that_cannot_run(ckpt, emb, tmp_path, capsys):
    (tmp_path / "x.svg").write_bytes(polyglot_svg())
    (tmp_path / "pairs.csv").write_text("image,caption,split\nx.svg,a grey picture,test\n", encoding="utf-8")
    rc = cli("index", "build", ckpt, "--data", tmp_path / "pairs.csv", "--split", "test", "--out", tmp_path / "ix",
             "-q")
    if rc != 0:  # a decoder that refuses the format is safe too: nothing is indexed
        assert "x.svg" in capsys.readouterr().err
        return
    with client_of(tmp_path / "ix", emb) as c:
        hit = c.get("/search", params={"q": "grey"}).json()["results"][0]
        assert hit["image_url"] == "/images/x.svg"
        assert_thumbnail(c.get(hit["image_url"]))


def test_index_built_from_shards_serves_its_images(ckpt, emb, tmp_path):
    from vsekit.data.formats.shards import write_shards

    src = load_split({"format": "demo", "num_images": 30}, "train")
    write_shards(src, tmp_path / "shards", "train", progress=False)
    assert cli("index", "build", ckpt, "--data", tmp_path / "shards", "--split", "train", "--max-images", 4,
               "--out", tmp_path / "ix", "-q") == 0
    with client_of(tmp_path / "ix", emb) as c:
        hits = c.get("/search", params={"q": "red", "k": 4}).json()["results"]
        assert len(hits) == 4
        for h in hits:
            assert h["image_url"] == f"/images/{h['id']}"
            assert_thumbnail(c.get(h["image_url"]))


# -- the thumbnail files under attack -------------------------------------------------------------------------
def _pack(ix: Path) -> Path:
    return ix / read_manifest(ix)["generation"] / thumbs.PACK


def _swap_pack_to_symlink(pack: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.thumbs"
    shutil.copy(pack, target)  # the very same bytes, so only the link itself can give it away
    pack.unlink()
    pack.symlink_to(target)


def _overwrite_pack_with_svg(pack: Path, tmp_path: Path) -> None:
    """In place (the same file, the same size): what a descriptor held open sees too."""
    size = pack.stat().st_size
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    with open(pack, "r+b") as f:
        f.write((svg * (size // len(svg) + 1))[:size])


def _truncate_pack(pack: Path, tmp_path: Path) -> None:
    os.truncate(pack, 10)


def _swap_pack_to_huge(pack: Path, tmp_path: Path) -> None:
    pack.unlink()
    with open(pack, "wb") as f:
        f.truncate(64 << 30)  # sparse: 64 GiB claimed, nothing stored


def _swap_pack_to_fifo(pack: Path, tmp_path: Path) -> None:
    pack.unlink()
    os.mkfifo(pack)


def _swap_generation_to_symlink(pack: Path, tmp_path: Path) -> None:
    gen = pack.parent
    elsewhere = tmp_path / "elsewhere-gen"
    shutil.copytree(gen, elsewhere)
    shutil.rmtree(gen)
    gen.symlink_to(elsewhere, target_is_directory=True)


SWAPS = [_swap_pack_to_symlink, _overwrite_pack_with_svg, _truncate_pack, _swap_pack_to_huge, _swap_pack_to_fifo,
         _swap_generation_to_symlink]
SWAP_IDS = ["symlink", "svg-in-place", "truncated", "huge", "fifo", "generation-symlink"]


@pytest.mark.parametrize("swap", SWAPS, ids=SWAP_IDS)
def test_a_thumbnail_file_tampered_with_under_a_running_server_sends_nothing_else(index_dir, emb, tmp_path, swap,
                                                                                  caplog):
    """The server reads the file it checked when it opened the index (held open): what is renamed into the
    folder since is never read, and a change made to that very file sends a 404, never its bytes."""
    ix = copy_index(index_dir, tmp_path / "ix")
    sx = SearchIndex.open(ix, emb)
    rec = sx.data.images[1]
    original = sx.thumbnail(rec["id"])
    swap(_pack(ix), tmp_path)
    with TestClient(create_app(sx)) as c:
        r = c.get(f"/images/{rec['id']}")
    if r.status_code == 200:
        assert_thumbnail(r)
        assert r.content == original
    else:
        assert_json_404(r, "unavailable")
        assert str(_pack(ix)) in caplog.text  # the operator's log says which file
    assert swap not in (_overwrite_pack_with_svg, _truncate_pack) or r.status_code == 404


@pytest.mark.parametrize("swap, words", [
    (_swap_pack_to_symlink, "cannot open the thumbnails"),
    (_overwrite_pack_with_svg, "its sha256 is"),
    (_truncate_pack, "corrupt index file: 10 bytes"),
    (_swap_pack_to_huge, "corrupt index file: 68719476736 bytes"),
    (_swap_pack_to_fifo, "cannot open the thumbnails"),
    (_swap_generation_to_symlink, "cannot"),
], ids=SWAP_IDS)
def test_a_tampered_thumbnail_file_is_refused_when_the_index_is_opened(index_dir, emb, tmp_path, swap, words):
    ix = copy_index(index_dir, tmp_path / "ix")
    swap(_pack(ix), tmp_path)
    with pytest.raises(SearchIndexError, match="images.thumbs") as e:
        SearchIndex.open(ix, emb)
    assert words in str(e.value)


# -- generations, add, remove, and indexes without thumbnails -------------------------------------------------
def test_add_and_remove_keep_thumbnails_in_step_with_the_records(ckpt, emb, tmp_path):
    ix = build_demo_index(ckpt, tmp_path / "ix", max_images=4)
    first = read_manifest(ix)["generation"]
    old = SearchIndex.open(ix, emb)
    before = {r["id"]: old.thumbnail(r["id"]) for r in old.data.images}
    assert cli("index", "add", ix, "--data", "demo", "--split", "train", "--max-images", 6, "-q") == 0
    m = read_manifest(ix)
    assert m["thumbnails"]["count"] == 6 and m["thumbnails"]["generation"] == m["generation"] != first
    assert not (ix / first).exists() and not list(ix.glob(".thumbnails.*"))
    sx = SearchIndex.open(ix, emb)
    ids = [r["id"] for r in sx.data.images]
    after = {i: sx.thumbnail(i) for i in ids}
    assert len(set(after.values())) == 6 and all(after[i] == data for i, data in before.items())
    gone = ids[1]
    assert cli("index", "remove", ix, "--ids", gone) == 0
    sx = SearchIndex.open(ix, emb)
    assert read_manifest(ix)["thumbnails"]["count"] == 5 and sx.thumbnail(gone) is None
    assert [r["id"] for r in sx.data.images] == [i for i in ids if i != gone]
    for rec in sx.data.images:  # each row still shows its own image
        assert sx.thumbnail(rec["id"]) == after[rec["id"]]
    with TestClient(create_app(sx)) as c:
        assert_json_404(c.get(f"/images/{gone}"), "no image with id")


def test_a_running_server_keeps_its_thumbnails_when_a_writer_replaces_their_generation(ckpt, emb, tmp_path):
    ix = build_demo_index(ckpt, tmp_path / "ix", max_images=2)
    first = read_manifest(ix)["generation"]
    with client_of(ix, emb) as c:
        rec_id = c.app.state.index.data.images[0]["id"]
        before = c.get(f"/images/{rec_id}").content
        assert cli("index", "add", ix, "--data", "demo", "--split", "train", "--max-images", 3, "-q") == 0
        assert not (ix / first).exists()  # the generation the server opened is gone from the folder
        r = c.get(f"/images/{rec_id}")
        assert_thumbnail(r)
        assert r.content == before


def test_index_without_thumbnails_gives_null_urls_and_a_clear_404(ckpt, emb, tmp_path):
    ix = build_demo_index(ckpt, tmp_path / "ix", "--thumbnail-size", "0", max_images=3)
    assert "thumbnails" not in read_manifest(ix) and not list((ix / read_manifest(ix)["generation"]).glob("*thumbs*"))
    with client_of(ix, emb) as c:
        hits = c.get("/search", params={"q": "red", "k": 3}).json()["results"]
        assert hits and all(h["image_url"] is None for h in hits)
        assert_json_404(c.get(f"/images/{hits[0]['id']}"), "has no thumbnail")
    assert cli("index", "add", ix, "--data", "demo", "--split", "train", "--max-images", 4, "-q") == 0
    assert "thumbnails" not in read_manifest(ix)  # an index without them does not grow some


def test_thumbnails_of_another_generation_are_refused(index_dir, emb, tmp_path):
    """A vsekit before 0.1.0, which predates thumbnails, wrote a generation without them, keeping the
    manifest's section: refused in one line, saying to rebuild."""
    ix = copy_index(index_dir, tmp_path / "ix")
    m = read_manifest(ix)
    m["thumbnails"]["generation"] = "g000000"
    (ix / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    with pytest.raises(SearchIndexError, match=r"thumbnails of generation g000000, not the current one.*rebuild"):
        SearchIndex.open(ix, emb)


def test_cache_validators_and_ranges(index_dir, emb):
    with client_of(index_dir, emb) as c:
        rec_id = c.app.state.index.data.images[0]["id"]
        r = c.get(f"/images/{rec_id}")
        assert_thumbnail(r)
        again = c.get(f"/images/{rec_id}", headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304 and not again.content
        whole = c.get(f"/images/{rec_id}", headers={"Range": "bytes=0-9"})  # a thumbnail is sent whole
        assert whole.status_code == 200 and whole.content == r.content
