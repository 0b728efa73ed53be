"""What scoring through SGRAF's similarity network costs, and how good the index's shortlist is.

1. Pairs per second of the SGR and SAF networks at the paper's sizes (E 1024, 36 regions, sim_dim 256, 3 steps)
   and at the demo recipe's sizes, random weights, evaluation mode with fixed shapes (what ``vsekit eval`` runs).
2. Given trained demo checkpoints (``--checkpoint RUN``, repeatable): on the demo test split (300 images, 1,500
   captions), how often the network's own best image for a caption is in the inner-product shortlist of the
   pooled embeddings at depth k, and the text -> image R@1 of the two-stage search next to the exact network's.

    .venv/bin/python benchmarks/sgraf_cost.py                         # part 1
    .venv/bin/python benchmarks/sgraf_cost.py --checkpoint runs/sgr_demo --checkpoint runs/saf_demo
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from vsekit.models import build_model

SIZES = {
    "paper": dict(embed=1024, regions=36, feat=2048, sim_dim=256, words=12, images=32, captions=128),
    "demo": dict(embed=128, regions=16, feat=48, sim_dim=32, words=17, images=32, captions=512),
}


def network_speed(kind: str, size: str, repeats: int) -> float:
    s = SIZES[size]
    spec = {"name": kind, "sim_dim": s["sim_dim"]}
    torch.manual_seed(0)
    model = build_model({"embed_size": s["embed"], "similarity": spec, "image_encoder": {"name": "sgraf_regions"},
                         "text_encoder": {"name": "sgraf_words", "word_dim": 300}}, vocab_size=1000,
                        feature_shape=(s["regions"], s["feat"])).eval()
    g = torch.Generator().manual_seed(0)
    regions = torch.nn.functional.normalize(torch.randn(s["images"], s["regions"], s["embed"], generator=g), dim=-1)
    t = s["words"] + 2  # <start> ... <end>
    words = torch.nn.functional.normalize(torch.randn(s["captions"], t, s["embed"], generator=g), dim=-1)
    lengths = torch.full((s["captions"],), t)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.similarity(regions, words, lengths, fixed_shapes=True)
            best = min(best, time.perf_counter() - t0)
    return s["images"] * s["captions"] / best


def shortlist_quality(checkpoint: str, depths: tuple[int, ...]) -> dict:
    from vsekit.data.sources import load_split
    from vsekit.inference import Embedder

    emb = Embedder.from_checkpoint(checkpoint, device="cpu")
    corpus = load_split(emb.config.data, emb.config.data.test_split, None)
    img, img_sets = emb.encode_images(corpus, parts=True)
    cap, cap_sets = emb.encode_texts(corpus, parts=True)
    t0 = time.perf_counter()
    net = emb.score_sets(img_sets, cap_sets)  # (N, M) exact network scores
    seconds = time.perf_counter() - t0
    ip = img @ cap.T
    n = corpus.num_images
    owner = corpus.caption_to_image
    best_net = np.argmax(net, axis=0)
    out = {"checkpoint": checkpoint, "images": n, "captions": corpus.num_captions,
           "network_pairs_per_s": net.size / seconds,
           "exact_t2i_r1": float(100 * np.mean(best_net == owner)),
           "ip_only_t2i_r1": float(100 * np.mean(np.argmax(ip, axis=0) == owner))}
    order_ip = np.argsort(-ip, axis=0, kind="stable")
    for k in depths:
        short = order_ip[:k]  # (k, M)
        out[f"net_top1_in_shortlist@{k}"] = float(100 * np.mean((short == best_net[None, :]).any(0)))
        picked = short[np.argmax(np.take_along_axis(net, short, 0), axis=0), np.arange(short.shape[1])]
        out[f"two_stage_t2i_r1@{k}"] = float(100 * np.mean(picked == owner))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", default=[])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_speed:
        for size in SIZES:
            for kind in ("sgr", "saf"):
                print(json.dumps({"size": size, "network": kind, "threads": args.threads,
                                  "pairs_per_s": round(network_speed(kind, size, args.repeats))}))
    for ckpt in args.checkpoint:
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v
                          for k, v in shortlist_quality(ckpt, (10, 30, 100)).items()}))


if __name__ == "__main__":
    main()
