"""webdataset shards: written from any source, read back (by byte offset) to the same corpus, and a run
trained from them equal to one trained from the source."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from _configs import tiny_config
from PIL import Image

import vsekit.data.formats.shards as shards_mod
from vsekit.checkpoint import load_checkpoint
from vsekit.cli import main
from vsekit.data.archive import MemberPath, ShardFeatures
from vsekit.data.corpus import DataError
from vsekit.data.formats.shards import expand_braces, read_shards, write_shards
from vsekit.data.images import load_rgb
from vsekit.data.sources import load_split, sniff_source
from vsekit.train.trainer import Trainer

pytest.importorskip("webdataset")
DEMO = {"format": "demo", "num_images": 60}


def _same_corpus(a, b):
    assert b.image_ids == a.image_ids and b.captions == a.captions and b.caption_ids == a.caption_ids
    assert np.array_equal(b.caption_to_image, a.caption_to_image)
    assert (a.labels is None and b.labels is None) or np.array_equal(a.labels, b.labels)


def test_image_shards_round_trip(tmp_path, cache):
    src = load_split(DEMO, "train")
    r = write_shards(src, tmp_path, "train", max_per_shard=7, progress=False)
    assert [f.name for f in r.files][:2] == ["train-000000.tar", "train-000001.tar"]
    assert len(r.files) == -(-src.num_images // 7) and r.samples == src.num_images
    back = read_shards(tmp_path, "train")
    _same_corpus(src, back)
    assert all(isinstance(p, MemberPath) for p in back.image_paths)
    for i in (0, 8, src.num_images - 1):
        assert back.image_paths[i].read_bytes() == src.image_paths[i].read_bytes()  # the file, not re-encoded
        assert np.array_equal(np.asarray(load_rgb(back.image_paths[i])), np.asarray(load_rgb(src.image_paths[i])))
    first = read_shards(tmp_path, "train", max_images=5)
    assert first.num_images == 5 and first.captions == [c for c, i in zip(src.captions, src.caption_to_image) if i < 5]
    # the same corpus gives the same bytes (no times in the tar headers)
    again = write_shards(src, tmp_path / "again", "train", max_per_shard=7, progress=False)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(r.files, again.files))
    with tarfile.open(r.files[0]) as tf:
        assert tf.getnames()[:2] == ["000000000.json", "000000000.png"]
        meta = json.loads(tf.extractfile("000000000.json").read())
    assert meta["image_id"] == src.image_ids[0] and meta["captions"] == src.captions[:5]


def test_feature_shards_round_trip(tmp_path, cache):
    src = load_split({**DEMO, "regions": "grid", "grid": 2, "patch": 2}, "train")
    assert src.features.shape[1:] == (4, 12)
    write_shards(src, tmp_path, "train", max_per_shard=10, progress=False)
    back = read_shards(tmp_path, "train")
    _same_corpus(src, back)
    assert isinstance(back.features, ShardFeatures) and back.features.shape == src.features.shape
    assert back.features.dtype == src.features.dtype
    np.testing.assert_array_equal(np.asarray(back.features), np.asarray(src.features))
    np.testing.assert_array_equal(back.features[7], src.features[7])
    view = back.features[3:9][[0, 5]]  # lazy views compose
    np.testing.assert_array_equal(np.asarray(view), np.asarray(src.features)[[3, 8]])
    sniffed = sniff_source(str(tmp_path))
    assert sniffed.format == "shards" and load_split(sniffed, "train").num_images == src.num_images


def _cfg(out, data, *extra):
    return tiny_config(
        out, "seed=5", "transform.image_size=32", "transform.resize=32", "data.val_max_images=10",
        "model.embed_size=16", "model.image_encoder.name=cnn",
        "model.image_encoder.backbone=small_cnn", "model.image_encoder.width=4", "model.image_encoder.finetune=true",
        "model.text_encoder.word_dim=8", "train.batch_size=8", "train.epochs=1", "train.max_steps_per_epoch=4",
        "train.log_every=1", "optim.lr=1e-3", *extra).to_dict() | {"data": data}


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


def test_training_from_shards_equals_training_from_the_source(tmp_path, cache):
    for split in ("train", "val"):
        write_shards(load_split(DEMO, split), tmp_path / "shards", split, max_per_shard=9, progress=False)
    Trainer(_cfg(tmp_path / "src", DEMO)).fit()
    Trainer(_cfg(tmp_path / "shd", {"format": "shards", "path": str(tmp_path / "shards")})).fit()
    a, b = _losses(tmp_path / "src"), _losses(tmp_path / "shd")
    assert len(a) == 4 and a == b
    wa, wb = load_checkpoint(tmp_path / "src" / "last.pt"), load_checkpoint(tmp_path / "shd" / "last.pt")
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert wa["history"][0]["rsum"] == wb["history"][0]["rsum"]


def test_the_index_is_built_once_and_rebuilt_when_a_shard_changes(tmp_path, cache, monkeypatch):
    src = load_split(DEMO, "val")
    write_shards(src, tmp_path, "val", max_per_shard=4, progress=False)
    assert (tmp_path / "val.index.json").is_file()
    write_shards(load_split(DEMO, "test"), tmp_path / "t", "test", max_per_shard=4, progress=False)
    built = []
    real = shards_mod.build_index
    monkeypatch.setattr(shards_mod, "build_index", lambda files: built.append(1) or real(files))
    read_shards(tmp_path, "dev")  # dev and val stand in for each other
    assert built == []
    shard = tmp_path / "val-000001.tar"
    other = tmp_path / "t" / "test-000000.tar"
    st = shard.stat()
    shard.write_bytes(other.read_bytes()[: st.st_size].ljust(st.st_size, b"\0"))  # same size and time
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    corpus = read_shards(tmp_path, "val")
    assert built == []  # the stamp still matches: the per-read header check catches it
    with pytest.raises(DataError, match="val-000001.tar: 000000004.png is not where its index says"):
        corpus.image_paths[4].read_bytes()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # now the index is stale: rebuilt, which
    with pytest.raises(DataError, match="val-000001.tar: damaged tar file"):  # finds the truncated copy
        read_shards(tmp_path, "val")
    assert built == [1]


def _tar(path, members, compress=False):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    path.write_bytes(gzip.compress(buf.getvalue()) if compress else buf.getvalue())


def test_shards_written_elsewhere_and_bad_shards(tmp_path, cache):
    src = load_split(DEMO, "test")
    png = [p.read_bytes() for p in src.image_paths[:4]]
    _tar(tmp_path / "web-0.tar", [("a1.jpg", png[0]), ("a1.txt", b"a red circle\n"), ("b2.jpg", png[1]),
                                   ("b2.txt", b"two squares")])
    _tar(tmp_path / "web-1.tar", [("c3.png", png[2]), ("c3.cls", b"3")])  # no caption: fine for encoding
    corpus = load_split({"format": "shards", "path": str(tmp_path / "web-{0..1}.tar")}, "test")
    assert corpus.image_ids == ["a1", "b2", "c3"] and corpus.captions == ["a red circle", "two squares"]
    assert corpus.caption_ids == ["web-0.tar:a1.jpg:0", "web-0.tar:b2.jpg:0"]
    assert expand_braces("s-{08..10}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar"]
    assert read_shards(tmp_path / "web-*.tar", "train").num_images == 3  # no {split}: every split

    # the image check reads headers (a member truncated past it passes), decoding names the member
    _tar(tmp_path / "cut.tar", [("a.png", png[0][: len(png[0]) // 2]), ("b.png", png[1])])
    corpus = load_split({"format": "shards", "path": str(tmp_path / "cut.tar")}, "train")
    with pytest.raises(DataError, match=r"cut.tar/a.png: cannot decode"):
        load_rgb(corpus.image_paths[0])
    _tar(tmp_path / "junk.tar", [("a.png", b"not an image"), ("b.png", png[1])])
    with pytest.raises(DataError, match=r"1 of 2 images are missing or unreadable, e.g. \S+/junk.tar/a.png \(not a recognised image"):
        load_split({"format": "shards", "path": str(tmp_path / "junk.tar")}, "train")

    _tar(tmp_path / "gz.tar", [("a.jpg", png[0])], compress=True)
    with pytest.raises(DataError, match="gz.tar: not an uncompressed tar"):
        read_shards(tmp_path / "gz.tar", "train")
    _tar(tmp_path / "two.tar", [("a.jpg", png[0]), ("a.png", png[1])])
    with pytest.raises(DataError, match="sample 'a' needs exactly one image or .npy member"):
        read_shards(tmp_path / "two.tar", "train")
    _tar(tmp_path / "lab.tar", [("a.jpg", png[0]), ("a.json", b'{"captions": ["x"], "label": "cat"}')])
    with pytest.raises(DataError, match="label must be a class id"):
        read_shards(tmp_path / "lab.tar", "train")
    with pytest.raises(DataError, match="no shards of split 'val'"):
        read_shards(tmp_path, "val")
    write_shards(src, tmp_path / "out", "test", progress=False)
    with pytest.raises(DataError, match="holds shards of split 'test' already"):
        write_shards(src, tmp_path / "out", "test", progress=False)
    write_shards(src, tmp_path / "out", "test", progress=False, overwrite=True)


def test_cli_writes_shards(tmp_path, cache, capsys):
    (tmp_path / "data.yaml").write_text("{format: demo, num_images: 60}\n")
    assert main(["shards", "--data", str(tmp_path / "data.yaml"), "--split", "val,test", "--out",
                 str(tmp_path / "s"), "--max-per-shard", "5"]) == 0
    out = capsys.readouterr().out
    assert "val: 6 images, 30 captions in 2 shards" in out
    assert main(["shards", "--data", str(tmp_path / "data.yaml"), "--split", "val", "--out", str(tmp_path / "s")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def _tar_members(path, members):
    """A tar of ``(TarInfo, data)`` members, so that any type and name can be written."""
    with tarfile.open(path, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for ti, data in members:
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data else None)


def _member(name, kind=tarfile.REGTYPE, link=""):
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, link
    return ti


@pytest.mark.parametrize("member, words", [
    (_member("../../secret/x.png"), "climbs out of the shard with '..'"),
    (_member("a/../../x.png"), "climbs out of the shard with '..'"),
    (_member("/abs/x.png"), "is an absolute path"),
    (_member("dir\\..\\x.png"), "backslash or a control character"),
    (_member("x\n.png"), "backslash or a control character"),
    (_member("x.png", tarfile.SYMTYPE, "/etc/passwd"), "is a symbolic link"),
    (_member("x.png", tarfile.LNKTYPE, "a.png"), "is a hard link"),
    (_member("x.png", tarfile.CHRTYPE), "is a character device"),
    (_member("x.png", tarfile.BLKTYPE), "is a block device"),
    (_member("x.png", tarfile.FIFOTYPE), "is a FIFO"),
    (_member("x.png", tarfile.GNUTYPE_SPARSE), "is a sparse file"),  # its data is not one run at its offset
], ids=["dotdot", "inner-dotdot", "absolute", "backslash", "newline", "symlink", "hardlink", "chardev", "blockdev",
        "fifo", "sparse"])
def test_members_outside_the_shard_or_not_plain_files_are_refused(tmp_path, cache, member, words):
    png = load_split(DEMO, "test").image_paths[0].read_bytes()
    data = b"" if member.type in (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
                                  tarfile.FIFOTYPE) else png
    _tar_members(tmp_path / "bad.tar", [(_member("a.png"), png), (member, data)])
    with pytest.raises(DataError, match="bad.tar: member ") as e:
        read_shards(tmp_path / "bad.tar", "train")
    assert words in str(e.value) and repr(member.name)[:20] in str(e.value)


def test_a_stored_shard_index_naming_members_outside_the_shard_is_refused(tmp_path, cache):
    """The index beside the shards is a file like any other: one whose member names were edited (and whose
    shard stamps still match) is refused, not turned into paths outside the shard."""
    src = load_split(DEMO, "test")
    write_shards(src, tmp_path, "test", progress=False)
    index_path = tmp_path / "test.index.json"
    index = json.loads(index_path.read_text())
    index["member"][0] = "../../secret/x.png"
    index_path.write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"test-000000.tar: member '../../secret/x.png' climbs out"):
        read_shards(tmp_path, "test")
    index["member"][0], index["shard"][0] = "000000000.png", 7
    index_path.write_text(json.dumps(index))
    with pytest.raises(DataError, match="names shard 7 of 1"):
        read_shards(tmp_path, "test")
    with pytest.raises(DataError, match="is an absolute path"):
        MemberPath(str(tmp_path / "test-000000.tar"), "/etc/passwd", 512, 10)


def test_a_shard_member_of_every_accepted_format_is_an_image(tmp_path):
    """Shard members are images by the decoder's own extension list: an AVIF member (accepted by uploads and
    folder listing) was skipped as an unknown file before."""
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF codec")
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(buf, format="AVIF")
    _tar_members(tmp_path / "a.tar", [(_member("s0.avif"), buf.getvalue()), (_member("s0.txt"), b"a red square")])
    corpus = read_shards(tmp_path / "a.tar", "train")
    assert corpus.num_images == 1 and corpus.captions == ["a red square"]
    assert load_rgb(corpus.image_paths[0]).size == (8, 6)


def test_a_huge_brace_range_is_refused_before_any_name_is_made():
    """Why the shard patterns are not expanded by ``braceexpand`` (webdataset's and wids' dependency): it builds a
    whole range before its first name, so this pattern would fill memory there; here it is one error at once."""
    with pytest.raises(DataError, match=r"bad shard range \{0..1000000000000\}"):
        expand_braces("s-{0..1000000000000}.tar")
    with pytest.raises(DataError, match="names more than 100000 shards"):
        expand_braces("s-{0..99999}-{0,1}.tar")
