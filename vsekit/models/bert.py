"""A BERT text encoder (VSE-infinity's text side): token outputs -> linear -> GPO -> L2-norm.

BERT brings its own word-piece tokenizer, so this encoder defines the ``tokenize(caption, max_len)`` hook
(:attr:`vsekit.models.base.Encoder.tokenize`): the training run and the :class:`~vsekit.inference.Embedder`
use it instead of vsekit's vocabulary. Weights are read from a local folder only; vsekit never downloads.
``transformers`` is imported when the encoder is built, never by ``import vsekit``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vsekit.errors import ConfigError, did_you_mean, first_line
from vsekit.models.base import Encoder
from vsekit.models.frozen_cache import FrozenOutputs
from vsekit.models.gpo import GPO
from vsekit.models.text import TEXT_ENCODERS
from vsekit.text.tokenizer import head_at_space

WHERE = "model.text_encoder"
FOLDER_NEEDS = ("a Hugging Face BERT saved with save_pretrained: config.json, the weights (model.safetensors "
                "or pytorch_model.bin) and the tokenizer's vocabulary (vocab.txt or tokenizer.json), e.g. a "
                "local copy of bert-base-uncased")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
VOCAB_FILES = ("vocab.txt", "tokenizer.json")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"{WHERE}.name=bert needs the transformers package: pip install 'vsekit[bert]'") from None
    return transformers


def _check_folder(folder: Path, need_vocab: bool) -> None:
    key = f"{WHERE}.pretrained"
    if not folder.is_dir():
        raise ConfigError(f"{key}: no such folder {folder}; it must be {FOLDER_NEEDS} (vsekit never downloads)")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        missing.append("weights (" + " or ".join(WEIGHT_FILES[:2]) + ")")
    if need_vocab and not any((folder / f).is_file() for f in VOCAB_FILES):
        missing.append("vocabulary (vocab.txt or tokenizer.json)")
    if missing:
        raise ConfigError(f"{key}: {folder} has no {', no '.join(missing)}; it must be {FOLDER_NEEDS}")


def load_bert(pretrained: str | None, config: dict[str, Any] | None, need_vocab: bool) -> nn.Module:
    """A BERT model without its pooler (unused here): from a local folder, or randomly initialised from
    ``config`` (BertConfig fields)."""
    if pretrained is None and config is None:
        raise ConfigError(f"{WHERE}.pretrained: not set; pass the local folder of a BERT "
                          f"({WHERE}.pretrained=/path/to/bert-base-uncased: {FOLDER_NEEDS.split(': ', 1)[1]}), "
                          f"or {WHERE}.config (BertConfig fields) for a randomly initialised one")
    if pretrained is not None and config is not None:
        raise ConfigError(f"{WHERE}: set pretrained (a local folder) or config (random weights), not both")
    tf = _transformers()
    if config is not None:
        known = set(tf.BertConfig().to_dict())
        for key in config:
            if key not in known:
                raise ConfigError(f"{WHERE}.config.{key}: not a BertConfig field{did_you_mean(key, known)}")
        try:
            return tf.BertModel(tf.BertConfig(**config), add_pooling_layer=False)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{WHERE}.config: {e}") from None
    folder = transformer_folder(Path(pretrained).expanduser())
    _check_folder(folder, need_vocab)
    try:
        cfg = tf.AutoConfig.from_pretrained(folder, local_files_only=True)
        extra = {"add_pooling_layer": False} if cfg.model_type == "bert" else {}
        with _quiet(tf):
            model, info = tf.AutoModel.from_pretrained(folder, config=cfg, local_files_only=True,
                                                       output_loading_info=True, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{WHERE}.pretrained: {folder} could not be loaded ({str(e).splitlines()[0]}); "
                          f"it must be {FOLDER_NEEDS}") from None
    except RuntimeError as e:  # transformers refuses tensors whose shapes differ from the config's
        raise ConfigError(f"{WHERE}.pretrained: {folder}: the weights do not fit its config.json (a tensor of "
                          f"another shape: {first_line(e, default='')}); it must be "
                          f"{FOLDER_NEEDS}") from None
    # transformers initialises what the file lacks at random and only warns: here that is an error
    missing = sorted(info.get("missing_keys") or ())
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ()]
    if missing or mismatched:
        what = f"no weights for {missing[0]}" if missing else f"{mismatched[0]} has another shape"
        n = len(missing) + len(mismatched)
        raise ConfigError(f"{WHERE}.pretrained: {folder}: the weights do not fit its config.json ({what}, "
                          f"{n} tensors in all); it must be {FOLDER_NEEDS}")
    return model.float()


ST_MODULES_MAX = 1 << 16  # bytes of a sentence-transformers modules.json


def transformer_folder(folder: Path) -> Path:
    """The folder holding the transformer itself. A sentence-transformers folder (``modules.json``, e.g.
    all-MiniLM-L6-v2) lists its modules; its ``Transformer`` module's ``path`` is the folder ("" in newer
    ones, ``0_Transformer`` in older ones). An older folder without ``modules.json`` but with
    ``0_Transformer/config.json`` is read from there. Any other folder is taken as it is."""
    key = f"{WHERE}.pretrained"
    modules = folder / "modules.json"
    if modules.is_file():
        try:
            if modules.stat().st_size > ST_MODULES_MAX:
                raise ValueError(f"larger than {ST_MODULES_MAX} bytes")
            entries = json.loads(modules.read_text(encoding="utf-8"))
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise ValueError("not a list of modules")
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}: {modules} is not a sentence-transformers module list ({e})") from None
        paths = [e.get("path") for e in entries if str(e.get("type", "")).endswith("models.Transformer")]
        if not paths or not isinstance(paths[0], str):
            raise ConfigError(f"{key}: {modules} lists no Transformer module (types: "
                              f"{', '.join(str(e.get('type')) for e in entries[:4]) or 'none'}); give the "
                              "folder of the transformer itself")
        inner = Path(paths[0])
        if inner.is_absolute() or ".." in inner.parts:
            raise ConfigError(f"{key}: {modules}: the Transformer module's path {paths[0]!r} leaves the folder")
        return folder / inner
    if not (folder / "config.json").is_file() and (folder / "0_Transformer" / "config.json").is_file():
        return folder / "0_Transformer"
    return folder


@contextlib.contextmanager
def _quiet(tf) -> Iterator[None]:
    """transformers' loading report and progress bar off (vsekit checks the loading info itself)."""
    logging_ = tf.utils.logging
    level = logging_.get_verbosity()
    logging_.set_verbosity_error()
    bars = logging_.is_progress_bar_enabled()
    logging_.disable_progress_bar()
    try:
        yield
    finally:
        logging_.set_verbosity(level)
        if bars:
            logging_.enable_progress_bar()


