"""open_clip's image and text towers as vsekit encoders, so that any vsekit loss can fine-tune a CLIP model.

The image encoder ``open_clip`` keeps a CLIP model's vision tower, the text encoder ``open_clip`` its text
tower and tokenizer; both are built from one architecture (``arch``, a name in open_clip's registry, or
``config``, an architecture dict as in open_clip's ``model_configs/*.json``) and load the same local
weights file (``weights``). The model is built directly from its config class (open_clip's factory would
resolve an ``hf-hub:`` name by downloading). ``weights`` may instead be one of open_clip's pretrained tags of
``arch`` (``openai``, ``laion2b_s34b_b79k``, ...): open_clip's own download then fetches it into its cache, as
its users expect, unless ``$VSEKIT_OFFLINE`` (see :mod:`vsekit.models.weights`).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from vsekit.errors import did_you_mean, first_line
from vsekit.models.base import Encoder
from vsekit.models.foreign import Renormalize, registry_name
from vsekit.models.frozen_cache import FrozenOutputs
from vsekit.models.image import IMAGE_ENCODERS
from vsekit.models.text import TEXT_ENCODERS
from vsekit.models.weights import (
    OFFLINE_ENV,
    PretrainedWeightsMissing,
    WeightsFileError,
    initial_weights_wanted,
    library_download,
)
from vsekit.utils.optional import import_optional

#: the longest text context an architecture may ask for (CLIP: 77); bounds the tokenizer's work per caption
MAX_CONTEXT_LENGTH = 1024


def _open_clip(where: str):
    return import_optional("open_clip", "clip", f"{where}: the open_clip encoder")


def clip_config(arch: str | None, config: dict[str, Any] | None, where: str) -> dict[str, Any]:
    """The architecture dict (``embed_dim``, ``vision_cfg``, ``text_cfg``) of ``arch`` or ``config``."""
    if (arch is None) == (config is None):
        raise ValueError(f"{where}: set exactly one of arch (an open_clip architecture name) and config "
                         "(an architecture dict)")
    if config is None:
        open_clip = _open_clip(where)
        registry_name(arch, "open_clip", f"{where}.arch")
        config = open_clip.get_model_config(arch.replace("/", "-"))
        if config is None:
            raise ValueError(f"{where}.arch: open_clip has no architecture {arch!r}"
                             f"{did_you_mean(arch, open_clip.list_models())}")
    cfg = copy.deepcopy(dict(config))
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ValueError(f"{where}.config: needs the key {key!r} (keys: embed_dim, vision_cfg, text_cfg)")
    text_cfg, vision_cfg = dict(cfg["text_cfg"]), dict(cfg["vision_cfg"])
    if "hf_model_name" in text_cfg or "hf_tokenizer_name" in text_cfg:
        raise ValueError(f"{where}: architectures with a Hugging Face text tower or tokenizer are not supported "
                         "(they fetch their config from the Hub)")
    if "multimodal_cfg" in cfg:
        raise ValueError(f"{where}: CoCa architectures (multimodal_cfg) are not supported")
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False  # never fetch a timm tower's weights
    ctx = int(text_cfg.get("context_length", 77))
    if not 1 < ctx <= MAX_CONTEXT_LENGTH:
        raise ValueError(f"{where}: text_cfg.context_length must be in [2, {MAX_CONTEXT_LENGTH}], got {ctx}")
    cfg["text_cfg"], cfg["vision_cfg"] = text_cfg, vision_cfg
    return cfg


def build_clip(arch: str | None, config: dict[str, Any] | None, weights: str | None, where: str) -> nn.Module:
    """A CLIP (or CustomTextCLIP) model of the architecture, with the local ``weights`` file loaded
    (strictly: every tensor must fit), or randomly initialised."""
    open_clip = _open_clip(where)
    cfg = clip_config(arch, config, where)
    cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    load = bool(weights) and initial_weights_wanted()
    path = Path(weights).expanduser() if load else None
    if path is not None and not path.is_file():
        tag_cfg = _pretrained_tag(open_clip, arch, str(weights))
        if tag_cfg is None:
            raise PretrainedWeightsMissing(f"{where}.weights: no such file {path} (nor an open_clip pretrained tag "
                                           f"of {arch or 'this config'}: give a local file)")
        path = _download_tag(open_clip, arch, str(weights), tag_cfg, where)
        if tag_cfg.get("quick_gelu"):  # what open_clip's own factory does for these weights (OpenAI's CLIP)
            cfg["quick_gelu"] = True
    try:
        model = cls(**cfg)
    except TypeError as e:
        raise ValueError(f"{where}: not an open_clip architecture: {e}") from None
    if path is not None:
        try:
            open_clip.load_checkpoint(model, str(path.resolve()), strict=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - a foreign file: torch, safetensors or a shape mismatch
            first = first_line(e, limit=None)
            raise WeightsFileError(f"{where}.weights: {path} cannot be loaded into this architecture "
                                   f"({type(e).__name__}: {first[:300]})") from None
    return model


def _pretrained_tag(open_clip, arch: str | None, name: str) -> dict[str, Any] | None:
    """open_clip's pretrained config of tag ``name`` (``openai``, ``laion2b_s34b_b79k``, ...) for ``arch``;
    None when ``name`` is no tag of it (or the architecture came as a config dict)."""
    if arch is None or "/" in name or "\\" in name:
        return None
    return open_clip.pretrained.get_pretrained_cfg(arch.replace("/", "-"), name) or None


def _download_tag(open_clip, arch: str, tag: str, cfg: dict[str, Any], where: str) -> Path:
    """open_clip's own download of a pretrained tag into its cache (the Hugging Face cache, or its URL's),
    as open_clip's users get it; then read like any local file. A clear error when downloads are off or fail."""
    how = f"give {where}.weights a local checkpoint file (e.g. open_clip_pytorch_model.bin of {arch}/{tag})"
    found = library_download(
        lambda: open_clip.pretrained.download_pretrained(cfg),
        announce=f"{where}.weights: open_clip's pretrained {arch}/{tag} (open_clip downloads it into its cache once)",
        offline=f"{where}.weights: {tag!r} is open_clip's pretrained tag of {arch}, not a file, and vsekit does not "
                f"download it while {OFFLINE_ENV} is set; {how}",
        failed=lambda why: f"{where}.weights: open_clip's download of {arch}/{tag} failed ({why}); {how}")
    if not found or not Path(found).is_file():
        raise PretrainedWeightsMissing(f"{where}.weights: open_clip gave no file for {arch}/{tag}; {how}")
    return Path(found)


