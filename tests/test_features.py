"""``vsekit features extract``: the precomp layout from a backbone, memory-mapped, resumable to the byte."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _configs import tiny_config
from PIL import Image

from vsekit.cli import main
from vsekit.data.corpus import Corpus, DataError
from vsekit.data.formats.precomp import read_precomp
from vsekit.data.sources import load_split, read_folder
from vsekit.errors import ConfigError
from vsekit.features import ExtractOptions, build_backbone, extract_split
from vsekit.features.extract import eval_transform
from vsekit.models.image import PretrainedWeightsMissing
from vsekit.train.trainer import Trainer


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Seven small RGB images of different sizes and colours."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(7):
        a = rng.integers(0, 256, (40 + 3 * i, 48, 3), dtype=np.uint8)
        Image.fromarray(a).save(root / f"img{i}.png")
    return root


def _opts(**kw):
    return ExtractOptions(**{"image_size": 64, "batch_size": 2, "progress": False, "device": "cpu", **kw})


def _reference(model, corpus, opts):
    """Row i computed independently: the torchvision network itself (fc removed) on the transformed image."""
    from vsekit.data.images import load_rgb

    transform, _ = eval_transform(model, opts)
    net = model.backbone.net.eval()
    with torch.no_grad():
        return np.stack([net(transform(load_rgb(p)).unsqueeze(0))[0].numpy() for p in corpus.image_paths])


def test_global_and_grid_features_of_a_folder(photos, tmp_path):
    torch.manual_seed(0)
    model = build_backbone("resnet18", pretrained=False)
    corpus = read_folder(photos, captions=False)
    r = extract_split(corpus, model, tmp_path, "test", _opts(), captions=False)
    feats = np.load(r.path, mmap_mode="r")
    assert isinstance(feats, np.memmap) and feats.shape == (7, 512) and r.rows_computed == 7
    np.testing.assert_allclose(feats, _reference(model, corpus, _opts()), rtol=1e-5, atol=1e-5)
    assert (tmp_path / "test_ids.txt").read_text().split() == [f"img{i}.png" for i in range(7)]
    assert not (tmp_path / "test_caps.txt").exists() and not (tmp_path / "test_ims.progress.json").exists()
    read = read_precomp(tmp_path, "test")  # an images-only split: ids, no captions
    assert read.image_ids == corpus.image_ids and read.num_captions == 0 and isinstance(read.features, np.memmap)

    # grid: layer4's 2 x 2 cells at 64 px; their mean is the global feature
    r = extract_split(corpus, model, tmp_path / "grid", "test", _opts(pool="grid"), captions=False)
    grid = np.load(r.path)
    assert grid.shape == (7, 4, 512)
    np.testing.assert_allclose(grid.mean(1), feats, rtol=1e-5, atol=1e-5)
    r = extract_split(corpus, model, tmp_path / "g1", "test", _opts(pool="grid", grid=1, dtype="float16"),
                      captions=False)
    g1 = np.load(r.path)
    assert g1.shape == (7, 1, 512) and g1.dtype == np.float16
    np.testing.assert_allclose(g1[:, 0].astype(np.float32), feats, rtol=2e-3, atol=2e-3)


def test_a_killed_extraction_resumes_to_an_identical_file(photos, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_backbone("small_cnn", pretrained=False)
    corpus = read_folder(photos, captions=False)
    full = extract_split(corpus, model, tmp_path / "full", "test", _opts(pool="grid"), captions=False)
    want = full.path.read_bytes()

    calls = {"n": 0}
    real = type(model.backbone).feature_map

    def dying(self, x):
        calls["n"] += 1
        if calls["n"] == 4:  # the probe, then batches 1 and 2; killed in batch 3
            raise KeyboardInterrupt
        return real(self, x)

    monkeypatch.setattr(type(model.backbone), "feature_map", dying)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        extract_split(corpus, model, out, "test", _opts(pool="grid"), captions=False)
    assert not (out / "test_ims.npy").exists() and (out / "test_ims.partial.npy").exists()
    assert '"rows_done": 4' in (out / "test_ims.progress.json").read_text()
    monkeypatch.setattr(type(model.backbone), "feature_map", real)
    with pytest.raises(DataError, match="other settings.*pool"):  # a different setting never mixes in
        extract_split(corpus, model, out, "test", _opts(pool="global"), captions=False)
    r = extract_split(corpus, model, out, "test", _opts(pool="grid"), captions=False)
    assert r.rows_computed == 3 and r.path.read_bytes() == want
    assert sorted(p.name for p in out.iterdir()) == ["test_ids.txt", "test_ims.json", "test_ims.npy"]
    assert extract_split(corpus, model, out, "test", _opts(pool="grid"), captions=False).rows_computed == 0
    with pytest.raises(DataError, match="--restart"):
        extract_split(corpus, model, out, "test", _opts(pool="grid", grid=1), captions=False)
    r = extract_split(corpus, model, out, "test", _opts(pool="grid", grid=1), captions=False, restart=True)
    assert r.shape == (7, 1, 256)


def test_a_corrupt_image_is_an_error_naming_the_file(photos, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted(photos.iterdir())[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    good = (folder / "img1.png").read_bytes()
    (folder / "img1.png").write_bytes(good[: len(good) // 2])  # the header reads, the pixels do not
    model = build_backbone("small_cnn", pretrained=False)
    with pytest.raises(DataError, match=r"img1.png: cannot decode.*row 1 of split test.*rows done so far are kept"):
        extract_split(read_folder(folder, captions=False), model, tmp_path / "out", "test", _opts(), captions=False)
    (folder / "img2.png").write_bytes(b"not an image")
    assert main(["features", "extract", "--backbone", "small_cnn", "--images", str(folder),
                 "--out", str(tmp_path / "out2"), "--image-size", "32"]) == 2  # the header check names it first
    assert "img2.png (not a recognised image)" in capsys.readouterr().err


def test_demo_data_to_precomp_and_training_from_it(tmp_path, cache, capsys):
    out = tmp_path / "precomp"
    (tmp_path / "data.yaml").write_text("{format: demo, num_images: 40}\n")
    rc = main(["features", "extract", "--backbone", "small_cnn", "--no-pretrained", "--data", str(tmp_path / "data.yaml"),
               "--max-images", "16", "--out", str(out), "--image-size", "32", "--pool", "grid", "--grid", "2",
               "--splits", "train,val"])
    assert rc == 0
    assert "train:" in capsys.readouterr().out
    demo = load_split({"format": "demo", "num_images": 40}, "train", 16)
    corpus = read_precomp(out, "train")
    assert corpus.features.shape[:2] == (16, 4) and corpus.image_ids == demo.image_ids
    assert corpus.captions == demo.captions and np.array_equal(corpus.labels, demo.labels)
    assert (corpus.caption_to_image == demo.caption_to_image).all()
    cfg = tiny_config(tmp_path / "run", "data.format=precomp", f"data.path={out}", "data.val_max_images=8",
                      "model.embed_size=8", "model.image_encoder.name=precomp", "model.text_encoder.word_dim=4",
                      "train.batch_size=8", "train.epochs=1", "train.max_steps_per_epoch=2")
    result = Trainer(cfg).fit()
    assert np.isfinite(result["best_rsum"]) and result["history"][0]["epoch"] == 0


def test_features_from_a_vsekit_checkpoint_are_its_cnn_backbone(photos, tmp_path, cache):
    cfg = tiny_config(
        tmp_path / "run", "seed=1", "data.num_images=40", "transform.image_size=32",
        "transform.resize=32", "data.val_max_images=8", "model.embed_size=8",
        "model.image_encoder.name=cnn", "model.image_encoder.backbone=small_cnn", "model.image_encoder.width=4",
        "model.image_encoder.finetune=true", "model.text_encoder.word_dim=4", "train.batch_size=8", "train.epochs=1",
        "train.max_steps_per_epoch=1")
    t = Trainer(cfg)
    t.fit()
    model = build_backbone(f"vsekit:{tmp_path / 'run' / 'last.pt'}")
    assert model.image_size == 32
    corpus = read_folder(photos, captions=False)
    r = extract_split(corpus, model, tmp_path / "out", "test", ExtractOptions(progress=False, device="cpu"),
                      captions=False)
    from vsekit.data.images import load_rgb

    net = t.model.image_encoder.backbone.cpu().eval()
    with torch.no_grad():
        want = np.stack([net(t.cfg.transform.build(train=False)(load_rgb(p)).unsqueeze(0))[0].numpy()
                         for p in corpus.image_paths])
    np.testing.assert_allclose(np.load(r.path), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="holds its own weights"):
        build_backbone(f"vsekit:{tmp_path / 'run' / 'last.pt'}", weights="x.pt")


def test_backbone_and_weights_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PretrainedWeightsMissing, match="does not download"):
        build_backbone("resnet18")
    with pytest.raises(PretrainedWeightsMissing, match="not fetched while VSEKIT_OFFLINE is set; pass --weights FILE"):
        build_backbone("timm:test_resnet")
    with pytest.raises(ConfigError, match="unknown backbone 'resnet19'"):
        build_backbone("resnet19")
    timm = pytest.importorskip("timm")
    w = tmp_path / "t.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), w)
    model = build_backbone("timm:test_resnet", weights=str(w))
    assert model.mean == (0.5, 0.5, 0.5)  # the model's own statistics, not ImageNet's
    assert model.image_size == 160  # and its own input size (test_resnet's pretrained_cfg), not 224
    with pytest.raises(ConfigError, match="--grid needs --pool grid"):
        ExtractOptions(grid=3).check()


def test_captions_per_image_must_agree_or_be_chosen(photos, tmp_path):
    base = read_folder(photos, captions=False)
    corpus = Corpus(name="uneven", captions=["a", "b", "c", "d", "e", "f", "g", "h"],
                    caption_to_image=np.array([0, 1, 0, 2, 3, 4, 5, 6]), image_ids=base.image_ids,
                    image_paths=base.image_paths)
    model = build_backbone("small_cnn", pretrained=False)
    with pytest.raises(DataError, match="1 to 2 captions.*--captions-per-image"):
        extract_split(corpus, model, tmp_path, "train", _opts())
    r = extract_split(corpus, model, tmp_path, "train", _opts(), captions_per_image=1)
    assert r.captions == 7 and (tmp_path / "train_caps.txt").read_text().split() == list("abdefgh")
    with pytest.raises(DataError, match="has 1 captions, fewer than --captions-per-image 2"):
        extract_split(corpus, model, tmp_path / "x", "train", _opts(), captions_per_image=2)


@pytest.mark.slow
def test_pretrained_small_recipe_learns_from_extracted_features(tmp_path, cache, capsys):
    """The recipe for one's own images with a pretrained backbone, end to end as a user runs it: pooled features
    written by ``features extract --pool global``, then ``vsekit train pretrained_small`` on them; the model ranks
    validation pairs far above what random embeddings score (the features here come from a random CNN, which
    still carries the demo images' colours)."""
    import json

    import yaml

    from vsekit.eval.chance import chance_rsum

    out = tmp_path / "pooled"
    (tmp_path / "data.yaml").write_text("{format: demo, num_images: 200}\n")
    assert main(["features", "extract", "--backbone", "small_cnn", "--no-pretrained", "--data",
                 str(tmp_path / "data.yaml"), "--out", str(out), "--image-size", "32", "--pool", "global",
                 "--splits", "train,val"]) == 0
    run = tmp_path / "run"
    assert main(["train", "pretrained_small", f"data.path={out}", "data.val_max_images=40", "model.embed_size=64",
                 "model.text_encoder.word_dim=32", "train.batch_size=32", "train.epochs=6", "train.progress=false",
                 f"output_dir={run}", "seed=0"]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["image_encoder"]["name"] == "precomp" and cfg["loss"]["name"] == "infonce"
    val = read_precomp(out, "val", max_images=40)
    floor = chance_rsum(np.asarray(val.caption_to_image), 40)
    vals = [json.loads(line)["rsum"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "val"]
    assert max(vals) > 2.5 * floor, (vals, floor)  # 357 against a floor of 110 here
