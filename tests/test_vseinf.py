"""VSE-infinity: GPO against a loop over its formula, the region / bi-GRU / BERT encoders, the tokenize hook
of an encoder with its own tokenizer (training run and Embedder), checkpoints, recipes, the lr schedule."""

from __future__ import annotations

import math
import socket

import pytest
import torch
from _configs import tiny_config

from vsekit.config import resolve_config
from vsekit.errors import ConfigError
from vsekit.losses import build_loss
from vsekit.models import build_model
from vsekit.models.gpo import GPO

TINY_BERT = {"vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 32}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# -- GPO ----------------------------------------------------------------------------------------------
def reference_gpo(gpo: GPO, x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, list[list[float]]]:
    """The formula, one sample and one dimension at a time: theta = softmax(linear(biGRU(pe(0..L-1))) / 0.1)
    on an unpacked single sequence, pooled_d = sum_k theta_k * (values of dimension d sorted descending)_k."""
    d_pe, hidden = gpo.d_pe, gpo.gru.hidden_size
    out, all_w = torch.zeros(x.shape[0], x.shape[2]), []
    for b, n in enumerate(lengths):
        pe = torch.tensor([[math.sin(k / 10000 ** (i / d_pe)) if i % 2 == 0 else math.cos(k / 10000 ** ((i - 1) / d_pe))
                            for i in range(d_pe)] for k in range(n)])
        h, _ = gpo.gru(pe.unsqueeze(0))
        scores = gpo.linear((h[0, :, :hidden] + h[0, :, hidden:]) / 2)[:, 0]
        w = torch.softmax(scores / 0.1, 0).tolist()
        all_w.append(w)
        for d in range(x.shape[2]):
            values = sorted(x[b, :n, d].tolist(), reverse=True)
            out[b, d] = sum(w[k] * values[k] for k in range(n))
    return out, all_w


def test_gpo_matches_loop_reference_with_variable_lengths():
    torch.manual_seed(0)
    gpo = GPO()
    lengths = [5, 1, 3, 5, 2]
    x = torch.randn(5, 7, 6) * 3  # padded to 7: rows past each length are garbage
    with torch.no_grad():
        pooled, weights = gpo(x, torch.tensor(lengths))
        ref, ref_w = reference_gpo(gpo, x, lengths)
    torch.testing.assert_close(pooled, ref, atol=1e-5, rtol=1e-5)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(weights[b, :n], torch.tensor(ref_w[b]), atol=1e-6, rtol=1e-5)
        assert (weights[b, n:] == 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(5))
    torch.testing.assert_close(pooled[1], x[1, 0])  # a set of one: that vector


def test_gpo_padding_and_batch_never_change_a_sample():
    torch.manual_seed(1)
    gpo = GPO()
    x = torch.randn(3, 4, 5)
    lengths = torch.tensor([4, 2, 3])
    pooled, weights = gpo(x, lengths)
    longer = torch.cat([x, torch.full((3, 6, 5), 1e4)], 1)  # more padding, of huge values
    p2, w2 = gpo(longer, lengths)
    torch.testing.assert_close(p2, pooled)
    torch.testing.assert_close(w2[:, :4], weights)
    alone, _ = gpo(x[1:2, :2], torch.tensor([2]))  # the sample by itself, unpadded
    torch.testing.assert_close(alone[0], pooled[1])
    same = gpo(x, None)[0]  # no lengths: every row counts
    torch.testing.assert_close(same, gpo(x, torch.tensor([4, 4, 4]))[0])
    with pytest.raises(ValueError, match="length"):
        gpo(x, torch.tensor([4, 0, 3]))


def test_gpo_flat_scores_are_mean_pooling_and_permutation_invariant():
    gpo = GPO()
    torch.nn.init.zeros_(gpo.linear.weight)  # every rank scores 0: uniform weights
    x = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [5.0, 4.0]]])
    pooled, weights = gpo(x, torch.tensor([2]))
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.5, 0.0]]))
    torch.testing.assert_close(pooled, torch.tensor([[2.0, -1.0]]))  # mean of the first two rows
    torch.manual_seed(2)
    gpo = GPO()
    x = torch.randn(2, 6, 3)
    perm = torch.randperm(6)
    torch.testing.assert_close(gpo(x[:, perm])[0], gpo(x)[0])  # a set: the order of its elements is no input