def _projection(in_dim: int, embed_size: int, proj: str, where: str) -> nn.Module:
    """CLIP's joint space as it is (``none``), or a new linear map into ``embed_size`` (``linear``; ``auto``:
    only when the sizes differ)."""
    if proj == "none" or (proj == "auto" and in_dim == embed_size):
        if in_dim != embed_size:
            raise ValueError(f"{where}.proj: none keeps CLIP's {in_dim}-d space, but model.embed_size is "
                             f"{embed_size}; set model.embed_size: {in_dim} or proj: linear")
        return nn.Identity()
    layer = nn.Linear(in_dim, embed_size)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


@IMAGE_ENCODERS.register("open_clip")
class OpenCLIPImageEncoder(FrozenOutputs, Encoder):
    """The vision tower of an open_clip model (its pooled, projected CLIP embedding), L2-normalised.

    ``arch`` or ``config``: the architecture; ``weights``: a local CLIP checkpoint (``.safetensors``,
    ``.pt``/``.bin``), read without running code, or a pretrained tag of ``arch`` (open_clip's download), or
    null for random weights. ``proj``: ``auto`` keeps CLIP's
    joint space when ``model.embed_size`` equals its ``embed_dim`` and adds a linear map otherwise. Images
    arrive with ImageNet statistics and are re-normalised to ``mean`` / ``std`` (default: CLIP's).
    ``finetune: false`` freezes the tower (the projection, if any, trains); its outputs are then kept per image
    while training on the CPU (``cache_mb``, as the ``timm`` encoder's).
    """

    finetune_scope = "tower"

    def __init__(self, embed_size: int = 512, arch: str | None = None, config: dict[str, Any] | None = None,
                 weights: str | None = None, finetune: bool = True, proj: Literal["auto", "linear", "none"] = "auto",
                 mean: tuple[float, float, float] | None = None, std: tuple[float, float, float] | None = None,
                 no_imgnorm: bool = False, use_abs: bool = False, cache_mb: float = 512.0) -> None:
        super().__init__()
        where = "model.image_encoder"
        self.init_frozen_cache(cache_mb, where)
        open_clip = _open_clip(where)
        embed_dim = int(clip_config(arch, config, where)["embed_dim"])
        self.tower = build_clip(arch, config, weights, where).visual
        self.renorm = Renormalize(mean or open_clip.OPENAI_DATASET_MEAN, std or open_clip.OPENAI_DATASET_STD)
        self.proj = _projection(embed_dim, embed_size, proj, where)
        self.normalize, self.use_abs = not no_imgnorm, use_abs
        self.set_finetune(finetune)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.frozen(lambda x: self.tower(self.renorm(x)), images))


