"""A plain hand-written PyTorch baseline: the reference point vsekit's recipes must beat on real data.

Deliberately independent of vsekit's training code (its own model, loss and loop, about 90 lines); only the
metrics come from ``vsekit.eval.retrieval_metrics`` so that both sides are scored by the same protocol.
4-layer CNN with batch norm + mean pooling + linear head; bi-GRU + mean pooling + linear head; cosine
similarity; hinge loss with every same-image pair masked, one sum-of-hinges epoch then max of hinges;
no crops, horizontal flips; Adam 2e-4, batch 128. Images are decoded once and held in memory.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vsekit.data.images import open_image  # Image.open limited to raster formats, as everywhere
from vsekit.eval import retrieval_metrics

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def load(path: str, image_root: str, split: str, size: int = 64):
    items = [i for i in json.loads(Path(path).read_text())["images"] if i["split"] == split]
    ims = []
    for it in items:
        im = open_image(Path(image_root) / it["filepath"] / it["filename"]).convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im).convert("RGB").resize((size, size), Image.BICUBIC)
        ims.append(torch.from_numpy(np.array(im)).permute(2, 0, 1))
    caps = [(k, s["raw"]) for k, it in enumerate(items) for s in it["sentences"]]
    return torch.stack(ims), [c for _, c in caps], torch.tensor([k for k, _ in caps])


def tokenize(s: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", s.lower())


class Net(nn.Module):
    def __init__(self, vocab: int, dim: int = 512):
        super().__init__()
        layers, c = [], 3
        for w in (32, 64, 128, 256):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.cnn, self.img_fc = nn.Sequential(*layers), nn.Linear(c, dim)
        self.emb = nn.Embedding(vocab, 300, padding_idx=0)
        self.gru = nn.GRU(300, dim // 2, batch_first=True, bidirectional=True)
        self.txt_fc = nn.Linear(dim, dim)

    def images(self, x):
        x = ((x.float() / 255) - MEAN) / STD
        return F.normalize(self.img_fc(self.cnn(x).mean((2, 3))), dim=1)

    def texts(self, tok, lengths):
        out, _ = self.gru(self.emb(tok))
        mask = (torch.arange(tok.shape[1])[None] < lengths[:, None]).float().unsqueeze(2)
        return F.normalize(self.txt_fc((out * mask).sum(1) / lengths[:, None]), dim=1)


def encode_texts(caps, stoi):
    ids = [[stoi.get(w, 1) for w in tokenize(c)] or [1] for c in caps]
    lengths = torch.tensor([len(i) for i in ids])
    tok = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
    for k, i in enumerate(ids):
        tok[k, : len(i)] = torch.tensor(i)
    return tok, lengths


def hinge(sim, ids, margin, use_max):
    mask = ids[:, None] == ids[None, :]
    pos = sim.diag()
    c_s = (margin + sim - pos[:, None]).clamp(min=0).masked_fill(mask, 0)
    c_im = (margin + sim - pos[None, :]).clamp(min=0).masked_fill(mask, 0)
    if use_max:
        return c_s.max(1).values.sum() + c_im.max(0).values.sum()
    return c_s.sum() + c_im.sum()


@torch.no_grad()
def evaluate(net, ims, caps, c2i, stoi):
    net.eval()
    img = torch.cat([net.images(ims[i:i + 256]) for i in range(0, len(ims), 256)])
    tok, lengths = encode_texts(caps, stoi)
    txt = torch.cat([net.texts(tok[i:i + 256], lengths[i:i + 256]) for i in range(0, len(caps), 256)])
    net.train()
    return retrieval_metrics(img.numpy(), txt.numpy(), c2i.numpy(), protocol="full")


def run(path: str, image_root: str, seed: int = 0, max_minutes: float = 10.0, epochs: int = 100,
        lr: float = 2e-4, batch_size: int = 128, margin: float = 0.2) -> dict:
    torch.manual_seed(seed)
    tr_ims, tr_caps, tr_c2i = load(path, image_root, "train")
    va, te = load(path, image_root, "val"), load(path, image_root, "test")
    counts = Counter(w for c in tr_caps for w in tokenize(c))
    stoi = {w: k + 2 for k, w in enumerate(sorted(w for w, n in counts.items() if n >= 2))}
    tok, lengths = encode_texts(tr_caps, stoi)
    net = Net(len(stoi) + 2)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    best, best_state, history, t0 = -1.0, None, [], time.perf_counter()
    for epoch in range(epochs):
        for b in torch.randperm(len(tr_caps)).split(batch_size):
            x = tr_ims[tr_c2i[b]]
            flip = torch.rand(len(b)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            sim = net.images(x) @ net.texts(tok[b], lengths[b]).T
            loss = hinge(sim, tr_c2i[b], margin, use_max=epoch >= 1)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 2.0)
            opt.step()
        m = evaluate(net, *va, stoi)
        minutes = (time.perf_counter() - t0) / 60
        history.append({"epoch": epoch, "minutes": minutes, "val_rsum": m["rsum"], "loss": float(loss.detach())})
        if m["rsum"] > best:
            best, best_state = m["rsum"], {k: v.clone() for k, v in net.state_dict().items()}
        if minutes >= max_minutes:
            break
    net.load_state_dict(best_state)
    return {"test": evaluate(net, *te, stoi), "best_val_rsum": best, "history": history}


if __name__ == "__main__":
    import argparse

    from real_data import prepare

    p = argparse.ArgumentParser()
    p.add_argument("collection", choices=["emoji", "tabler"])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    info = prepare(a.collection)
    r = run(info["path"], info["image_root"], seed=a.seed, max_minutes=a.minutes)
    print(json.dumps({k: r[k] for k in ("best_val_rsum", "history")}, indent=None))
    print(f"test rsum {r['test']['rsum']:.1f}")
