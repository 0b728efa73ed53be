"""VSRN's image encoder: shapes and context, one graph convolution against its formula written out by hand, the
GRU over all regions, batch independence in eval mode, gradients, and every ranking loss on top of it."""

from __future__ import annotations

import math

import pytest
import torch

from vsekit.cli import RECIPES
from vsekit.config import ConfigError, resolve_config
from vsekit.losses import LOSSES, build_loss
from vsekit.models import IMAGE_ENCODERS, build_model
from vsekit.models.vsrn import RegionRelationLayer, VSRNImageEncoder, normalise_regions

B, R, D, E = 4, 5, 6, 8  # batch, regions, region feature size, joint space


def _model(**image_options):
    torch.manual_seed(0)
    return build_model({"embed_size": E, "image_encoder": {"name": "vsrn", **image_options},
                        "text_encoder": {"name": "gru", "word_dim": 4}}, vocab_size=20, feature_shape=(R, D))


def _text(b: int = B):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(4, 20, (b, 6), generator=gen), torch.tensor([6, 3, 5, 2, 4, 6][:b])


def _wake_graph_branch(encoder: VSRNImageEncoder, seed: int = 2) -> None:
    """Give every graph layer's batch norm a non-zero scale and shift (they start at 0, i.e. the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in encoder.gcn:
            layer.bn.weight.copy_(torch.rand(layer.bn.weight.shape, generator=gen) + 0.5)
            layer.bn.bias.copy_(torch.randn(layer.bn.bias.shape, generator=gen) * 0.1)


def test_registered_and_shapes_and_context():
    assert "vsrn" in IMAGE_ENCODERS and IMAGE_ENCODERS.get("vsrn").reads_features
    model = _model()
    enc = model.image_encoder
    assert isinstance(enc, VSRNImageEncoder) and enc.fc.in_features == D and len(enc.gcn) == 4
    images = torch.randn(B, R, D)
    out = model.embed(images, _text())
    assert out.image_emb.shape == (B, E) and out.sim.shape == (B, B)
    torch.testing.assert_close(out.image_emb.norm(dim=1), torch.ones(B))
    assert out.image_context.shape == (B, R, E)
    # the context is the reasoned regions (normalised per region by default), the ones the GRU read
    torch.testing.assert_close(out.image_context.norm(dim=-1), torch.ones(B, R))
    feats, regions = enc.forward_parts(images)
    torch.testing.assert_close(regions, out.image_context)
    torch.testing.assert_close(feats, enc.reason_globally(regions))
    torch.testing.assert_close(enc(images), out.image_emb)


def test_options_are_config_keys_and_bad_input_is_a_clear_error():
    with pytest.raises(ConfigError, match="global"):
        build_model({"embed_size": E, "image_encoder": {"name": "vsrn"}}, vocab_size=20, feature_shape=(D,))
    with pytest.raises(ConfigError, match="region_norm"):
        _model(region_norm="per_region")
    with pytest.raises(ConfigError, match="gcn_layers"):
        _model(gcn_layers=-1)
    cfg = resolve_config(RECIPES / "vsrn_demo.yaml", ["model.image_encoder.gcn_layers=2",
                                                          "model.image_encoder.gcn_dim=3"])
    assert cfg.model.image_encoder["gcn_layers"] == 2 and cfg.model.image_encoder["gcn_dim"] == 3
    with pytest.raises(ConfigError, match=r"model.image_encoder.gcn_layer: unknown key; did you mean "
                                          r"model.image_encoder.gcn_layers\?"):
        resolve_config(RECIPES / "vsrn_demo.yaml", ["model.image_encoder.gcn_layer=2"])
    enc = _model(gcn_layers=2, gcn_dim=3).image_encoder
    assert len(enc.gcn) == 2 and enc.gcn[0].phi.out_features == 3
    with pytest.raises(ValueError, match="region features"):
        enc(torch.randn(B, D))


def _pre_bn_by_hand(layer: RegionRelationLayer, v: torch.Tensor) -> torch.Tensor:
    """W (A g(V)) for one image v (R, D), element by element, with A_ij = phi(v_i).psi(v_j) / R: what the batch
    norm of the layer receives."""
    n = v.shape[0]
    w = {name: (getattr(layer, name).weight.detach().double(), getattr(layer, name).bias.detach().double())
         for name in ("phi", "psi", "g", "out")}
    inner = w["phi"][0].shape[0]

    def lin(name, x):
        weight, bias = w[name]
        return [sum(weight[o, k] * x[k] for k in range(len(x))) + bias[o] for o in range(weight.shape[0])]

    vd = v.double()
    phi, psi, g = ([lin(name, vd[i]) for i in range(n)] for name in ("phi", "psi", "g"))
    rows = []
    for i in range(n):
        a = [sum(phi[i][k] * psi[j][k] for k in range(inner)) / n for j in range(n)]  # row i of the affinity
        y = [sum(a[j] * g[j][k] for j in range(n)) for k in range(inner)]
        rows.append(torch.stack(lin("out", y)))
    return torch.stack(rows)


def _gcn_by_hand(layer: RegionRelationLayer, v: torch.Tensor, z: torch.Tensor, mean: torch.Tensor,
                 var: torch.Tensor) -> torch.Tensor:
    """V* = BN(z) + V for one image, z = W (A g(V)) of that image, with the given BN statistics per channel."""
    gamma, beta, eps = layer.bn.weight.detach().double(), layer.bn.bias.detach().double(), layer.bn.eps
    out = torch.zeros(v.shape, dtype=torch.float64)
    for i in range(v.shape[0]):
        for c in range(v.shape[1]):
            out[i, c] = v[i, c] + gamma[c] * (z[i, c] - mean[c]) / math.sqrt(var[c] + eps) + beta[c]
    return out


def test_one_graph_layer_equals_its_formula_by_hand():
    torch.manual_seed(3)
    layer = RegionRelationLayer(4, 3)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        layer.bn.weight.copy_(torch.rand(4, generator=gen) + 0.5)
        layer.bn.bias.copy_(torch.randn(4, generator=gen))
        layer.bn.running_mean.copy_(torch.randn(4, generator=gen))
        layer.bn.running_var.copy_(torch.rand(4, generator=gen) + 0.5)
    v = torch.randn(2, 3, 4, generator=gen)
    z = torch.stack([_pre_bn_by_hand(layer, v[b]) for b in range(2)])  # (B, R, D)
    # eval mode: the running statistics
    layer.eval()
    expected = _gcn_by_hand(layer, v[1].double(), z[1], layer.bn.running_mean.double(), layer.bn.running_var.double())
    torch.testing.assert_close(layer(v)[1].double(), expected, rtol=1e-5, atol=1e-5)
    # training mode: each channel's mean and (biased) variance over the batch AND the regions together
    layer.train()
    mean, var = z.reshape(-1, 4).mean(0), z.reshape(-1, 4).var(0, unbiased=False)
    expected = _gcn_by_hand(layer, v[1].double(), z[1], mean, var)
    torch.testing.assert_close(layer(v)[1].double(), expected, rtol=1e-5, atol=1e-5)


def test_graph_layers_start_as_the_identity():
    enc = _model().image_encoder
    v = torch.randn(B, R, E)
    torch.testing.assert_close(enc.gcn(v), v)


def test_region_norms():
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(normalise_regions(x, "region").norm(dim=2), torch.ones(2, 3))
    torch.testing.assert_close(normalise_regions(x, "across_regions").norm(dim=1), torch.ones(2, 4))
    assert normalise_regions(x, "none") is x
    enc = _model(region_norm="none", context_norm="across_regions").image_encoder
    _, regions = enc.forward_parts(torch.randn(B, R, D))
    torch.testing.assert_close(regions.norm(dim=1), torch.ones(B, E))


def test_gru_reads_every_region_in_order():
    torch.manual_seed(5)
    enc = _model().image_encoder
    regions = torch.randn(2, R, E)
    gru = enc.gru
    w_ih, w_hh, b_ih, b_hh = (p.detach() for p in (gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0))
    h = torch.zeros(2, E)
    for t in range(R):  # the GRU recurrence, written out: r, z gates and the candidate n
        gi, gh = regions[:, t] @ w_ih.T + b_ih, h @ w_hh.T + b_hh
        r = torch.sigmoid(gi[:, :E] + gh[:, :E])
        z = torch.sigmoid(gi[:, E:2 * E] + gh[:, E:2 * E])
        n = torch.tanh(gi[:, 2 * E:] + r * gh[:, 2 * E:])
        h = (1 - z) * n + z * h
    torch.testing.assert_close(enc.reason_globally(regions), h)
    # the whole encoder: with the graph layers at their identity start, changing only the first or only the last
    # region changes the image feature, and so does reversing the order of the regions
    images = torch.randn(2, R, D)
    base = enc.forward_features(images)
    for t in (0, R - 1):
        moved = images.clone()
        moved[:, t] += 1.0
        assert (enc.forward_features(moved) - base).abs().max() > 1e-4
    assert (enc.forward_features(images.flip(1)) - base).abs().max() > 1e-4


@pytest.mark.parametrize("feature_bn", [False, True])
def test_eval_embedding_of_an_item_does_not_depend_on_the_batch(feature_bn):
    model = _model(feature_bn=feature_bn)
    enc = model.image_encoder
    _wake_graph_branch(enc)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for _ in range(3):  # running statistics away from their initial 0 / 1
            enc(torch.randn(B, R, D, generator=gen) * 2 + 1)
    images = torch.randn(B, R, D, generator=gen)
    others = torch.randn(B, R, D, generator=gen) * 3
    with torch.no_grad():
        enc.train()  # the test can fail: in training mode batch norm mixes the items
        assert (enc(images)[:1] - enc(torch.cat([images[:1], others]))[:1]).abs().max() > 1e-4
        model.eval()
        alone = enc(images[:1])
        torch.testing.assert_close(enc(images)[:1], alone)
        torch.testing.assert_close(enc(torch.cat([images[:1], others]))[:1], alone)


@pytest.mark.parametrize("feature_bn", [False, True])
def test_every_parameter_gets_a_gradient(feature_bn):
    model = _model(feature_bn=feature_bn)
    _wake_graph_branch(model.image_encoder)  # at the identity start only the BN scale/shift of the graph move
    out = model.embed(torch.randn(B, R, D), _text())
    build_loss({"name": "hinge", "margin": 0.2, "reduction": "sum"})(out.sim).backward()
    for name, p in model.image_encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.text_encoder.embed.weight.grad.abs().sum() > 0


def test_graph_branch_gets_gradient_only_through_the_zero_started_scale():
    model = _model()
    out = model.embed(torch.randn(B, R, D), _text())
    build_loss({"name": "hinge", "margin": 0.2, "reduction": "sum"})(out.sim).backward()
    layer = model.image_encoder.gcn[0]
    assert layer.bn.weight.grad.abs().sum() > 0 and layer.bn.bias.grad.abs().sum() > 0
    assert layer.phi.weight.grad.abs().sum() == 0 and layer.out.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_ranking_loss_trains_a_vsrn_model(name):
    model = _model()
    _wake_graph_branch(model.image_encoder)
    loss_fn = build_loss({"name": name})
    loss_fn.set_epoch(0)
    image_ids = torch.tensor([0, 1, 1, 2])  # slots 1 and 2 show the same image
    gen = torch.Generator().manual_seed(8)
    images = torch.randn(B, R, D, generator=gen)
    images[2] = images[1]
    out = model.embed(images, _text())
    extra = {"caption_vectors": torch.randn(B, 10, generator=gen)} if loss_fn.requires_caption_vectors else {}
    loss = loss_fn(out.sim, image_ids, **extra)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.image_encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.image_encoder.gcn[0].phi.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("recipe,loss,lr,decay", [
    ("vsrn_f30k_precomp", "hinge", 2e-4, 10), ("vsrn_coco_precomp", "hinge", 2e-4, 15),
    ("vsrn_lseh_f30k_precomp", "lseh", 4e-4, 5), ("vsrn_lseh_coco_precomp", "lseh", 4e-4, 6),
    ("vsrn_lseh_iapr_precomp", "lseh", 5e-4, 20)])
def test_recipes_carry_the_reference_settings(recipe, loss, lr, decay):
    cfg = resolve_config(RECIPES / f"{recipe}.yaml")
    assert cfg.model.embed_size == 2048 and cfg.model.image_encoder["name"] == "vsrn"
    assert cfg.model.text_encoder["name"] == "gru" and cfg.model.text_encoder["word_dim"] == 300
    assert cfg.loss["name"] == loss and cfg.data.format == "precomp"
    assert (cfg.optim.lr, cfg.optim.lr_decay_every, cfg.optim.grad_clip) == (lr, decay, 2.0)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.text.max_len) == (30, 128, None)
    if loss == "lseh":
        assert (cfg.loss["alpha"], cfg.loss["lam"], cfg.loss["reduction"]) == (0.185, 0.025, "max")
    else:
        assert (cfg.loss["margin"], cfg.loss["reduction"]) == (0.2, "max")
    assert cfg.model.image_encoder.get("feature_bn", False) == ("f30k" in recipe)


def test_vsrn_demo_trains_with_its_caption_term_on_the_reasoned_regions(tmp_path, cache):
    from vsekit.cli.common import recipe_path
    from vsekit.config import resolve_config
    from vsekit.train.trainer import Trainer

    cfg = resolve_config(recipe_path("vsrn_demo"), [f"output_dir={tmp_path}", "data.num_images=60",
                                                    "data.val_max_images=12", "train.epochs=1",
                                                    "train.max_steps_per_epoch=2", "train.progress=false"])
    t = Trainer(cfg)
    t.fit()
    assert "caption" in t.last_parts and float(t.last_parts["caption"]) > 0
    assert t.objective.terms["caption"].condition == "context"
