"""Encoders around timm and open_clip models with user-supplied weights: loading, freezing, the tokenizer
hook, training with vsekit's losses, and checkpoints that open without the weights file or a network."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from _configs import tiny_config
from torch.nn import functional as F

from vsekit.data.datasets import pad_tokens
from vsekit.data.images import IMAGENET_MEAN, IMAGENET_STD
from vsekit.errors import ConfigError
from vsekit.inference import Embedder
from vsekit.models import IMAGE_ENCODERS, TEXT_ENCODERS, build_model
from vsekit.models.frozen_cache import content_keys
from vsekit.models.weights import PretrainedWeightsMissing, WeightsFileError
from vsekit.train.optim import param_groups
from vsekit.train.trainer import Trainer

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                              "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _imagenet_normalised(raw: torch.Tensor) -> torch.Tensor:
    return (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


# -- timm ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights_from_a_local_file_with_its_classifier(tmp_path, no_network, suffix):
    torch.manual_seed(0)
    ref = timm.create_model("test_resnet", pretrained=False)  # with its classifier, as timm publishes them
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(ref.state_dict(), str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    enc = IMAGE_ENCODERS.build({"name": "timm", "model": "test_resnet", "weights": str(path)}, embed_size=8)
    for k, v in enc.backbone.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
    assert "fc.weight" not in enc.backbone.state_dict()
    # the pooled features are the reference model's pre-logits features, after re-normalisation
    raw = torch.rand(2, 3, 32, 32)
    ref.eval(), enc.eval()
    with torch.no_grad():
        want = ref.forward_head(ref.forward_features((raw - 0.5) / 0.5), pre_logits=True)  # test_resnet: 0.5/0.5
        got = enc.backbone(enc.renorm(_imagenet_normalised(raw)))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_timm_bad_weights_are_clear_errors(tmp_path):
    with pytest.raises(PretrainedWeightsMissing, match="no_such.pth"):
        IMAGE_ENCODERS.build({"name": "timm", "model": "test_resnet", "weights": str(tmp_path / "no_such.pth")},
                             embed_size=8)
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("test_efficientnet", pretrained=False).state_dict(), other)
    with pytest.raises(WeightsFileError, match=r"other.pth does not fit the model \(missing .*unexpected"):
        IMAGE_ENCODERS.build({"name": "timm", "model": "test_resnet", "weights": str(other)}, embed_size=8)
    pickled = tmp_path / "pickled.pth"
    torch.save({"w": torch.zeros(1), "obj": np.random.default_rng(0)}, pickled)  # needs the full unpickler
    with pytest.raises(WeightsFileError, match="pickled.pth is not a readable weights file"):
        IMAGE_ENCODERS.build({"name": "timm", "model": "test_resnet", "weights": str(pickled)}, embed_size=8)
    with pytest.raises(ValueError, match="hf-hub"):
        IMAGE_ENCODERS.build({"name": "timm", "model": "hf-hub:timm/resnet18.a1_in1k"}, embed_size=8)
    with pytest.raises(ValueError, match="did you mean 'test_resnet'"):
        IMAGE_ENCODERS.build({"name": "timm", "model": "test_resnat"}, embed_size=8)


def _renamed(state: dict, counters: bool = True) -> dict:
    """The tensors of ``state`` in its order under other names (another implementation's naming)."""
    return {f"_layer{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(state.items())
            if counters or not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("counters", [True, False])
def test_timm_weights_of_another_implementation_load_by_position(tmp_path, no_network, caplog, counters):
    from vsekit.features import build_backbone

    torch.manual_seed(0)
    ref = timm.create_model("test_efficientnet", pretrained=False).eval()  # with its classifier
    with torch.no_grad():
        for b in ref.buffers():  # batch norm statistics that are not the defaults
            if b.is_floating_point():
                b.copy_(torch.rand_like(b) + 0.5)
    path = tmp_path / "converted.pth"
    torch.save(_renamed(ref.state_dict(), counters), path)
    caplog.set_level("INFO", logger="vsekit.models")
    enc = IMAGE_ENCODERS.build({"name": "timm", "model": "test_efficientnet", "weights": str(path)}, embed_size=8)
    assert "converted.pth: parameter names differ from the model's; loaded by position" in caplog.text
    assert "classifier _layer" in caplog.text  # the file's trailing classifier was dropped, and said so
    own = enc.backbone.state_dict()
    for k, v in own.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, ref.state_dict()[k]), k
    raw = torch.rand(2, 3, 32, 32)
    enc.eval()
    with torch.no_grad():
        want = ref.forward_head(ref.forward_features((raw - 0.5) / 0.5), pre_logits=True)
        assert torch.equal(enc.backbone((raw - 0.5) / 0.5), want)  # identical outputs
        # the same file through `vsekit features extract --backbone timm:test_efficientnet --weights FILE`
        fx = build_backbone("timm:test_efficientnet", str(path))
        assert torch.equal(fx.backbone.eval().pooled((raw - 0.5) / 0.5), want)


def test_timm_weights_that_do_not_fit_by_position_are_clear_errors(tmp_path):
    torch.manual_seed(0)
    items = list(_renamed(timm.create_model("test_efficientnet", pretrained=False).state_dict()).items())
    build = {"name": "timm", "model": "test_efficientnet"}

    def refused(name: str, pairs: list, match: str) -> None:
        path = tmp_path / name
        torch.save(dict(pairs), path)
        with pytest.raises(WeightsFileError, match=match):
            IMAGE_ENCODERS.build({**build, "weights": str(path)}, embed_size=8)

    # two tensors of different shapes swapped: the first position where the shapes part is named
    swapped = items[:]
    swapped[0], swapped[1] = swapped[1], swapped[0]
    refused("swapped.pth", swapped, r"swapped.pth does not fit the model .*cannot be loaded by position either: "
                                    r"tensor 0 of the file \(_layer1.weight, shape \(\d+,\)\) does not have the shape "
                                    r"of the model's tensor 0 \(conv_stem.weight")
    refused("shuffled.pth", [items[i] for i in torch.randperm(len(items), generator=torch.Generator().manual_seed(1))],
            "shuffled.pth .* cannot be loaded by position either: tensor \\d+ of the file")
    # one tensor short, or one extra that is not a classifier: the count and the first unmatched one
    refused("short.pth", items[:-4], r"short.pth .*the file has \d+ tensors, the model \d+ \(first unmatched at "
                                     r"position \d+: the model's bn2.running_var has no tensor in the file\)")
    refused("extra.pth", items + [("_odd.weight", torch.zeros(3, 3))], r"extra.pth .*first unmatched at position "
                                                                        r"\d+: the file's extra _layer")
    # batch norm step counters that are not scalars are not copied into the model's (nor a traceback)
    odd = [(k, torch.zeros(5, dtype=torch.long) if k.endswith("num_batches_tracked") else v) for k, v in items]
    path = tmp_path / "odd_counters.pth"
    torch.save(dict(odd), path)
    enc = IMAGE_ENCODERS.build({**build, "weights": str(path)}, embed_size=8)
    assert all(v.shape == () for k, v in enc.backbone.state_dict().items() if k.endswith("num_batches_tracked"))
    # a file of another network whose shapes differ cannot pass for this one
    refused("resnet.pth", _renamed(timm.create_model("test_resnet", pretrained=False).state_dict()).items(),
            "resnet.pth .*cannot be loaded by position either")


def test_timm_finetune_false_freezes_the_backbone_and_its_batch_norm():
    torch.manual_seed(0)
    enc = IMAGE_ENCODERS.build({"name": "timm", "model": "test_resnet", "finetune": False}, embed_size=8)
    enc.train()
    bn = next(m for m in enc.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    enc(torch.randn(2, 3, 32, 32)).sum().backward()
    assert not bn.training and torch.equal(before, bn.running_mean)
    assert all(p.grad is None and not p.requires_grad for p in enc.backbone.parameters())
    assert enc.head.weight.grad is not None
    enc.set_finetune(True)
    enc.train()
    assert bn.training and all(p.requires_grad for p in enc.backbone.parameters())
    kept = IMAGE_ENCODERS.build({"name": "timm", "model": "test_resnet", "norm_eval": True}, embed_size=8).train()
    bn = next(m for m in kept.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    kept(torch.randn(2, 3, 32, 32)).sum().backward()  # fine-tuned, its statistics fixed
    assert not bn.training and torch.equal(before, bn.running_mean) and bn.weight.grad is not None
    assert kept.head.training



def test_a_frozen_image_backbone_runs_once_per_image_while_training():
    """A frozen timm model's pooled outputs are kept per image (by content) in a training run: the same
    features as without the cache, the backbone run only on images not seen before (validation's too), nothing
    kept in eval mode alone, emptied on unfreezing or loading weights, the head still learning, never above
    cache_mb."""
    torch.manual_seed(0)
    spec = {"name": "timm", "model": "test_resnet", "finetune": False}
    enc = IMAGE_ENCODERS.build(spec, embed_size=8)
    plain = IMAGE_ENCODERS.build({**spec, "cache_mb": 0}, embed_size=8)
    plain.load_state_dict(enc.state_dict())
    plain.train()
    calls = []
    enc.backbone.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    images = torch.randn(4, 3, 32, 32)
    enc.eval()
    enc(images)
    assert not enc._cache  # eval mode only (an index, a server): nothing kept
    enc.train()
    first = enc.forward_features(images)
    torch.testing.assert_close(first, plain.forward_features(images))
    again = enc.forward_features(images[[2, 0]])
    torch.testing.assert_close(again, first[[2, 0]])
    new = torch.randn(1, 3, 32, 32)
    mixed = enc.forward_features(torch.cat([images[1:2], new]))
    torch.testing.assert_close(mixed, plain.forward_features(torch.cat([images[1:2], new])))
    assert calls == [4, 4, 1]  # eval, the first batch, then only the new image
    mixed.sum().backward()  # the head learns from cached features
    assert enc.head.weight.grad is not None and all(p.grad is None for p in enc.backbone.parameters())
    enc.eval()  # validation during the run: read from the cache and kept
    enc(images[:1])
    enc(torch.randn(1, 3, 32, 32))
    assert calls == [4, 4, 1, 1] and len(enc._cache) == 6
    enc.train()
    enc.load_state_dict(plain.state_dict())
    assert not enc._cache
    enc(images)
    enc.set_finetune(True)
    assert not enc._cache
    enc(images)
    assert not enc._cache  # the backbone learns: nothing kept
    row = enc.feat_dim * 4  # one image's pooled float32s
    tiny = IMAGE_ENCODERS.build({**spec, "cache_mb": 2.5 * row / 2**20}, embed_size=8).train()
    tiny(images)
    assert len(tiny._cache) == 2 and tiny._cached == 2 * row
    with pytest.raises(ConfigError, match="image_encoder.cache_mb"):
        IMAGE_ENCODERS.build({**spec, "cache_mb": -1}, embed_size=8)
    outer = IMAGE_ENCODERS.build({"name": "two_level", "encoder": spec}, embed_size=4).train()  # GXN's wrapper
    outer(images)
    assert len(outer.inner._cache) == 4
    outer.load_state_dict(outer.state_dict())  # through the parent module, as a checkpoint loads
    assert not outer.inner._cache
    outer(images)
    outer.set_finetune(True)
    assert not outer.inner._cache
    outer(images)
    assert not outer.inner._cache


def test_content_keys_tell_rows_dtypes_and_shapes_apart():
    x = torch.randn(3, 2, 4)
    keys = content_keys(torch.cat([x, x[:1]]))
    assert keys[3] == keys[0] and len(set(keys)) == 3
    assert content_keys(x[:1].double())[0] != keys[0] and content_keys(x[:1].reshape(1, 4, 2))[0] != keys[0]
    assert len(set(content_keys(x.bfloat16()))) == 3


def test_a_run_with_a_frozen_cnn_learns_the_same_with_the_cache(tmp_path):
    """Two epochs on the demo set with a frozen CNN and images that reach it unchanged: the cached run takes
    the same steps as the uncached one, and the CNN sees each image once (never twice in a batch)."""
    runs = {}
    for cache_mb in (0, 64):
        cfg = tiny_config(
            tmp_path / str(cache_mb), "seed=3", "data.num_images=40", "data.val_max_images=8",
            "transform.image_size=32", "transform.resize=32", "transform.augment={crop: center, hflip: false}",
            "model.embed_size=16", "model.text_encoder.word_dim=8", "train.batch_size=8", "train.epochs=2",
            "train.log_every=1",
            f"model.image_encoder={{name: cnn, backbone: small_cnn, width: 4, finetune: false, cache_mb: {cache_mb}}}")
        t = Trainer(cfg.to_dict())
        calls = []
        t.model.image_encoder.backbone.register_forward_hook(lambda m, args, out, calls=calls: calls.append(args[0].shape[0]))
        t.fit()
        runs[cache_mb] = (t, calls)
    (plain, plain_calls), (cached, cached_calls) = runs[0], runs[64]
    for a, b in zip(plain.model.parameters(), cached.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # uncached: every training and validation image every epoch; cached: each image once in the run
    # uncached: an image per caption (5 each) and the validation images, every epoch; cached: each image once
    n, val = plain.train_corpus.num_images, 4
    assert plain.train_corpus.num_captions == 5 * n
    assert sum(plain_calls) == 2 * (5 * n + val) and sum(cached_calls) == n + val
    # under random crops no image repeats: the run turns the cache off rather than fill it
    crops = tiny_config(tmp_path / "crops", "data.num_images=40", "transform.image_size=32", "transform.resize=36",
                        "transform.augment={crop: random, hflip: false}",
                        "model.image_encoder={name: cnn, backbone: small_cnn, width: 4, finetune: false}")
    assert Trainer(crops.to_dict()).model.image_encoder.cache_bytes == 0
    assert cached.model.image_encoder.cache_bytes == 64 << 20


# -- open_clip -------------------------------------------------------------------------------------------
def _clip_file(tmp_path):
    torch.manual_seed(1)
    ref = open_clip.CLIP(**TINY_CLIP).eval()
    path = tmp_path / "clip.pt"
    torch.save(ref.state_dict(), path)
    return ref, path


def test_open_clip_towers_reproduce_open_clip_embeddings(tmp_path, no_network):
    ref, path = _clip_file(tmp_path)
    spec = {"name": "open_clip", "config": TINY_CLIP, "weights": str(path)}
    model = build_model({"embed_size": 16, "image_encoder": spec, "text_encoder": spec}, vocab_size=5).eval()
    assert isinstance(model.image_encoder.proj, torch.nn.Identity)  # embed_size == CLIP's embed_dim: its space
    captions = ["A red circle!", "two blue squares next to a green triangle " * 3]
    raw = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want_img = F.normalize(ref.encode_image((raw - torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1))
                                                / torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)), dim=-1)
        want_txt = F.normalize(ref.encode_text(open_clip.SimpleTokenizer(context_length=16)(captions)), dim=-1)
        got_img = model.encode_images(_imagenet_normalised(raw))
        tokens, lengths = pad_tokens([torch.tensor(model.text_encoder.tokenize(c)) for c in captions])
        got_txt = model.encode_captions(tokens, lengths)
    torch.testing.assert_close(got_img, want_img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_txt, want_txt, rtol=1e-4, atol=1e-5)
    assert not any(n.startswith("tower.visual") or "logit_scale" in n
                   for n, _ in model.text_encoder.named_parameters())


def test_open_clip_tokenize_pads_with_zero_only_and_respects_the_lengths():
    enc = TEXT_ENCODERS.build({"name": "open_clip", "config": TINY_CLIP}, vocab_size=5, embed_size=8, itos=None)
    bpe = open_clip.SimpleTokenizer(context_length=16)
    ids = enc.tokenize("a red circle!")
    assert ids[0] == bpe.sot_token_id + 1 and ids[-1] == bpe.eot_token_id + 1 and 0 not in ids
    assert [i - 1 for i in ids] == bpe("a red circle!")[0, : len(ids)].tolist()  # "!" is CLIP's id 0
    long = enc.tokenize("word " * 100)
    assert len(long) == 16 and long[-1] == bpe.eot_token_id + 1
    assert len(enc.tokenize("word " * 100, max_len=3)) == 5
    # right padding with 0 does not change a caption's embedding
    enc.eval()
    tok = torch.tensor([ids])
    with torch.no_grad():
        a = enc(tok, torch.tensor([len(ids)]))
        b = enc(F.pad(tok, (0, 16 - len(ids))), torch.tensor([len(ids)]))
    torch.testing.assert_close(a, b)


def test_open_clip_freezing_and_lr_mult_names():
    model = build_model({"embed_size": 8, "image_encoder": {"name": "open_clip", "config": TINY_CLIP, "finetune": False},
                         "text_encoder": {"name": "open_clip", "config": TINY_CLIP, "finetune": False}}, vocab_size=5)
    assert isinstance(model.text_encoder.proj, torch.nn.Linear)  # 16-d CLIP space -> embed_size 8
    img, cap, sim = model(torch.randn(2, 3, 32, 32), torch.tensor([[5, 6, 49408], [5, 49408, 0]]), torch.tensor([3, 2]))
    sim.sum().backward()
    for enc in (model.image_encoder, model.text_encoder):
        assert all(p.grad is None for p in enc.tower.parameters())
        assert enc.proj.weight.grad is not None
    groups = param_groups(model, 1e-3, {"image_encoder.tower": 0.1, "text_encoder.tower": 0.1})
    assert {g["lr_mult"] for g in groups} == {0.1, 1.0}
    with pytest.raises(ValueError, match="proj: none keeps CLIP's 16-d space"):
        IMAGE_ENCODERS.build({"name": "open_clip", "config": TINY_CLIP, "proj": "none"}, embed_size=8)
    with pytest.raises(ValueError, match="exactly one of arch"):
        IMAGE_ENCODERS.build({"name": "open_clip"}, embed_size=8)
    with pytest.raises(PretrainedWeightsMissing, match="'openai' is open_clip's pretrained tag of ViT-B-32, not a "
                                                       "file, and vsekit does not download it while VSEKIT_OFFLINE"):
        IMAGE_ENCODERS.build({"name": "open_clip", "arch": "ViT-B-32", "weights": "openai"}, embed_size=8)
    with pytest.raises(PretrainedWeightsMissing, match="no such file openaii \\(nor an open_clip pretrained tag of "
                                                       "ViT-B-32"):
        IMAGE_ENCODERS.build({"name": "open_clip", "arch": "ViT-B-32", "weights": "openaii"}, embed_size=8)


def test_open_clip_foreign_or_pickled_weights_are_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), other)
    with pytest.raises(WeightsFileError, match="other.pt cannot be loaded into this architecture"):
        TEXT_ENCODERS.build({"name": "open_clip", "config": TINY_CLIP, "weights": str(other)}, vocab_size=5,
                            embed_size=16, itos=None)
    pickled = tmp_path / "pickled.pt"
    torch.save({"obj": np.random.default_rng(0)}, pickled)
    with pytest.raises(WeightsFileError, match="pickled.pt cannot be loaded.*(Unpickling|weights_only|Weights only)"):
        IMAGE_ENCODERS.build({"name": "open_clip", "config": TINY_CLIP, "weights": str(pickled)}, embed_size=16)


