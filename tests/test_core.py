"""Config resolution, tokenizer/vocabulary, registries, and every registered encoder's forward/backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vsekit.config import ConfigError, apply_overrides, resolve_config
from vsekit.models import BACKBONES, IMAGE_ENCODERS, build_model, order_sim
from vsekit.models.image import PretrainedWeightsMissing
from vsekit.models.text import load_word_vectors
from vsekit.registry import Registry
from vsekit.text import Vocabulary, tokenize


# -- config -----------------------------------------------------------------------------------------
def test_recipe_inherits_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.1, grad_clip: 2.0}\nloss: {name: hinge, margin: 0.2}\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nname: child\noptim: {lr: 0.01}\n")
    cfg = resolve_config(tmp_path / "child.yaml", ["loss.margin=0.05", "train.epochs=3", "model.use_abs=true"])
    assert (cfg.optim.lr, cfg.optim.grad_clip) == (0.01, 2.0)
    assert cfg.loss["margin"] == 0.05 and cfg.train.epochs == 3 and cfg.model.use_abs is True
    assert cfg.output_dir == "runs/child"


def test_override_typo_is_an_error():
    with pytest.raises(ConfigError, match="optim.lrr"):
        resolve_config(None, ["optim.lrr=1"])
    cfg = apply_overrides({"a": {}}, ["a.new.key=[1, 2]"])  # plain dicts: the schema decides what exists
    assert cfg["a"]["new"]["key"] == [1, 2]
    with pytest.raises(ConfigError, match=r"^a: unknown key"):
        resolve_config(cfg)
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["novalue"])
    # component sections take the options of the component they name
    cfg = resolve_config(None, ["model.image_encoder.name=cnn", "model.image_encoder.backbone=resnet18",
                                "loss.name=lseh", "loss.alpha=0.3"])
    assert cfg.model.image_encoder["backbone"] == "resnet18" and cfg.loss["alpha"] == 0.3


def test_bad_yaml_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        resolve_config(p)


def test_shipped_recipes_resolve():
    from vsekit.cli import RECIPES

    names = sorted(f.stem for f in RECIPES.glob("*.yaml"))
    assert {"vsepp_f30k_precomp", "vsepp_coco_precomp", "vsepp_f30k_resnet152_ft", "demo_vsepp"} <= set(names)
    for n in names:
        cfg = resolve_config(RECIPES / f"{n}.yaml")
        assert cfg.loss["name"] and cfg.model.embed_size > 0


# -- text -------------------------------------------------------------------------------------------
def test_tokenize():
    assert tokenize("A man's T-shirt, red!") == ["a", "man's", "t-shirt", ",", "red", "!"]


def test_tokenize_drops_invisible_characters():
    """A zero-width space or joiner inside a word does not split it; a control character separates words."""
    assert tokenize("a d\u200bog\u200d on\u00ads\ufeff") == tokenize("a dog ons")
    assert tokenize("red\x00car\x1fwheel\x7f") == ["red", "car", "wheel"]
    assert tokenize("\u200b\u200c\u200d\u2060\u00ad\ufeff\u202e") == []


def test_bounded_tokenize_is_the_head_of_the_full_one():
    import random

    rng = random.Random(0)
    words = ["dog", "a", "man's", "t-shirt", ".", ",", "\u03a3", "\u0130", "\u200b", "caf\u00e9", "x" * 40, " ", "\n"]
    for _ in range(500):
        text = "".join(rng.choice(words) for _ in range(rng.randint(0, 200)))
        n = rng.randint(1, 40)
        assert tokenize(text, n) == tokenize(text)[:n], (text, n)


def _tiny_embedder(*overrides: str):
    from vsekit.inference import Embedder

    words = ["a", "dog", "runs", "on", "the", "grass", "red", "car"]
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", *words])
    cfg = resolve_config(None, ["model.embed_size=8", "model.image_encoder={name: precomp}",
                                "model.text_encoder.word_dim=8", "device=cpu", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=len(vocab), itos=vocab.itos, feature_shape=(6,))
    return Embedder(model, vocab, cfg, device="cpu", feature_shape=(6,)), words


def test_a_million_word_caption_is_cut_cheaply_to_max_tokens(caplog):
    """text.max_tokens (default 128) bounds every caption: a caption of 1,000,000 words encodes in well under a
    second, with little memory, to the vector of its first 128 words; the cut is logged once."""
    import logging
    import time
    import tracemalloc

    emb, words = _tiny_embedder()
    assert emb.config.text.max_tokens == 128
    huge = " ".join(words[i % len(words)] for i in range(1_000_000))
    head = " ".join(huge.split(" ", 128)[:128])
    caplog.set_level(logging.WARNING, logger="vsekit.text.encoding")
    tracemalloc.start()
    start = time.perf_counter()
    vec = emb.encode_texts([huge])
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 0.5 and peak < 20 * 2**20, (seconds, peak)
    assert emb.tokenize(huge) == emb.tokenize(head) and len(emb.tokenize(head)) == 130
    np.testing.assert_allclose(vec, emb.encode_texts([head]), rtol=1e-6)
    emb.encode_texts([huge, huge + " dog"])
    assert len([r for r in caplog.records if "text.max_tokens" in r.getMessage()]) == 1
    # text.max_len, a method's own window, cuts silently
    short, _ = _tiny_embedder("text.max_len=5")
    caplog.clear()
    assert len(short.tokenize(huge)) == 7 and not caplog.records


def test_vocab_from_train_only_and_roundtrip(tmp_path):
    v = Vocabulary.build(["a red circle", "a blue circle", "a red square"], min_count=2)
    assert v.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert v.itos[4:] == ["a", "circle", "red"]  # by count, then alphabetical
    assert v.encode("a green circle") == [1, v.stoi["a"], 3, v.stoi["circle"], 2]
    assert v.encode("a red circle", max_len=1) == [1, v.stoi["a"], 2]
    assert v.decode(v.encode("a red circle")) == "a red circle"
    v.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json").itos == v.itos


# -- registries -------------------------------------------------------------------------------------
def test_registry_errors():
    r = Registry("thing")
    r.register("a")(lambda x=1: x)
    assert r.build({"name": "a", "x": 3}) == 3
    with pytest.raises(KeyError, match=r"unknown thing 'b' \(known: a\)"):
        r.build("b")
    with pytest.raises(ConfigError, match="bad options for thing 'a'"):
        r.build({"name": "a", "y": 1})
    with pytest.raises(KeyError, match="twice"):
        r.register("a")(lambda: 0)
    # validation against the factory's signature and type hints
    r.register("typed")(lambda margin=0.2, mask="diagonal": (margin, mask))
    assert r.validate({"name": "typed", "margin": "0.5"}, "loss") == {"name": "typed", "margin": 0.5}
    with pytest.raises(ConfigError, match=r"^loss.margn: unknown key; did you mean loss.margin\?"):
        r.validate({"name": "typed", "margn": 1}, "loss")
    with pytest.raises(ConfigError, match=r"^loss.name: unknown thing 'typd'; did you mean 'typed'\?"):
        r.validate({"name": "typd"}, "loss")


# a randomly initialised CLIP small enough for a CPU test (open_clip's BPE needs the full 49,408-id vocabulary)
TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                              "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}

IMAGE_SPECS = [
    ({"name": "precomp"}, (20,)),
    ({"name": "precomp", "head": "mlp"}, (20,)),
    ({"name": "precomp", "pooling": "mean"}, (5, 20)),
    ({"name": "precomp", "pooling": "max"}, (5, 20)),
    ({"name": "precomp", "pooling": "gpo"}, (5, 20)),
    ({"name": "precomp", "pooling": "flatten"}, (5, 20)),
    ({"name": "cnn", "backbone": "small_cnn", "finetune": True}, None),
    ({"name": "cnn", "backbone": "small_cnn", "finetune": True, "head": "dualpath"}, None),
    ({"name": "cnn", "backbone": "resnet18", "finetune": True}, None),
    ({"name": "cnn", "backbone": "small_cnn", "finetune": True, "head": "projector", "hidden": [12]}, None),
    ({"name": "projector", "normalize": True}, (20,)),
    ({"name": "projector", "normalize": True, "hidden": [8]}, (5, 20)),
    ({"name": "two_level", "encoder": {"name": "precomp"}}, (20,)),
    ({"name": "vse_infty"}, (5, 20)),
    ({"name": "timm", "model": "test_resnet"}, None),
    ({"name": "open_clip", "config": TINY_CLIP}, None),
    ({"name": "vsrn", "gcn_layers": 2}, (5, 20)),
    ({"name": "sgraf_regions"}, (5, 20)),
]

TEXT_SPECS = [  # (spec, precomputed text-feature size or None for tokens)
    ({"name": "gru", "word_dim": 8}, None),
    ({"name": "gru", "word_dim": 8, "bidirectional": True, "pooling": "mean"}, None),
    ({"name": "textcnn", "word_dim": 8, "width_mult": 0.03125, "blocks": [1, 1, 1, 1]}, None),
    ({"name": "bow", "hidden": [12, 10]}, None),
    ({"name": "projector", "hidden": [12]}, 9),
    ({"name": "two_level", "encoder": {"name": "gru", "word_dim": 8}}, None),
    ({"name": "bigru_gpo", "word_dim": 8}, None),
    ({"name": "bert", "config": {"vocab_size": 30, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                 "intermediate_size": 32, "max_position_embeddings": 16}}, None),
    ({"name": "open_clip", "config": TINY_CLIP}, None),
    ({"name": "sgraf_words", "word_dim": 8}, None),
]


def test_every_text_encoder_is_covered():
    from vsekit.models import TEXT_ENCODERS

    assert {s["name"] for s, _ in TEXT_SPECS} == set(TEXT_ENCODERS.names())


@pytest.mark.parametrize("spec,text_dim", TEXT_SPECS, ids=lambda x: str(x))
def test_every_text_encoder_forward_backward(spec, text_dim):
    torch.manual_seed(0)
    levels = 2 if spec["name"] == "two_level" else 1  # a two-level text side needs a two-level image side
    image = {"name": "two_level", "encoder": {"name": "precomp"}} if levels == 2 else {"name": "precomp"}
    model = build_model({"embed_size": 16, "image_encoder": image, "text_encoder": spec},
                        vocab_size=30, feature_shape=(20,), text_feature_dim=text_dim)
    text = (torch.randn(4, text_dim),) if text_dim else (torch.randint(4, 30, (4, 7)), torch.tensor([7, 3, 5, 2]))
    img, cap, sim = model(torch.randn(4, 20), *text)
    assert cap.shape == (4, 16 * levels) and sim.shape == (4, 4) and torch.isfinite(cap).all()
    sim.sum().backward()
    assert all(p.grad is not None for p in model.text_encoder.parameters() if p.requires_grad)
    assert model.reads_text_features == bool(text_dim)


def test_every_image_encoder_is_covered():
    assert {s["name"] for s, _ in IMAGE_SPECS} == set(IMAGE_ENCODERS.names())


@pytest.mark.parametrize("spec,shape", IMAGE_SPECS, ids=lambda x: str(x))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_model_forward_backward(spec, shape, bidirectional):
    torch.manual_seed(0)
    text = {"name": "gru", "word_dim": 8, "bidirectional": bidirectional}
    levels = 2 if spec["name"] == "two_level" else 1
    model = build_model({"embed_size": 16, "image_encoder": spec,
                         "text_encoder": {"name": "two_level", "encoder": text} if levels == 2 else text},
                        vocab_size=30, feature_shape=shape)
    images = torch.randn(4, *shape) if shape else torch.randn(4, 3, 32, 32)
    tokens = torch.randint(4, 30, (4, 7))
    lengths = torch.tensor([7, 3, 5, 2])
    img, cap, sim = model(images, tokens, lengths)
    assert img.shape == cap.shape == (4, 16 * levels) and sim.shape == (4, 4)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(4) * levels ** 0.5)  # each level has norm 1
    torch.testing.assert_close(cap.norm(dim=1), torch.ones(4) * levels ** 0.5)
    sim.sum().backward()
    assert all(p.grad is not None for n, p in model.text_encoder.named_parameters() if n.endswith("embed.weight"))


def test_gru_uses_last_valid_state_not_padding():
    torch.manual_seed(0)
    model = build_model({"embed_size": 8, "text_encoder": {"name": "gru", "word_dim": 4}}, vocab_size=20,
                        feature_shape=(3,))
    tok = torch.tensor([[1, 5, 6, 2, 0, 0, 0]])
    padded_more = torch.tensor([[1, 5, 6, 2, 9, 9, 9]])  # garbage after the valid length
    a = model.encode_captions(tok, torch.tensor([4]))
    b = model.encode_captions(padded_more, torch.tensor([4]))
    c = model.encode_captions(tok[:, :4], torch.tensor([4]))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_order_embeddings_are_non_negative():
    model = build_model({"embed_size": 8, "use_abs": True, "similarity": "order"}, vocab_size=20, feature_shape=(6,))
    img, cap, sim = model(torch.randn(3, 6), torch.randint(4, 20, (3, 5)), torch.tensor([5, 4, 3]))
    assert (img >= 0).all() and (cap >= 0).all()
    torch.testing.assert_close(sim, order_sim(img, cap))
    assert (sim <= 0).all()


def test_frozen_cnn_gets_no_gradients_and_keeps_bn_stats():
    torch.manual_seed(0)
    model = build_model({"embed_size": 8, "image_encoder": {"name": "cnn", "backbone": "small_cnn", "finetune": False,
                                                              "width": 4}}, vocab_size=10)
    enc = model.image_encoder
    enc.train()
    assert not enc.backbone.training
    bn = next(m for m in enc.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    enc(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in enc.backbone.parameters())
    assert enc.head.weight.grad is not None
    assert torch.equal(before, bn.running_mean)
    enc.set_finetune(True)
    enc.train()
    assert enc.backbone.training


def test_pretrained_weights_missing_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PretrainedWeightsMissing, match="does not download"):
        BACKBONES.build({"name": "resnet18", "pretrained": True})


def test_pretrained_weights_load_from_local_file(monkeypatch, tmp_path):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    ref = torchvision.models.resnet18()
    path = tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    net, dim = BACKBONES.build({"name": "resnet18", "pretrained": True})
    assert dim == 512
    torch.testing.assert_close(net.conv1.weight, ref.conv1.weight)


def test_word_vectors_file(tmp_path):
    p = tmp_path / "vec.txt"
    p.write_text("2 3\nred 1 2 3\nzzz 0 0 0\ncircle 4 5 6\n")
    w, found = load_word_vectors(p, ["<pad>", "<start>", "<end>", "<unk>", "red", "circle", "blue"], 3)
    assert found == 2
    torch.testing.assert_close(w[4], torch.tensor([1.0, 2, 3]))
    torch.testing.assert_close(w[5], torch.tensor([4.0, 5, 6]))
    p.write_text("red 1 2\n")
    from vsekit.data.corpus import DataError

    with pytest.raises(DataError, match=r"vec.txt:1"):
        load_word_vectors(p, ["<pad>", "<start>", "<end>", "<unk>", "red"], 3)


def test_switching_a_component_drops_its_options(tmp_path):
    (tmp_path / "a.yaml").write_text("loss: {name: hinge_warmup, margin: 0.2, warmup_epochs: 1}\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\nloss: {name: lseh, alpha: 0.185}\n")
    assert resolve_config(tmp_path / "b.yaml").loss == {"name": "lseh", "alpha": 0.185}
    cfg = resolve_config(tmp_path / "a.yaml", ["loss.name=infonce", "loss.temperature=0.05"])
    assert cfg.loss == {"name": "infonce", "temperature": 0.05}
    cfg = resolve_config(tmp_path / "a.yaml", ["name=other", "train.epochs=2"])  # the run name is no component
    assert cfg.name == "other" and cfg.train.epochs == 2 and cfg.loss["name"] == "hinge_warmup"
    cfg = resolve_config(tmp_path / "a.yaml", ["loss.margin=0.1"])
    assert cfg.loss == {"name": "hinge_warmup", "margin": 0.1, "warmup_epochs": 1}