def test_gpo_gradients_reach_values_and_weights():
    torch.manual_seed(3)
    gpo = GPO()
    x = torch.randn(3, 5, 4, requires_grad=True)
    pooled, _ = gpo(x, torch.tensor([5, 2, 4]))
    pooled.sum().backward()
    assert x.grad[1, 2:].abs().sum() == 0  # padding gets no gradient
    assert x.grad[1, :2].abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpo.parameters())


# -- image encoder ------------------------------------------------------------------------------------
def _image_encoder(drop: float = 0.2, img_dim: int = 12, embed: int = 8):
    torch.manual_seed(0)
    model = build_model({"embed_size": embed, "image_encoder": {"name": "vse_infty", "drop_regions": drop},
                         "text_encoder": {"name": "bigru_gpo", "word_dim": 6}}, vocab_size=20,
                        feature_shape=(6, img_dim))
    return model, model.image_encoder


def test_vse_infty_image_shapes_context_and_gradients():
    model, enc = _image_encoder()
    feats = torch.randn(4, 6, 12)
    pooled, regions = enc.forward_parts(feats)
    assert pooled.shape == (4, 8) and regions.shape == (4, 6, 8)
    emb = model.encode_images(feats)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    emb.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())
    with pytest.raises(ConfigError, match="region features"):
        build_model({"embed_size": 8, "image_encoder": {"name": "vse_infty"}}, vocab_size=20, feature_shape=(12,))


def test_vse_infty_eval_uses_every_region_and_is_fc_plus_mlp():
    _, enc = _image_encoder()
    enc.eval()
    feats = torch.randn(3, 6, 12)
    pooled, regions = enc.forward_parts(feats)
    head = enc.head
    flat = feats.reshape(-1, 12)
    by_hand = head.skip(flat) + head.fc2(torch.relu(head.bn(head.fc1(flat))))  # fc(x) + mlp(x)
    torch.testing.assert_close(regions, by_hand.reshape(3, 6, 8))
    torch.testing.assert_close(pooled, enc.gpo(regions)[0])
    torch.testing.assert_close(enc.forward_parts(feats)[0], pooled)  # no randomness in eval


def test_vse_infty_drops_regions_in_training_only_reproducibly():
    _, enc = _image_encoder(drop=0.2)
    enc.train()
    feats = torch.randn(4, 6, 12)
    torch.manual_seed(5)
    keep = enc.kept_regions(4, 6, feats.device)
    torch.manual_seed(5)
    pooled, regions = enc.forward_parts(feats)
    assert (regions[~keep] == 0).all() and (regions[keep] != 0).any()
    # dropped regions are absent: batch norm over the kept regions only, GPO over each sample's kept set
    kept = enc.head(feats[keep])
    start = 0
    for b in range(4):
        n = int(keep[b].sum())
        torch.testing.assert_close(pooled[b], enc.gpo(kept[start:start + n].unsqueeze(0))[0][0])
        start += n
    torch.manual_seed(5)
    torch.testing.assert_close(enc.forward_parts(feats)[0], pooled)  # same seed, same draw
    many = enc.kept_regions(2000, 6, feats.device)
    assert abs(1 - many.float().mean().item() - 0.2) < 0.02
    _, greedy = _image_encoder(drop=0.95)
    greedy.train()
    assert greedy.kept_regions(500, 6, feats.device).any(1).all()  # a sample keeps at least one region
    _, off = _image_encoder(drop=0.0)
    off.train()
    assert off.kept_regions(4, 6, feats.device) is None


# -- bi-GRU + GPO text encoder ------------------------------------------------------------------------
def test_bigru_gpo_pools_word_states_and_ignores_padding():
    torch.manual_seed(0)
    model = build_model({"embed_size": 8, "image_encoder": {"name": "vse_infty"},
                         "text_encoder": {"name": "bigru_gpo", "word_dim": 6}}, vocab_size=20, feature_shape=(6, 12))
    enc = model.text_encoder
    tokens = torch.tensor([[1, 5, 6, 7, 2], [1, 9, 2, 0, 0]])
    lengths = torch.tensor([5, 3])
    pooled, words = enc.forward_parts(tokens, lengths)
    assert pooled.shape == (2, 8) and words.shape == (2, 5, 8)
    # the two directions averaged at every word, then GPO
    out, _ = enc.rnn(enc.embed(tokens[1:, :3]))
    torch.testing.assert_close(words[1, :3], (out[0, :, :8] + out[0, :, 8:]) / 2)
    torch.testing.assert_close(pooled, enc.gpo(words, lengths)[0])
    garbage = tokens.clone()
    garbage[1, 3:] = 13
    torch.testing.assert_close(enc.forward_parts(garbage, lengths)[0], pooled)
    cap = model.encode_captions(tokens, lengths)
    torch.testing.assert_close(cap.norm(dim=1), torch.ones(2))
    cap.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())


