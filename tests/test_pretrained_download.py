"""``pretrained: true`` with the libraries' own caches and downloads (torchvision, timm, open_clip's pretrained
tags): a prepared cache is
read without any download, a missing file is fetched by the library itself when downloads are allowed, and
a failed download or ``VSEKIT_OFFLINE`` is one clear error. No test touches the network: every download
function is replaced."""

from __future__ import annotations

import socket
import urllib.error

import pytest
import torch
import torchvision
import torchvision.models._api as tv_api

from vsekit.models import BACKBONES, IMAGE_ENCODERS
from vsekit.models.weights import PretrainedWeightsMissing


@pytest.fixture
def online_allowed(monkeypatch, tmp_path):
    """Downloads allowed (VSEKIT_OFFLINE unset), an empty torch hub cache, and no socket may connect."""
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.delenv("VSEKIT_OFFLINE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _cache_path(tmp_path):
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    return weights, tmp_path / "torch" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]


def test_torchvision_weights_in_the_cache_are_read_without_a_download(tmp_path, monkeypatch, online_allowed):
    def no_download(*a, **k):
        raise AssertionError("the cached file should have been read")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_download)
    _, path = _cache_path(tmp_path)
    torch.manual_seed(0)
    ref = torchvision.models.resnet18()
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    net, dim = BACKBONES.build({"name": "resnet18", "pretrained": True})
    assert dim == 512 and torch.equal(net.conv1.weight, ref.conv1.weight)


def test_torchvision_weights_missing_are_fetched_by_torchvision(tmp_path, monkeypatch, online_allowed, caplog):
    weights, path = _cache_path(tmp_path)
    torch.manual_seed(1)
    ref = torchvision.models.resnet18().state_dict()
    calls = []

    def download(url, *a, **k):  # what torchvision's download gives: the state dict, the file in its cache
        calls.append((url, k))
        return ref

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", download)
    caplog.set_level("INFO", logger="vsekit.models")
    net, _ = BACKBONES.build({"name": "resnet18", "pretrained": True})
    assert torch.equal(net.conv1.weight, ref["conv1.weight"])
    assert calls == [(weights.url, {"progress": False, "check_hash": True, "weights_only": True})]
    assert f"downloading {weights.url} into torchvision's cache {path.parent}" in caplog.text


@pytest.mark.parametrize("failure", [urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
                                     RuntimeError("invalid hash value (expected \"f37072fd\", got \"0000\")")])
def test_a_failed_torchvision_download_is_the_clear_error(tmp_path, monkeypatch, online_allowed, failure):
    def download(*a, **k):
        raise failure

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", download)
    weights, path = _cache_path(tmp_path)
    with pytest.raises(PretrainedWeightsMissing) as e:
        BACKBONES.build({"name": "resnet18", "pretrained": True})
    msg = str(e.value)
    assert f"not on this machine (expected {path}) and torchvision's download failed ({type(failure).__name__}" in msg
    assert f"Fetch {weights.url} into {path.parent}" in msg and "image_encoder.pretrained=false" in msg
    assert "\n" not in msg


def test_vsekit_offline_means_no_download_attempt(tmp_path, monkeypatch, online_allowed):
    def download(*a, **k):
        raise AssertionError("VSEKIT_OFFLINE is set: no download may be tried")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", download)
    monkeypatch.setenv("VSEKIT_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsMissing, match="vsekit does not download weights while VSEKIT_OFFLINE is set"):
        BACKBONES.build({"name": "resnet18", "pretrained": True})


def test_timm_pretrained_uses_timms_own_loading_and_fails_clearly(monkeypatch, online_allowed):
    timm = pytest.importorskip("timm")
    real = timm.create_model
    calls = []

    def create_model(name, pretrained=False, **kwargs):  # timm's download stands in: weights, or no network
        calls.append(pretrained)
        if pretrained and name == "test_efficientnet":
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        torch.manual_seed(2)
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    enc = IMAGE_ENCODERS.build({"name": "timm", "model": "test_resnet", "pretrained": True}, embed_size=8)
    torch.manual_seed(2)
    want = real("test_resnet", pretrained=False, num_classes=0).state_dict()
    assert calls == [True] and all(torch.equal(v, want[k]) for k, v in enc.backbone.state_dict().items())
    with pytest.raises(PretrainedWeightsMissing, match=r"model.image_encoder: timm's pretrained weights for "
                                                       r"test_efficientnet could not be loaded \(OSError: We couldn't "
                                                       r"connect.*pass model.image_encoder.weights=FILE"):
        IMAGE_ENCODERS.build({"name": "timm", "model": "test_efficientnet", "pretrained": True}, embed_size=8)
    calls.clear()
    IMAGE_ENCODERS.build({"name": "timm", "model": "test_resnet"}, embed_size=8)  # default: random, no download
    assert calls == [False]


TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                              "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture
def tiny_clip_tag(monkeypatch, tmp_path):
    """An open_clip architecture ``tiny-test`` with a pretrained tag ``tinytag`` (OpenAI-style: QuickGELU);
    open_clip's download is replaced by one that hands over a local file and records the call."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip import factory, pretrained

    monkeypatch.setitem(factory._MODEL_CONFIGS, "tiny-test", TINY_CLIP)
    real_cfg = pretrained.get_pretrained_cfg
    tag = {"url": "https://example.invalid/tiny.pt", "hf_hub": "", "quick_gelu": True}
    monkeypatch.setattr(pretrained, "get_pretrained_cfg",
                        lambda arch, name: dict(tag) if (arch, name) == ("tiny-test", "tinytag") else real_cfg(arch, name))
    torch.manual_seed(3)
    ref = open_clip.CLIP(**TINY_CLIP, quick_gelu=True)
    path = tmp_path / "open_clip_cache" / "tiny.pt"
    path.parent.mkdir()
    torch.save(ref.state_dict(), path)
    calls = []

    def download(cfg, *a, **k):
        calls.append(cfg["url"])
        return str(path)

    monkeypatch.setattr(pretrained, "download_pretrained", download)
    return ref, calls


def test_open_clip_pretrained_tag_uses_open_clips_download(online_allowed, tiny_clip_tag):
    ref, calls = tiny_clip_tag
    enc = IMAGE_ENCODERS.build({"name": "open_clip", "arch": "tiny-test", "weights": "tinytag"}, embed_size=16)
    assert calls == ["https://example.invalid/tiny.pt"]
    want = ref.visual.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in enc.tower.state_dict().items())
    assert type(enc.tower.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"  # as open_clip gives them


def test_open_clip_tag_download_failure_or_offline_is_the_clear_error(monkeypatch, online_allowed, tiny_clip_tag):
    from open_clip import pretrained

    _, calls = tiny_clip_tag
    monkeypatch.setenv("VSEKIT_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsMissing, match="'tinytag' is open_clip's pretrained tag of tiny-test, not a file"):
        IMAGE_ENCODERS.build({"name": "open_clip", "arch": "tiny-test", "weights": "tinytag"}, embed_size=16)
    assert calls == []
    monkeypatch.delenv("VSEKIT_OFFLINE")

    def fail(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(pretrained, "download_pretrained", fail)
    with pytest.raises(PretrainedWeightsMissing, match=r"open_clip's download of tiny-test/tinytag failed \(URLError"):
        IMAGE_ENCODERS.build({"name": "open_clip", "arch": "tiny-test", "weights": "tinytag"}, embed_size=16)
