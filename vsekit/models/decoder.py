"""A caption decoder: an RNN language model conditioned on an image vector, optionally attending to regions.

It is the image->text half of GXN ("Look, Imagine and Match": a decoder reads the grounded image embedding
v_l) and VSRN's caption-generation branch (a decoder attends to the reasoned region features). The model is
trained by teacher forcing (:meth:`CaptionDecoder.forward`, :meth:`CaptionDecoder.xe_loss`) and decodes by
:func:`greedy_decode`, :func:`sample_decode` or :func:`beam_search`, which only see a *step function*
``step(words (N,), state) -> (log-probs (N, V), state)``, so they are tested on hand-made toy models too.

The distribution never puts mass on ``<pad>`` or ``<start>`` (their logits are -inf in every mode): neither
is ever a target, and a decoder that could emit them would need special cases in every decoding rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

State = dict[str, Tensor]  # every tensor has the batch (or batch x beam) dimension first
StepFn = Callable[[Tensor, State], tuple[Tensor, State]]


@dataclass
class Decoded:
    """Decoded sequences: ``tokens`` (N, L) word ids, the end token included, ``pad_id`` after it;
    ``logprobs`` (N, L) the log-probability of each emitted token (0 after the end); ``mask`` (N, L) which
    positions are emitted tokens. A sequence without an end token was cut at ``max_len``."""

    tokens: Tensor
    logprobs: Tensor
    mask: Tensor

    @property
    def lengths(self) -> Tensor:
        """(N,) emitted tokens per sequence, the end token included."""
        return self.mask.sum(1)

    def sequence_logprob(self) -> Tensor:
        """(N,) log p of each whole sequence: the sum over its emitted tokens."""
        return self.logprobs.masked_fill(~self.mask, 0.0).sum(1)

    def words(self, end_id: int) -> list[list[int]]:
        """Each sequence's word ids, without the end token and padding."""
        out = []
        for row, m in zip(self.tokens.tolist(), self.mask.tolist()):
            seq = [t for t, keep in zip(row, m) if keep]
            out.append(seq[:-1] if seq and seq[-1] == end_id else seq)
        return out


def _check_max_len(max_len: int) -> int:
    if int(max_len) < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    return int(max_len)


def _reorder(state: State, index: Tensor) -> State:
    return {k: v.index_select(0, index) for k, v in state.items()}