def test_bigru_gpo_loads_word_vectors(tmp_path):
    (tmp_path / "vec.txt").write_text("red 1 2 3\n")
    enc = build_model({"embed_size": 4, "text_encoder": {"name": "bigru_gpo", "word_dim": 3,
                                                         "word_vectors": str(tmp_path / "vec.txt")}},
                      vocab_size=5, itos=["<pad>", "<start>", "<end>", "<unk>", "red"], feature_shape=(3,)).text_encoder
    torch.testing.assert_close(enc.embed.weight[4], torch.tensor([1.0, 2.0, 3.0]))


# -- BERT ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def words(cache):
    """Word pieces of a tiny BERT vocabulary: the demo captions' words (most frequent first)."""
    from collections import Counter

    from vsekit.data.sources import DemoData

    corpus = DemoData(num_images=120).read("train", None)  # the tiny run's set: built once
    counts = Counter(w for c in corpus.captions for w in c.lower().replace(".", " ").split())
    return [w for w, _ in counts.most_common(TINY_BERT["vocab_size"] - len(SPECIALS) - 1)] + ["##s"]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory, words):
    path = tmp_path_factory.mktemp("bert-vocab") / "vocab.txt"
    path.write_text("\n".join(SPECIALS + words) + "\n")
    return path


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory, vocab_file):
    """A local 'pretrained' BERT folder: config.json, model.safetensors, vocab.txt (random tiny weights)."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(11)
    BertModel(BertConfig(**TINY_BERT), add_pooling_layer=False).save_pretrained(folder)
    (folder / "vocab.txt").write_text(vocab_file.read_text())
    return folder


@pytest.fixture()
def offline(monkeypatch):
    """No network: any socket connection fails the test, and the hub is told to stay offline."""
    def refuse(*a, **k):
        raise AssertionError("vsekit tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _bert_model(**text):
    torch.manual_seed(0)
    return build_model({"embed_size": 8, "image_encoder": {"name": "vse_infty"},
                        "text_encoder": {"name": "bert", **text}}, vocab_size=7, feature_shape=(6, 12))


def test_bert_forward_backward_masks_padding(offline):
    model = _bert_model(config=TINY_BERT)
    enc = model.text_encoder
    tokens = torch.tensor([[2, 7, 8, 9, 3], [2, 10, 3, 0, 0]])
    lengths = torch.tensor([5, 3])
    img, cap, sim = model(torch.randn(2, 6, 12), tokens, lengths)
    assert cap.shape == (2, 8) and sim.shape == (2, 2)
    torch.testing.assert_close(cap.norm(dim=1), torch.ones(2))
    sim.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())
    enc.eval()  # no dropout: garbage past a caption's length changes nothing
    garbage = tokens.clone()
    garbage[1, 3:] = 20
    with torch.no_grad():
        a = model.encode_captions(tokens, lengths)
        torch.testing.assert_close(model.encode_captions(garbage, lengths), a)
        torch.testing.assert_close(model.encode_captions(tokens[1:, :3], lengths[1:]), a[1:])
        pooled, words = enc.forward_parts(tokens, lengths)
        torch.testing.assert_close(pooled, enc.gpo(words, lengths)[0])


def test_fixed_bert_outputs_are_cached_per_caption_while_training(offline):
    """A fixed BERT runs once per caption in a training run: same outputs as without the cache, BERT called
    only for captions not seen before (validation's in eval mode too), nothing kept by a model only used in
    eval mode, the cache emptied when BERT is unfrozen or its weights are loaded, and never above cache_mb."""
    model = _bert_model(config=TINY_BERT, finetune=False)
    enc = model.text_encoder.eval()
    enc.forward_parts(torch.tensor([[2, 14, 3]]), torch.tensor([3]))
    assert not enc._cache  # eval mode only (an index, a server): nothing kept
    enc.train()
    plain = _bert_model(config=TINY_BERT, finetune=False, cache_mb=0).text_encoder.train()
    calls = []
    enc.bert.register_forward_hook(lambda m, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape)),
                                   with_kwargs=True)
    tokens = torch.tensor([[2, 7, 8, 9, 3], [2, 10, 3, 0, 0], [2, 11, 12, 3, 0]])
    lengths = torch.tensor([5, 3, 4])
    first = enc.forward_parts(tokens, lengths)
    again = enc.forward_parts(tokens[[2, 0]], lengths[[2, 0]])  # both seen: BERT not called
    mixed = enc.forward_parts(torch.tensor([[2, 13, 3, 0], [2, 10, 3, 0]]), torch.tensor([3, 3]))
    # the first batch, one call per caption length (no padding), then only the new caption of the third
    assert sorted(calls[:3]) == [(1, 3), (1, 4), (1, 5)] and calls[3:] == [(1, 3)]
    for (pooled, words), (p2, w2), rows in ((first, plain.forward_parts(tokens, lengths), slice(None)),
                                            (again, first, [2, 0])):
        torch.testing.assert_close(pooled, p2[rows])
        for i, n in enumerate(lengths[rows].tolist()):
            torch.testing.assert_close(words[i, :n], w2[rows][i, :n])
    torch.testing.assert_close(mixed[0][1], first[0][1])  # a cached caption beside a new one, unchanged
    assert enc.proj.weight.requires_grad and first[0].requires_grad  # the head still learns through it
    assert len(enc._cache) == 4
    enc.eval()  # validation during the run: its captions are kept too
    enc.forward_parts(torch.tensor([[2, 14, 3]]), torch.tensor([3]))
    enc.forward_parts(torch.tensor([[2, 14, 3]]), torch.tensor([3]))
    assert len(enc._cache) == 5 and len(calls) == 5
    enc.train()
    enc.load_state_dict(plain.state_dict())
    assert not enc._cache
    enc.forward_parts(tokens, lengths)
    enc.set_finetune(True)
    assert not enc._cache and enc.bert.embeddings.word_embeddings.weight.requires_grad
    enc.forward_parts(tokens, lengths)
    assert not enc._cache  # BERT learns: nothing cached
    tiny = _bert_model(config=TINY_BERT, finetune=False, cache_mb=5 * 32 * 4 / 2**20).text_encoder.train()
    tiny.forward_parts(tokens, lengths)  # room for the first caption's 5 x 32 floats only
    assert len(tiny._cache) == 1 and tiny._cached == 5 * 32 * 4
    with pytest.raises(ConfigError, match="cache_mb"):
        _bert_model(config=TINY_BERT, cache_mb=-1)


def test_bert_top_layers_learn_above_a_cached_fixed_part(offline):
    """train_top_layers: the top layers learn while the embeddings and the layers below stay fixed and cached
    per caption: the same outputs as the whole BERT (eval mode), in any batch, gradients only where they learn,
    the lower part run once per caption, the top layers every step, and a bad count a config error."""
    torch.manual_seed(0)
    whole = _bert_model(config=TINY_BERT, cache_mb=0).text_encoder.eval()
    split = _bert_model(config=TINY_BERT, finetune=False, train_top_layers=1).text_encoder
    assert len(split.bert.encoder.layer) == 1 and len(split.top) == 1
    assert any(k.startswith("top.0.attention") for k in split.state_dict())
    tokens = torch.tensor([[2, 7, 8, 9, 3], [2, 10, 3, 0, 0], [2, 11, 12, 3, 0], [2, 13, 3, 0, 0]])
    lengths = torch.tensor([5, 3, 4, 3])
    split.eval()
    with torch.no_grad():
        ref, ref_words = whole.forward_parts(tokens, lengths)
        got, words = split.forward_parts(tokens, lengths)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        for i, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(words[i, :n], ref_words[i, :n], atol=1e-5, rtol=1e-5)
            alone = split.forward_parts(tokens[i:i + 1, :n], lengths[i:i + 1])[0]
            torch.testing.assert_close(alone, got[i:i + 1], atol=1e-5, rtol=1e-5)
    calls = []
    split.bert.register_forward_hook(lambda m, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape)),
                                     with_kwargs=True)
    top_calls = []
    split.top[0].register_forward_hook(lambda m, args, out: top_calls.append(tuple(args[0].shape)))
    split.train()
    for _ in range(2):
        pooled, _ = split.forward_parts(tokens, lengths)
        pooled.pow(2).sum().backward()
    assert sorted(calls) == [(1, 4), (1, 5), (2, 3)]  # the lower part once per caption, by length...
    assert len(split._cache) == 4 and sorted(top_calls) == sorted([(2, 3, 32), (1, 4, 32), (1, 5, 32)] * 2)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in split.top.parameters())  # ...the top learns
    assert all(not p.requires_grad and p.grad is None for p in split.bert.parameters())
    split.set_finetune(True)  # everything learns: nothing cached, gradients reach the embeddings
    split.forward_parts(tokens, lengths)[0].sum().backward()
    assert not split._cache and split.bert.embeddings.word_embeddings.weight.grad is not None
    for bad in (3, -1, 1.5):
        with pytest.raises(ConfigError, match="train_top_layers"):
            _bert_model(config=TINY_BERT, train_top_layers=bad)
    whole_top = _bert_model(config=TINY_BERT, train_top_layers=2).text_encoder  # every layer: embeddings cached
    assert len(whole_top.bert.encoder.layer) == 0 and len(whole_top.top) == 2


def test_bert_lr_mult_prefix_names_exactly_bert(offline):
    from vsekit.train.optim import param_groups

    model = _bert_model(config=TINY_BERT)
    groups = {g["lr_mult"]: g for g in param_groups(model, 1e-3, {"text_encoder.bert": 0.1})}
    bert = {id(p) for p in model.text_encoder.bert.parameters()}
    assert {id(p) for p in groups[0.1]["params"]} == bert
    assert groups[0.1]["lr"] == pytest.approx(1e-4)
    assert not bert & {id(p) for p in groups[1.0]["params"]}


def test_bert_from_local_folder_and_tokenizer(offline, bert_folder, vocab_file):
    from safetensors.torch import load_file

    enc = _bert_model(pretrained=str(bert_folder)).text_encoder
    saved = load_file(bert_folder / "model.safetensors")
    state = enc.bert.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items() if k in state)
    pieces = vocab_file.read_text().split()
    word = next(w for w in pieces[len(SPECIALS):] if w.isalpha() and w + "s" not in pieces)
    caption = f"{word.upper()} {word}s zzzq"
    ids = enc.tokenize(caption)
    assert [pieces[i] for i in ids] == ["[CLS]", word, word, "##s", "[UNK]", "[SEP]"]  # lower-cased word pieces
    assert len(enc.tokenize("a " * 100, max_len=4)) == 6  # [CLS] + 4 pieces + [SEP]
    assert len(enc.tokenize("a " * 100)) == TINY_BERT["max_position_embeddings"]
    same = _bert_model(config=TINY_BERT, tokenizer=str(vocab_file)).text_encoder
    assert same.tokenize(caption) == ids
    assert same.tokenize is not None


def test_bert_captions_are_bounded_cheaply_and_invisible_ones_have_no_words(offline, vocab_file):
    """A caption of a million words reaches BERT's tokenizer as a prefix cut at a space: the same pieces as the
    caption's first ones, fast. A caption of only zero-width / control characters has no known words."""
    import time

    from vsekit.text.encoding import CaptionEncoder

    enc = _bert_model(config=TINY_BERT, tokenizer=str(vocab_file)).text_encoder
    pieces = vocab_file.read_text().split()
    words = [w for w in pieces[len(SPECIALS):] if w.isalpha()][:5]
    huge = " ".join(words[i % 5] for i in range(1_000_000))
    start = time.perf_counter()
    ids = enc.tokenize(huge)
    assert time.perf_counter() - start < 0.5
    assert ids == enc.tokenize(" ".join(huge.split(" ", 40)[:40]))
    encode = CaptionEncoder(None, enc.tokenize, max_len=None, max_tokens=5)
    assert encode(huge) == ids[:6] + ids[-1:] and encode.known_words(huge) == 5
    assert encode.known_words("\u200b\u200d\ufeff \x00\x1f") == 0
    assert encode.known_words("zzzq qqqz") == 0  # only [UNK]
    assert encode.known_words(f"\u200b{words[0]}\u200b") == 1


def test_bert_errors_are_config_errors(tmp_path, offline, vocab_file):
    with pytest.raises(ConfigError, match=r"model\.text_encoder\.pretrained: no such folder .*config\.json"):
        _bert_model(pretrained=str(tmp_path / "missing"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"model\.text_encoder\.pretrained: .*half has no weights"):
        _bert_model(pretrained=str(tmp_path / "half"))
    with pytest.raises(ConfigError, match=r"model\.text_encoder\.pretrained: not set"):
        _bert_model()
    with pytest.raises(ConfigError, match=r"model\.text_encoder\.config\.hiden_size: not a BertConfig field; "
                                          r"did you mean 'hidden_size'"):
        _bert_model(config={"hiden_size": 32})
    with pytest.raises(ConfigError, match=r"model\.text_encoder\.tokenizer: this BERT was built from config"):
        _bert_model(config=TINY_BERT).text_encoder.tokenize("a red circle")
    with pytest.raises(ConfigError, match=r"model\.text_encoder\.tokenizer: no such file"):
        _bert_model(config=TINY_BERT, tokenizer=str(tmp_path / "nope.txt"))
    with pytest.raises(ConfigError, match=r"word pieces, but the model embeds only 30"):
        _bert_model(config={**TINY_BERT, "vocab_size": 30}, tokenizer=str(vocab_file))
    bad = tmp_path / "pad1.txt"
    bad.write_text("\n".join(["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
    with pytest.raises(ConfigError, match="padding id is 1"):
        _bert_model(config=TINY_BERT, tokenizer=str(bad))


MINI_BERT = {**TINY_BERT, "hidden_size": 24, "num_hidden_layers": 3, "num_attention_heads": 3,
             "intermediate_size": 48}  # MiniLM's shape in small: another hidden size and depth than TINY_BERT
ST_MODULES = [{"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
              {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]


def _sentence_transformers_folder(root, vocab_file, inner: str, modules: bool):
    """A sentence-transformers folder as all-MiniLM-L6-v2 ships it (``inner=""``: the BERT at the top, with
    modules.json and 1_Pooling/) or as older ones do (the BERT in ``0_Transformer/``)."""
    import json

    from transformers import BertConfig, BertModel

    torch.manual_seed(5)
    bert = root / inner if inner else root
    BertModel(BertConfig(**MINI_BERT)).save_pretrained(bert)  # with its pooler, as MiniLM's file has it
    (bert / "vocab.txt").write_text(vocab_file.read_text())
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 24}')
    if modules:
        transformer = {"idx": 0, "name": "0", "path": inner, "type": "sentence_transformers.models.Transformer"}
        (root / "modules.json").write_text(json.dumps([transformer, *ST_MODULES]))
    return bert


@pytest.mark.parametrize("inner, modules", [("", True), ("0_Transformer", True), ("0_Transformer", False)])
def test_bert_reads_minilm_shaped_sentence_transformers_folders(tmp_path, offline, vocab_file, inner, modules):
    from safetensors.torch import load_file

    bert = _sentence_transformers_folder(tmp_path, vocab_file, inner, modules)
    enc = _bert_model(pretrained=str(tmp_path)).text_encoder
    assert enc.proj.in_features == 24 and len(enc.bert.encoder.layer) == 3  # read from the folder's config
    state = enc.bert.state_dict()
    saved = {k: v for k, v in load_file(bert / "model.safetensors").items() if not k.startswith("pooler.")}
    assert saved.keys() <= state.keys() and all(torch.equal(state[k], v) for k, v in saved.items())
    pieces = vocab_file.read_text().split()
    word = pieces[len(SPECIALS)]
    assert [pieces[i] for i in enc.tokenize(word)] == ["[CLS]", word, "[SEP]"]  # the folder's tokenizer
    enc.eval()
    ids = torch.tensor([enc.tokenize(f"{word} {word}")])
    with torch.no_grad():
        out = enc(ids, torch.tensor([ids.shape[1]]))
    assert out.shape == (1, 8) and torch.isfinite(out).all()


def test_bert_folders_that_do_not_hold_a_usable_transformer_are_config_errors(tmp_path, offline, vocab_file):
    import json

    from transformers import BertConfig, BertModel

    def refused(name: str, modules, match: str) -> None:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "modules.json").write_text(modules if isinstance(modules, str) else json.dumps(modules))
        with pytest.raises(ConfigError, match=match):
            _bert_model(pretrained=str(folder))

    refused("no_transformer", ST_MODULES, r"modules\.json lists no Transformer module \(types: "
                                          r"sentence_transformers\.models\.Pooling")
    refused("outside", [{"path": "../elsewhere", "type": "sentence_transformers.models.Transformer"}],
            r"the Transformer module's path '\.\./elsewhere' leaves the folder")
    refused("garbage", "{not json", r"modules\.json is not a sentence-transformers module list")
    # weights that do not fit the folder's config: an error, not layers left at random initialisation
    folder = tmp_path / "fewer_layers"
    BertModel(BertConfig(**{**MINI_BERT, "num_hidden_layers": 2})).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    (folder / "vocab.txt").write_text(vocab_file.read_text())
    with pytest.raises(ConfigError, match=r"fewer_layers: the weights do not fit its config\.json \(no weights for "
                                          r"encoder\.layer\.2\."):
        _bert_model(pretrained=str(folder))
    (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 10}))
    with pytest.raises(ConfigError, match=r"fewer_layers: the weights do not fit its config\.json \(a tensor of "
                                          r"another shape"):
        _bert_model(pretrained=str(folder))


def _tiny_run_cfg(out, bert_folder, *extra):
    return tiny_config(
        out, "seed=4", "data.regions=grid", "data.num_images=120",
        "data.val_max_images=20", "model.embed_size=16", "model.image_encoder.name=vse_infty",
        "model.text_encoder.name=bert", f"model.text_encoder.pretrained={bert_folder}",
        "optim.name=adamw", "optim.lr=1e-3", "optim.lr_mult={text_encoder.bert: 0.1}",
        "train.batch_size=16", "train.epochs=1", "train.max_steps_per_epoch=3",
        "loss.name=hinge_warmup", *extra)


@pytest.mark.parametrize("extra", [(), ("model.text_encoder.finetune=false", "model.text_encoder.train_top_layers=1",
                                          "optim.lr_mult={text_encoder.top: 0.1}")], ids=["whole", "top_layer"])
def test_tokenize_hook_in_training_run_embedder_and_checkpoint(tmp_path, cache, offline, bert_folder, extra):
    from vsekit.inference import Embedder
    from vsekit.train.trainer import Trainer

    trainer = Trainer(_tiny_run_cfg(tmp_path / "run", bert_folder, *extra))
    run = trainer.run
    tokenize = run.model.text_encoder.tokenize
    captions = list(run.train_corpus.captions[:6])
    for j, c in enumerate(captions):
        assert run.dataset.text(j).tolist() == tokenize(c, None)  # the run's text source: BERT's word pieces
    assert run.dataset.text(0).tolist() != run.vocab.encode(captions[0])
    trainer.fit()

    emb = Embedder.from_checkpoint(tmp_path / "run" / "last.pt", device="cpu")
    assert emb.tokenize(captions[0]) == tokenize(captions[0], None)
    model = trainer.model.eval()
    with torch.no_grad():
        ids = [torch.tensor(tokenize(c, None)) for c in captions]
        lengths = torch.tensor([len(i) for i in ids])
        tokens = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True)
        direct = model.encode_captions(tokens, lengths).numpy()
    got = emb.encode_texts(captions, batch_size=4)
    assert got.shape == (6, 16)
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(direct), atol=1e-5, rtol=1e-5)
    state = {k: v for k, v in trainer.model.state_dict().items()}
    assert all(torch.equal(state[k].cpu(), v.cpu()) for k, v in emb.model.state_dict().items())


def test_vocabulary_path_unchanged_without_hook(tmp_path, cache):
    from vsekit.train.run import build_run

    cfg = resolve_config(None, [f"output_dir={tmp_path}", "data.format=demo", "data.regions=grid",
                                "data.num_images=120", "text.min_count=1", "model.embed_size=8",
                                "model.image_encoder.name=vse_infty", "model.text_encoder.name=bigru_gpo"])
    run = build_run(cfg)
    assert run.model.text_encoder.tokenize is None
    assert run.dataset.text(3).tolist() == run.vocab.encode(run.train_corpus.captions[3])


# -- every ranking loss on the VSE-infinity network ---------------------------------------------------
@pytest.mark.parametrize("loss", [{"name": "lseh"}, {"name": "hinge", "reduction": "max"},
                                  {"name": "hinge_warmup", "warmup_epochs": 1}, {"name": "infonce"}])
def test_every_ranking_loss_backpropagates_through_vse_infty(loss):
    model, enc = _image_encoder()
    gen = torch.Generator().manual_seed(9)
    images = torch.randn(6, 6, 12, generator=gen)
    tokens = torch.randint(4, 20, (6, 5), generator=gen)
    out = model.embed(images, (tokens, torch.tensor([5, 4, 3, 5, 2, 4])))
    loss_fn = build_loss(loss)
    loss_fn.set_epoch(0)
    extra = {"caption_vectors": torch.randn(6, 10, generator=gen)} if loss_fn.requires_caption_vectors else {}
    value = loss_fn(out.sim, torch.tensor([0, 1, 1, 2, 3, 4]), **extra)
    assert value.ndim == 0 and torch.isfinite(value) and value > 0
    value.backward()
    for part in (enc.head, enc.gpo, model.text_encoder.gpo, model.text_encoder.rnn):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in part.parameters())
    assert out.image_context.shape == (6, 6, 8) and out.caption_context.shape == (6, 5, 8)