def load_tokenizer(tokenizer: str | None, pretrained: str | None):
    """The word-piece tokenizer: from ``tokenizer`` (a vocab.txt file or a tokenizer folder), else from the
    ``pretrained`` folder; None when neither is given."""
    source, key = (tokenizer, f"{WHERE}.tokenizer") if tokenizer else (pretrained, f"{WHERE}.pretrained")
    if source is None:
        return None
    tf = _transformers()
    path = Path(source).expanduser()
    if not tokenizer and path.is_dir():
        path = transformer_folder(path)
    if not path.exists():
        raise ConfigError(f"{key}: no such file or folder {path}; give a BERT vocab.txt or a folder holding the "
                          "tokenizer (vocab.txt or tokenizer.json)")
    try:
        if path.is_file():
            # transformers 5 takes the file as `vocab`, 4 as `vocab_file` (5 ignores that name silently)
            arg = "vocab" if "vocab" in inspect.signature(tf.BertTokenizerFast.__init__).parameters else "vocab_file"
            tok = tf.BertTokenizerFast(**{arg: str(path)})
        else:
            tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: no tokenizer could be read from {path} ({str(e).splitlines()[0]})") from None
    if path.is_file():
        with path.open(encoding="utf-8") as f:
            pieces = sum(1 for line in f if line.strip())
        if len(tok) != pieces:
            raise ConfigError(f"{key}: {path} has {pieces} word pieces but the tokenizer read {len(tok)}; "
                              "expected a BERT vocab.txt, one word piece per line")
    if tok.pad_token_id != 0:
        raise ConfigError(f"{key}: the tokenizer's padding id is {tok.pad_token_id}; vsekit pads token batches "
                          "with 0, so [PAD] must be word piece 0 (as in BERT's vocab.txt)")
    return tok