@functools.lru_cache(maxsize=4)
def _bpe_tokenizer(context_length: int):
    open_clip = _open_clip("model.text_encoder")
    return open_clip.SimpleTokenizer(context_length=context_length)  # BPE merges shipped with open_clip


@TEXT_ENCODERS.register("open_clip")
class OpenCLIPTextEncoder(Encoder):
    """The text tower of an open_clip model with its own BPE tokenizer, L2-normalised.

    Captions are tokenised by :meth:`tokenize` (CLIP's BPE, ``<start> ... <end>``, cut to the context length
    or to ``text.max_len`` tokens between the two), which the training run and the embedder use instead of
    vsekit's vocabulary. The ids are CLIP's plus one, so that 0 is only ever padding (CLIP's own id 0 is
    "!"). A batch arrives right-padded with 0 as ``(tokens (B, T), lengths (B,))``; the tower sees CLIP's ids
    padded to its context length, with its causal mask, and pools at the ``<end>`` token (CLIP's argmax
    pooling: ``<end>`` has the largest id), so padding never reaches the embedding.
    Options as for the ``open_clip`` image encoder; ``finetune: false`` freezes the tower.
    """

    finetune_scope = "tower"

    def __init__(self, vocab_size: int = 0, embed_size: int = 512, arch: str | None = None,
                 config: dict[str, Any] | None = None, weights: str | None = None, finetune: bool = True,
                 proj: Literal["auto", "linear", "none"] = "auto", itos: list[str] | None = None,
                 no_txtnorm: bool = False, use_abs: bool = False) -> None:
        super().__init__()
        where = "model.text_encoder"
        cfg = clip_config(arch, config, where)
        clip = build_clip(arch, config, weights, where)
        self.custom = hasattr(clip, "text")  # CustomTextCLIP: the tower is one module
        if self.custom:
            self.tower = clip.text
        else:  # CLIP: the text tower is the model itself, without the vision tower and the logit scale
            del clip.visual, clip.logit_scale
            if getattr(clip, "logit_bias", None) is not None:
                del clip.logit_bias
            self.tower = clip
        self.context_length = int(cfg["text_cfg"].get("context_length", 77))
        self.proj = _projection(int(cfg["embed_dim"]), embed_size, proj, where)
        self.normalize, self.use_abs = not no_txtnorm, use_abs
        _bpe_tokenizer(self.context_length)  # fail now, not in the first batch, if it cannot be built
        self.set_finetune(finetune)

    def tokenize(self, caption: str, max_len: int | None = None) -> list[int]:
        """CLIP's BPE ids + 1 of ``[<start>, caption..., <end>]``, at most the context length (or ``max_len`` + 2)
        long; never 0, the padding id."""
        tok = _bpe_tokenizer(self.context_length)
        limit = self.context_length if max_len is None else max(2, min(self.context_length, int(max_len) + 2))
        # BPE works word by word: text past 64 characters per token cannot reach the first `limit` tokens
        ids = tok.encode(caption[: 64 * limit])[: limit - 2]
        return [i + 1 for i in (tok.sot_token_id, *ids, tok.eot_token_id)]

    def forward_features(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.context_length:
            raise ValueError(f"token batch of length {t} is longer than the context length {self.context_length}")
        tokens = F.pad((tokens - 1).clamp_min(0), (0, self.context_length - t))  # CLIP's ids; padding after <end>
        x = self.tower(tokens) if self.custom else self.tower.encode_text(tokens)
        return self.proj(x)