# -- schedule and recipes -----------------------------------------------------------------------------
def test_lr_milestones_decay_at_each_and_step_period_still_works():
    from vsekit.config.schema import OptimConfig
    from vsekit.train.optim import build_scheduler

    def lrs(cfg, epochs):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        sched, out = build_scheduler(opt, cfg), []
        for _ in range(epochs):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    got = lrs(OptimConfig(lr=8e-4, lr_decay_every=None, lr_milestones=[20, 10]), 30)  # LSEH's VSE-infinity
    assert got[:10] == pytest.approx([8e-4] * 10)
    assert got[10:20] == pytest.approx([8e-5] * 10)
    assert got[20:] == pytest.approx([8e-6] * 10)
    got = lrs(OptimConfig(lr=5e-4, lr_decay_every=15), 31)  # the old key: every 15 epochs
    assert (got[14], got[15], got[29], got[30]) == pytest.approx((5e-4, 5e-5, 5e-5, 5e-6))
    with pytest.raises(ValueError, match="not both"):
        OptimConfig(lr_decay_every=15, lr_milestones=[15])


VSEINF_RECIPES = ["vseinf_f30k_precomp", "vseinf_coco_precomp", "vseinf_bert_f30k_precomp",
                  "vseinf_bert_coco_precomp", "vseinf_lseh_f30k_precomp", "vseinf_lseh_coco_precomp",
                  "vseinf_lseh_iapr_precomp", "vseinf_demo"]


