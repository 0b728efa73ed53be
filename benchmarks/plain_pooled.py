"""A plain hand-written script on frozen pooled features: the reference the pretrained recipe must beat (issue 22).

Independent of vsekit's training code: numpy reads ``$VSEKIT_CACHE/benchmarks/<collection>_pooled``
(``{split}_ims.npy`` N x 1280 EfficientNet-Lite0 vectors, ``{split}_caps.txt``, k captions per image); a linear
map 1280 -> D of the image vector; a bi-GRU over a word vocabulary (words seen twice in training), the mean
of its two directions' outputs averaged over the words; cosine similarity; one epoch of the sum of hinges, then
the max of hinges (margin 0.2, other captions of the same image masked); Adam 2e-4, batch 128, gradient norm
clipped at 2. A wall-clock budget (``--minutes``) is checked after every step; the model of the best validation
rsum (checked after each epoch and when the budget runs out) is scored on the test split by vsekit's
``retrieval_metrics`` (VSE++ protocol, all captions), and one JSON line is appended to
``benchmarks/results/pretrained_recipe.jsonl``. The tokenizer, the caption batching, the hinge and the
evaluation are ``plain_baseline.py``'s (the raw-pixel plain script).

    OMP_NUM_THREADS=1 python benchmarks/plain_pooled.py emoji_224 --minutes 10 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _jobs import RESULTS
from plain_baseline import encode_texts, evaluate, hinge, tokenize
from real_data import cache_dir
from torch import nn

OUT = RESULTS / "pretrained_recipe.jsonl"


def load(root: Path, split: str, max_images: int | None = None):
    ims = np.load(root / f"{split}_ims.npy", mmap_mode="r")
    caps = (root / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()
    per_image = len(caps) // len(ims)
    ims = ims[:max_images]
    caps = caps[: len(ims) * per_image]
    return torch.from_numpy(np.array(ims, dtype=np.float32)), caps, torch.arange(len(caps)) // per_image


class PooledNet(nn.Module):
    def __init__(self, vocab: int, img_dim: int = 1280, dim: int = 1024, word_dim: int = 300):
        super().__init__()
        self.img_fc = nn.Linear(img_dim, dim)
        self.emb = nn.Embedding(vocab, word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, dim, batch_first=True, bidirectional=True)

    def images(self, x):
        return F.normalize(self.img_fc(x), dim=1)

    def texts(self, tok, lengths):
        out, _ = self.gru(self.emb(tok))
        out = (out[..., : out.shape[2] // 2] + out[..., out.shape[2] // 2:]) / 2  # mean of the two directions
        mask = (torch.arange(tok.shape[1])[None] < lengths[:, None]).float().unsqueeze(2)
        return F.normalize((out * mask).sum(1) / lengths[:, None], dim=1)


def run(root: Path, seed: int = 0, minutes: float = 10.0, dim: int = 1024, lr: float = 2e-4, batch_size: int = 128,
        margin: float = 0.2, max_images: int | None = None) -> dict:
    torch.manual_seed(seed)
    tr_ims, tr_caps, tr_c2i = load(root, "train", max_images)
    va, te = load(root, "val", max_images), load(root, "test", max_images)
    counts = Counter(w for c in tr_caps for w in tokenize(c))
    stoi = {w: k + 2 for k, w in enumerate(sorted(w for w, n in counts.items() if n >= 2))}
    tok, lengths = encode_texts(tr_caps, stoi)
    net = PooledNet(len(stoi) + 2, tr_ims.shape[1], dim)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    best, best_state, history, steps, epoch, t0 = -1.0, None, [], 0, 0, time.perf_counter()
    out_of_time = False
    while not out_of_time:
        batches, done = torch.randperm(len(tr_caps)).split(batch_size), 0
        for b in batches:
            sim = net.images(tr_ims[tr_c2i[b]]) @ net.texts(tok[b], lengths[b]).T
            loss = hinge(sim, tr_c2i[b], margin, use_max=epoch >= 1)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 2.0)
            opt.step()
            steps, done = steps + 1, done + 1
            if time.perf_counter() - t0 >= 60 * minutes:
                out_of_time = True
                break
        full_epoch = done == len(batches)
        m = evaluate(net, *va, stoi)
        history.append({"epoch": epoch, "steps": steps, "minutes": (time.perf_counter() - t0) / 60,
                        "val_rsum": m["rsum"], "loss": float(loss.detach()), "full_epoch": full_epoch})
        if m["rsum"] > best:
            best, best_state = m["rsum"], {k: v.clone() for k, v in net.state_dict().items()}
        epoch += 1
    train_s = time.perf_counter() - t0
    net.load_state_dict(best_state)
    test = evaluate(net, *te, stoi)
    return {"test_rsum": test["rsum"], "test": test, "best_val_rsum": best,
            "best_epoch": max(history, key=lambda h: h["val_rsum"])["epoch"] + 1, "epochs": epoch, "steps": steps,
            "train_s": train_s, "history": history, "num_test_images": len(te[0]), "vocab": len(stoi) + 2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("collection", choices=["emoji_224", "tabler_224"])
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget, checked per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=1024, help="joint space D")
    p.add_argument("--max-images", type=int, default=None, help="smoke tests: the first N images of each split")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    root = cache_dir() / f"{a.collection}_pooled"
    r = run(root, seed=a.seed, minutes=a.minutes, dim=a.dim, max_images=a.max_images)
    row = {"arm": "plain_pooled", "collection": a.collection, "seed": a.seed, "minutes": a.minutes, "dim": a.dim,
           "max_images": a.max_images, **r, "features": str(root),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s)"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{a.collection} seed {a.seed}: test rsum {r['test_rsum']:.1f} (best val {r['best_val_rsum']:.1f} after "
          f"epoch {r['best_epoch']} of {r['epochs']}, {r['steps']} steps, {r['train_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