def by_length(lengths: list[int], rows) -> dict[int, list[int]]:
    """``rows`` grouped by their caption's length."""
    groups: dict[int, list[int]] = {}
    for i in rows:
        groups.setdefault(lengths[i], []).append(i)
    return groups


def split_top_layers(bert: nn.Module, k: int) -> nn.ModuleList | None:
    """Take the top ``k`` transformer layers out of ``bert`` (which then ends below them) and return them;
    None for ``k == 0``."""
    key = f"{WHERE}.train_top_layers"
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(f"{key}: {k!r}; must be a whole number >= 0 (0: none)")
    if k == 0:
        return None
    layers = getattr(getattr(bert, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{key}: this {type(bert).__name__} keeps no encoder.layer list to take layers from")
    if k > len(layers):
        raise ConfigError(f"{key}: {k}, but this BERT has {len(layers)} layers")
    top = nn.ModuleList(layers[len(layers) - k:])
    bert.encoder.layer = nn.ModuleList(layers[:len(layers) - k])
    return top


@TEXT_ENCODERS.register("bert")
class BertTextEncoder(FrozenOutputs, Encoder):
    """BERT over word pieces -> Linear(hidden -> embed_size) at every token -> GPO over the valid tokens
    ([CLS] and [SEP] included, as in VSE-infinity) -> L2-norm.

    Exactly one of ``pretrained`` (a local folder: config.json, weights, vocab; nothing is downloaded) or
    ``config`` (BertConfig fields; random weights, for tests and from-scratch runs). ``tokenizer`` (a
    vocab.txt or a tokenizer folder) overrides the pretrained folder's tokenizer; a ``config`` model needs it
    to tokenize captions. A checkpoint stores these paths in its config and the weights in its state, so
    re-opening it reads the folder or vocabulary again but never the network.

    The BERT sub-module is named ``bert``: ``optim.lr_mult: {text_encoder.bert: 0.1}`` gives it VSE-infinity's
    10x lower learning rate; ``finetune: false`` keeps it fixed. The attention mask comes from the lengths.
    ``vocab_size`` and ``itos`` (vsekit's vocabulary) are not used.

    A fixed BERT gives a caption the same token outputs every epoch, so while it is fixed its outputs are kept
    per caption (at most ``cache_mb`` MiB, 0: off) and BERT runs only on captions not seen before: after the
    first epoch a training step costs the projection and GPO only, and validation reads its captions from the
    cache too. The cache belongs to a training run: it starts with the first training step and is emptied when
    BERT is unfrozen or its weights are loaded, so a model only ever used in eval mode (an index, a server,
    which encode captions they will not see again) keeps nothing.

    ``train_top_layers: k`` moves BERT's top ``k`` transformer layers into a sub-module ``top`` that learns
    whatever ``finetune`` says: with ``finetune: false`` the embeddings and the layers below stay fixed and their
    outputs are cached per caption as above, so a step costs ``k`` layers (``optim.lr_mult: {text_encoder.top:
    0.1}`` as for ``bert``). The top layers run on the captions of each length together, without padding, so
    they need no attention mask and give a caption the same outputs in any batch.
    """

    finetune_scope = "bert"

    def __init__(self, embed_size: int = 1024, pretrained: str | None = None, config: dict[str, Any] | None = None,
                 tokenizer: str | None = None, finetune: bool = True, no_txtnorm: bool = False,
                 use_abs: bool = False, cache_mb: float = 512.0, train_top_layers: int = 0,
                 vocab_size: int | None = None, itos: list[str] | None = None) -> None:
        super().__init__()
        self.init_frozen_cache(cache_mb, WHERE)  # a caption's token ids -> BERT's (length, hidden) outputs
        self.bert = load_bert(pretrained, config, need_vocab=tokenizer is None)
        self.top = split_top_layers(self.bert, train_top_layers)
        self._tokenizer = load_tokenizer(tokenizer, pretrained)
        bert_vocab = int(self.bert.config.vocab_size)
        if self._tokenizer is not None and len(self._tokenizer) > bert_vocab:
            raise ConfigError(f"{WHERE}.tokenizer: {len(self._tokenizer)} word pieces, but the model embeds only "
                              f"{bert_vocab} (vocab_size)")
        self.max_positions = int(self.bert.config.max_position_embeddings)
        self.proj = nn.Linear(int(self.bert.config.hidden_size), embed_size)
        self.gpo = GPO()
        self.normalize, self.use_abs = not no_txtnorm, use_abs
        self.set_finetune(finetune)

    @property
    def max_pieces(self) -> int:
        """The most word pieces of a caption (between [CLS] and [SEP]) the model has positions for."""
        return self.max_positions - 2

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that are no word: [CLS], [SEP], [PAD], [UNK], [MASK] (a caption of only these has no known
        words: :class:`vsekit.text.encoding.CaptionEncoder`)."""
        return frozenset(self._tokenizer.all_special_ids) if self._tokenizer is not None else frozenset()

    def tokenize(self, caption: str, max_len: int | None = None) -> list[int]:
        """Word-piece ids of ``caption``: [CLS] pieces [SEP], at most ``max_len`` pieces (``text.max_len``)
        and never more than the model's positions."""
        if self._tokenizer is None:
            raise ConfigError(f"{WHERE}.tokenizer: this BERT was built from config and has no tokenizer; set "
                              "model.text_encoder.tokenizer to a vocab.txt or a tokenizer folder")
        limit = self.max_pieces
        n = limit if max_len is None else min(int(max_len), limit)
        # the tokenizer would normalise and split all of a caption of a million words before truncating: text
        # past 64 characters per piece cannot reach the first n pieces (cut at a space: no word is split; a
        # longer word without one is a single [UNK] either way, BERT's words being at most 100 characters)
        text = head_at_space(caption, 64 * (n + 2))
        return list(self._tokenizer(text, truncation=True, max_length=n + 2)["input_ids"])

    def forward_parts(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = lengths.to(tokens.device)
        t = tokens.shape[1]
        if t > self.max_positions:
            raise ValueError(f"captions of {t} tokens; this BERT has {self.max_positions} positions")
        mask = torch.arange(t, device=tokens.device).unsqueeze(0) < lengths.unsqueeze(1)
        if self.cache_in_use():
            hidden = self._cached_hidden(tokens, lengths, mask)
        else:
            hidden = self.bert(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        if self.top is not None:
            hidden = self._run_top(hidden, lengths)
        words = self.proj(hidden)
        return self.gpo(words, lengths)[0], words

    def _run_top(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The top layers over ``hidden`` (batch, tokens, hidden), the captions of one length at a time without
        their padding (zeros past each length)."""
        lens = lengths.tolist()
        out = hidden.new_zeros(hidden.shape)
        for n, group in by_length(lens, range(len(lens))).items():
            at = torch.tensor(group, device=hidden.device)
            h = hidden[at, :n]
            for layer in self.top:
                h = layer(h)
                h = h[0] if isinstance(h, tuple) else h  # transformers 4 returned a tuple
            out[at, :n] = h
        return out

    def _cached_hidden(self, tokens: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """BERT's outputs for a batch, the captions seen before from the cache (zeros past each length, which
        the mask and GPO never read)."""
        lens = lengths.tolist()
        ids = tokens.cpu().numpy()

        def compute(todo: list[int]) -> list[torch.Tensor]:
            out: dict[int, torch.Tensor] = {}
            for n, group in by_length(lens, todo).items():  # one BERT call per caption length: no padding
                at = torch.tensor(group, device=tokens.device)
                hidden = self.bert(input_ids=tokens[at, :n], attention_mask=mask[at, :n].long()).last_hidden_state
                out.update(zip(group, hidden))
            return [out[i] for i in todo]

        rows = self.cached([ids[i, :n].tobytes() for i, n in enumerate(lens)], compute)
        out = nn.utils.rnn.pad_sequence(rows, batch_first=True)
        return nn.functional.pad(out, (0, 0, 0, tokens.shape[1] - out.shape[1]))