def test_recipes_resolve_and_say_which_setting_is_which(offline):
    from vsekit.cli import RECIPES

    cfgs = {n: resolve_config(RECIPES / f"{n}.yaml") for n in VSEINF_RECIPES}
    for n, c in cfgs.items():
        assert c.model.image_encoder["name"] == "vse_infty" and c.optim.name == "adamw"
        bert = "bert" in n or "lseh" in n
        assert c.model.text_encoder["name"] == ("bert" if bert else "bigru_gpo")
        assert c.optim.lr_mult == ({"text_encoder.bert": 0.1} if bert else {})
        if "lseh" in n:
            assert c.loss["name"] == "lseh" and c.loss["reduction"] == "max" and "warmup_epochs" not in c.loss
            assert (c.optim.lr, c.optim.lr_milestones, c.train.epochs) == (8e-4, [10, 20], 30)
        elif n != "vseinf_demo":
            assert c.loss == {"name": "hinge_warmup", "margin": 0.2, "warmup_epochs": 1}
            assert (c.optim.lr, c.optim.lr_milestones, c.train.epochs, c.train.batch_size) == (5e-4, [15], 25, 128)
    assert cfgs["vseinf_lseh_iapr_precomp"].train.batch_size == 84
    assert cfgs["vseinf_demo"].data.regions == "grid"
    with pytest.raises(ConfigError, match=r"model\.text_encoder\.pretrained: not set"):
        build_model(cfgs["vseinf_bert_f30k_precomp"].model, vocab_size=10, feature_shape=(36, 2048))
