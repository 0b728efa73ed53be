"""A training loop written the way the VSE++ reference code writes it, on precomputed features (issue 24).

The yardstick for vsekit's training throughput (``train_speed.py --features ... --recipe vsepp_f30k_precomp``):
independent of vsekit's training code, it follows the reference's habits -- a ``Dataset`` that tokenises its
caption in ``__getitem__`` and looks the words up in a vocabulary dict, a collate that sorts the batch by
length and pads it, a linear image encoder with l2 normalisation, an embedding + one-layer GRU over a packed
sequence whose last output is the caption vector, the max-of-hinges loss with the diagonal masked by an
identity matrix built at every step, Adam and the total gradient norm clipped at 2. float32 throughout (the
reference has no mixed precision on a CPU).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from plain_baseline import tokenize  # the hand-written scripts' one tokenizer
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.data import DataLoader, Dataset


class PrecompPairs(Dataset):
    """Caption ``i`` with the feature row of its image (``k`` captions per image, in file order)."""

    def __init__(self, root: Path, split: str, vocab: dict[str, int] | None = None, min_count: int = 4):
        self.ims = np.load(root / f"{split}_ims.npy")
        self.caps = (root / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()
        self.per_image = len(self.caps) // len(self.ims)
        if vocab is None:
            counts = Counter(w for c in self.caps for w in tokenize(c))
            vocab = {w: k + 4 for k, w in enumerate(sorted(w for w, n in counts.items() if n >= min_count))}
        self.vocab = vocab  # 0 pad, 1 start, 2 end, 3 unknown

    def __len__(self) -> int:
        return len(self.caps)

    def __getitem__(self, i: int):
        words = [1] + [self.vocab.get(w, 3) for w in tokenize(self.caps[i])] + [2]
        return torch.from_numpy(self.ims[i // self.per_image].astype(np.float32)), torch.tensor(words)


def collate(batch):
    batch.sort(key=lambda item: len(item[1]), reverse=True)
    images, captions = zip(*batch)
    lengths = [len(c) for c in captions]
    tokens = torch.zeros(len(captions), max(lengths), dtype=torch.long)
    for k, c in enumerate(captions):
        tokens[k, : len(c)] = c
    return torch.stack(images), tokens, lengths


class ReferenceNet(nn.Module):
    def __init__(self, img_dim: int, vocab: int, word_dim: int = 300, dim: int = 1024):
        super().__init__()
        self.fc = nn.Linear(img_dim, dim)
        self.embed = nn.Embedding(vocab, word_dim)
        self.gru = nn.GRU(word_dim, dim, 1, batch_first=True)

    def forward(self, images, tokens, lengths):
        im = F.normalize(self.fc(images), dim=1)
        out, _ = self.gru(pack_padded_sequence(self.embed(tokens), lengths, batch_first=True))
        out, _ = pad_packed_sequence(out, batch_first=True)
        last = torch.tensor(lengths).view(-1, 1, 1).expand(len(lengths), 1, out.size(2)) - 1
        return im, F.normalize(torch.gather(out, 1, last).squeeze(1), dim=1)


def max_of_hinges(im, s, margin: float = 0.2):
    scores = im @ s.t()
    diagonal = scores.diag().view(im.size(0), 1)
    cost_s = (margin + scores - diagonal).clamp(min=0)
    cost_im = (margin + scores - diagonal.t()).clamp(min=0)
    mask = torch.eye(scores.size(0)) > 0.5
    cost_s, cost_im = cost_s.masked_fill(mask, 0), cost_im.masked_fill(mask, 0)
    return cost_s.max(1)[0].sum() + cost_im.max(0)[0].sum()


class ReferenceLoop:
    """One object per run: ``epoch(steps)`` trains that many batches of a fresh shuffled pass."""

    def __init__(self, root: Path, batch_size: int = 128, word_dim: int = 300, dim: int = 1024, seed: int = 0):
        torch.manual_seed(seed)
        self.data = PrecompPairs(root, "train")
        self.net = ReferenceNet(self.data.ims.shape[1], len(self.data.vocab) + 4, word_dim, dim)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=2e-4)
        self.loader = DataLoader(self.data, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collate)

    def epoch(self, steps: int) -> float:
        self.net.train()
        for k, (images, tokens, lengths) in enumerate(self.loader):
            if k == steps:
                break
            loss = max_of_hinges(*self.net(images, tokens, lengths))
            self.opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(self.net.parameters(), 2.0)
            self.opt.step()
        return loss.item()