def _decode(step: StepFn, state: State, n: int, pick: Callable[[Tensor], Tensor], *, start_id: int,
            end_id: int, pad_id: int, max_len: int, device: torch.device) -> Decoded:
    """One token per step, chosen by ``pick(log-probs) -> (N,) ids``, until every sequence has ended."""
    max_len = _check_max_len(max_len)
    words = torch.full((n,), start_id, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    for _ in range(max_len):
        logp, state = step(words, state)
        w = pick(logp)
        lp = logp.gather(1, w[:, None]).squeeze(1)
        w = w.masked_fill(finished, pad_id)
        lp = lp.masked_fill(finished, 0.0)
        tokens.append(w)
        logprobs.append(lp)
        finished = finished | (w == end_id)
        words = w
        if bool(finished.all()):
            break
    tok = torch.stack(tokens, 1)
    return Decoded(tok, torch.stack(logprobs, 1), tok != pad_id)


def greedy_decode(step: StepFn, state: State, n: int, *, start_id: int, end_id: int, pad_id: int = 0,
                  max_len: int = 20, device: torch.device | str = "cpu") -> Decoded:
    """The most likely word at every step (the baseline of self-critical training)."""
    return _decode(step, state, n, lambda logp: logp.argmax(1), start_id=start_id, end_id=end_id, pad_id=pad_id,
                   max_len=max_len, device=torch.device(device))


def sample_decode(step: StepFn, state: State, n: int, *, start_id: int, end_id: int, pad_id: int = 0,
                  max_len: int = 20, temperature: float = 1.0, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> Decoded:
    """Words drawn from the model's distribution (``softmax(log p / temperature)``). The recorded
    ``logprobs`` are the model's own (temperature 1): what the policy gradient differentiates."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def pick(logp: Tensor) -> Tensor:
        probs = torch.softmax(logp.detach().float() / temperature, dim=1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _decode(step, state, n, pick, start_id=start_id, end_id=end_id, pad_id=pad_id, max_len=max_len,
                   device=torch.device(device))


@torch.no_grad()
def beam_search(step: StepFn, state: State, n: int, *, beam_size: int = 3, start_id: int, end_id: int,
                pad_id: int = 0, max_len: int = 20, length_norm: float = 0.0,
                device: torch.device | str = "cpu") -> Decoded:
    """The best of ``beam_size`` hypotheses kept per image, all images and beams in one batch of
    ``n * beam_size`` rows.

    Hypotheses are ranked by their summed log-probability while searching; a finished one stays in its slot
    at no cost and competes with the open ones. The returned hypothesis maximises ``sum log p / length **
    length_norm`` (``length_norm`` 0: the plain sum, 1: the mean per token; lengths count the end token).
    With ``beam_size`` 1 this is :func:`greedy_decode`.
    """
    max_len = _check_max_len(max_len)
    k = int(beam_size)
    if k < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    device = torch.device(device)
    state = {key: v.repeat_interleave(k, 0) for key, v in state.items()}
    words = torch.full((n * k,), start_id, dtype=torch.long, device=device)
    scores = torch.zeros(n, k, device=device)
    scores[:, 1:] = float("-inf")  # all beams start as the same empty hypothesis: keep one
    finished = torch.zeros(n, k, dtype=torch.bool, device=device)
    lengths = torch.zeros(n, k, device=device)
    tokens = torch.zeros(n, k, 0, dtype=torch.long, device=device)
    token_lp = torch.zeros(n, k, 0, device=device)
    base = (torch.arange(n, device=device) * k)[:, None]
    for t in range(max_len):
        logp, state = step(words, state)
        v = logp.shape[1]
        logp = logp.float().view(n, k, v)
        done_row = torch.full((v,), float("-inf"), device=device)
        done_row[pad_id] = 0.0  # a finished hypothesis continues with padding only, at no cost
        logp = torch.where(finished[..., None], done_row, logp)
        top, idx = (scores[..., None] + logp).view(n, k * v).topk(k, dim=1)
        origin, word = idx // v, idx % v
        state = _reorder(state, (origin + base).view(-1))
        was_done = finished.gather(1, origin)
        tokens = torch.cat([tokens.gather(1, origin[..., None].expand(n, k, t)), word[..., None]], 2)
        token_lp = torch.cat([token_lp.gather(1, origin[..., None].expand(n, k, t)),
                              logp.view(n, k * v).gather(1, idx)[..., None]], 2)
        lengths = lengths.gather(1, origin) + (~was_done).float()
        finished = was_done | (word == end_id)
        scores = top
        words = word.view(-1)
        if bool((finished | torch.isinf(scores)).all()):  # every hypothesis ended (or was never possible)
            break
    final = scores / lengths.clamp(min=1.0) ** length_norm if length_norm else scores
    best = final.argmax(1)
    rows = torch.arange(n, device=device)
    tok, lp = tokens[rows, best], token_lp[rows, best]
    width = int((tok != pad_id).sum(1).max()) if n else 0  # drop the columns only other hypotheses used
    tok, lp = tok[:, :width], lp[:, :width]
    return Decoded(tok, lp.masked_fill(tok == pad_id, 0.0), tok != pad_id)


class CaptionDecoder(nn.Module):
    """Word embedding -> LSTM or GRU cell -> vocabulary, conditioned on an image vector and, with
    ``context_dim``, attending to a (B, R, context_dim) set of regions at every step.

    ``inject``: where the image vector enters -- ``"init"`` the initial state (``h0 = tanh(W v)``, and the
    LSTM's cell state ``c0 = W' v``), ``"step"`` the input of every step (``W'' v`` beside the word
    embedding; the state starts at zero), ``"both"``. Attention is additive (Bahdanau et al.): region r gets
    weight softmax_r(w · tanh(K c_r + Q h_{t-1})), and the weighted regions are part of the step's input.

    ``image_norm``: ``"batch"`` standardises each coordinate of the image vector over the batch (batch norm
    without affine parameters; running statistics in eval mode) before it enters. An order embedding is a
    non-negative unit vector in a narrow cone (mean pairwise cosine 0.84 over the demo's test images): read as
    it is, its common direction moves the state and the part that tells images apart is a small residual.
    """

    def __init__(self, vocab_size: int, image_dim: int, hidden: int = 512, word_dim: int = 300,
                 cell: Literal["lstm", "gru"] = "lstm", context_dim: int | None = None,
                 attention_dim: int | None = None, inject: Literal["init", "step", "both"] = "init",
                 dropout: float = 0.0, start_id: int = 1, end_id: int = 2, pad_id: int = 0,
                 image_norm: Literal["none", "batch"] = "none") -> None:
        super().__init__()
        if image_norm not in ("none", "batch"):
            raise ValueError(f"image_norm must be 'none' or 'batch', got {image_norm!r}")
        if cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        if inject not in ("init", "step", "both"):
            raise ValueError(f"inject must be 'init', 'step' or 'both', got {inject!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        for name, value in (("vocab_size", vocab_size), ("image_dim", image_dim), ("hidden", hidden),
                            ("word_dim", word_dim)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.vocab_size, self.image_dim, self.hidden = int(vocab_size), int(image_dim), int(hidden)
        self.cell_type, self.inject = cell, inject
        self.start_id, self.end_id, self.pad_id = start_id, end_id, pad_id
        self.context_dim = int(context_dim) if context_dim else None
        if image_norm == "batch":
            self.image_norm = nn.BatchNorm1d(image_dim, affine=False)
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=pad_id)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        in_dim = word_dim
        if inject in ("init", "both"):
            self.init_state = nn.Linear(image_dim, hidden * (2 if cell == "lstm" else 1))
        if inject in ("step", "both"):
            self.image_input = nn.Linear(image_dim, word_dim)
            in_dim += word_dim
        if self.context_dim:
            a = int(attention_dim or hidden)
            self.att_key = nn.Linear(self.context_dim, a)
            self.att_query = nn.Linear(hidden, a, bias=False)
            self.att_score = nn.Linear(a, 1, bias=False)
            in_dim += self.context_dim
        self.cell = nn.LSTMCell(in_dim, hidden) if cell == "lstm" else nn.GRUCell(in_dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, vocab_size)
        banned = torch.zeros(vocab_size, dtype=torch.bool)
        banned[[pad_id, start_id]] = True
        self.register_buffer("banned", banned, persistent=False)

    @property
    def attends(self) -> bool:
        return self.context_dim is not None

    # -- one step ----------------------------------------------------------------------------------
    def normalise(self, image: Tensor) -> Tensor:
        """The image vector as the decoder reads it: standardised by ``image_norm`` (batch statistics in
        training mode, running ones in eval mode), or as it is."""
        return self.image_norm(image) if hasattr(self, "image_norm") else image

    def start(self, image: Tensor, context: Tensor | None = None, normed: bool = False) -> State:
        """The state before the first word, from the (B, image_dim) image vector and the regions;
        ``normed``: the vector has been through :meth:`normalise` already."""
        if image.dim() != 2 or image.shape[1] != self.image_dim:
            raise ValueError(f"the decoder reads (B, {self.image_dim}) image vectors, got {tuple(image.shape)}")
        b = image.shape[0]
        if not normed:
            image = self.normalise(image)
        state: State = {}
        if self.inject in ("init", "both"):
            init = self.init_state(image)
            if self.cell_type == "lstm":
                h, c = init.chunk(2, dim=1)
                state["h"], state["c"] = torch.tanh(h), c
            else:
                state["h"] = torch.tanh(init)
        else:
            state["h"] = image.new_zeros(b, self.hidden)
            if self.cell_type == "lstm":
                state["c"] = image.new_zeros(b, self.hidden)
        if self.inject in ("step", "both"):
            state["image"] = self.image_input(image)
        if self.attends:
            if context is None:
                raise ValueError("this decoder attends to regions: it needs a (B, R, D) context")
            if context.dim() != 3 or context.shape[0] != b or context.shape[2] != self.context_dim:
                raise ValueError(f"the decoder attends to (B, R, {self.context_dim}) regions, got "
                                 f"{tuple(context.shape)}")
            state["context"], state["keys"] = context, self.att_key(context)
        return state

    def step(self, words: Tensor, state: State) -> tuple[Tensor, State]:
        """(N, V) float32 log-probabilities of the next word after ``words`` (N,), and the new state."""
        h = state["h"]
        inputs = [self.drop(self.embed(words))]
        if "image" in state:
            inputs.append(state["image"])
        if self.attends:
            e = self.att_score(torch.tanh(state["keys"] + self.att_query(h)[:, None, :])).squeeze(2)  # (N, R)
            alpha = torch.softmax(e.float(), dim=1).to(state["context"].dtype)
            inputs.append(torch.bmm(alpha[:, None, :], state["context"]).squeeze(1))
        x = torch.cat(inputs, dim=1)
        new = dict(state)
        if self.cell_type == "lstm":
            new["h"], new["c"] = self.cell(x, (h, state["c"]))
        else:
            new["h"] = self.cell(x, h)
        logits = self.out(self.drop(new["h"])).float().masked_fill(self.banned, float("-inf"))
        return torch.log_softmax(logits, dim=1), new

    # -- training ----------------------------------------------------------------------------------
    def forward(self, image: Tensor, tokens: Tensor, context: Tensor | None = None) -> Tensor:
        """Teacher forcing: (B, T-1, V) log-probabilities of ``tokens[:, 1:]`` given the words before them
        (``tokens`` (B, T): ``<start> w1 ... wn <end>``, padded with ``pad_id``)."""
        state = self.start(image, context)
        out = []
        for t in range(tokens.shape[1] - 1):
            logp, state = self.step(tokens[:, t], state)
            out.append(logp)
        return torch.stack(out, 1)

    def xe_loss(self, image: Tensor, tokens: Tensor, context: Tensor | None = None) -> Tensor:
        """The mean cross-entropy per target token (words and the end token; padding excluded)."""
        if tokens.shape[1] < 2:
            raise ValueError("captions need at least <start> and <end>")
        targets = tokens[:, 1:]
        logp = self(image, tokens, context)
        mask = targets != self.pad_id
        # padding targets have log p = -inf (pad is banned): drop them before summing, not after (inf * 0)
        nll = -logp.gather(2, targets.masked_fill(~mask, self.end_id)[..., None]).squeeze(2)
        return nll.masked_fill(~mask, 0.0).sum() / mask.sum().clamp(min=1)

    # -- decoding ----------------------------------------------------------------------------------
    def _ids(self) -> dict[str, int]:
        return {"start_id": self.start_id, "end_id": self.end_id, "pad_id": self.pad_id}

    def greedy(self, image: Tensor, context: Tensor | None = None, max_len: int = 20, normed: bool = False) -> Decoded:
        return greedy_decode(self.step, self.start(image, context, normed), image.shape[0], max_len=max_len,
                             device=image.device, **self._ids())

    def sample(self, image: Tensor, context: Tensor | None = None, max_len: int = 20, temperature: float = 1.0,
               generator: torch.Generator | None = None, normed: bool = False) -> Decoded:
        return sample_decode(self.step, self.start(image, context, normed), image.shape[0], max_len=max_len,
                             temperature=temperature, generator=generator, device=image.device, **self._ids())

    def beam(self, image: Tensor, context: Tensor | None = None, beam_size: int = 3, max_len: int = 20,
             length_norm: float = 0.0) -> Decoded:
        return beam_search(self.step, self.start(image, context), image.shape[0], beam_size=beam_size,
                           max_len=max_len, length_norm=length_norm, device=image.device, **self._ids())

    def decode(self, image: Tensor, context: Tensor | None = None, beam_size: int = 1, max_len: int = 20,
               length_norm: float = 0.0) -> Decoded:
        """Greedy for ``beam_size`` 1, else beam search."""
        if beam_size == 1:
            with torch.no_grad():
                return self.greedy(image, context, max_len)
        return self.beam(image, context, beam_size, max_len, length_norm)