def _clip_run(tmp_path, loss, weights):
    spec = {"name": "open_clip", "config": TINY_CLIP, "weights": str(weights)}
    cfg = tiny_config(
        tmp_path / loss, "seed=2", "data.num_images=60",
        "transform.image_size=32", "transform.resize=32", "data.val_max_images=10",
        "model.embed_size=16", f"loss.name={loss}", "semantics.n_components=8",
        f"semantics.cache_dir={tmp_path / 'sem'}", "train.batch_size=8", "train.epochs=1",
        "train.max_steps_per_epoch=2", "train.log_every=1", "optim.lr=1e-4").to_dict()
    cfg["model"]["image_encoder"] = dict(spec)
    cfg["model"]["text_encoder"] = dict(spec)
    return cfg


@pytest.mark.parametrize("loss", ["lseh", "infonce"])
def test_a_clip_model_fine_tunes_with_vsekit_losses_and_reopens_offline(tmp_path, cache, no_network, loss):
    ref, path = _clip_file(tmp_path)
    t = Trainer(_clip_run(tmp_path, loss, path))
    first_tokens = t.dataset[0][1].tolist()
    assert first_tokens == t.model.text_encoder.tokenize(t.train_corpus.captions[0])  # the hook, not the vocab
    t.fit()
    assert t.step == 2
    moved = t.model.image_encoder.tower.conv1.weight.detach().cpu()
    assert not torch.equal(moved, ref.visual.conv1.weight)  # the tower was trained, from the file's weights
    path.unlink()  # the checkpoint opens without the initial weights file
    emb = Embedder.from_checkpoint(tmp_path / loss / "last.pt", device="cpu")
    assert torch.equal(emb.model.image_encoder.tower.conv1.weight, moved)
    assert emb.tokenize("a red circle") == t.model.text_encoder.tokenize("a red circle")
    t.model.eval()
    with torch.no_grad():
        tokens, lengths = pad_tokens([torch.tensor(t.model.text_encoder.tokenize("a red circle"))])
        want = t.model.encode_captions(tokens.to(t.device), lengths).cpu().numpy()
    np.testing.assert_allclose(emb.encode_texts(["a red circle"]), want, rtol=1e-5, atol=1e-6)


def test_rebuilding_a_checkpoint_reads_no_initial_weights_file(tmp_path, monkeypatch):
    from vsekit.models.weights import restoring_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no torchvision weights in this hub cache
    specs = [{"name": "cnn", "backbone": "resnet18", "pretrained": True},
             {"name": "timm", "model": "test_resnet", "weights": str(tmp_path / "gone.safetensors")},
             {"name": "open_clip", "config": TINY_CLIP, "weights": str(tmp_path / "gone.pt")}]
    for spec in specs:
        with pytest.raises(PretrainedWeightsMissing):
            IMAGE_ENCODERS.build(spec, embed_size=16)
        with restoring_weights():  # what Embedder.from_checkpoint and --resume do: the checkpoint's weights follow
            assert IMAGE_ENCODERS.build(spec, embed_size=16) is not None
