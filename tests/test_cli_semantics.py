"""`vsekit semantics fit`: LSA vectors of a data set's training captions, keyed to caption ids."""

from __future__ import annotations

import json

import numpy as np

from vsekit.cli import main
from vsekit.semantics import LSAModel


def test_semantics_fit_on_pairs_file(tmp_path):
    rows = ["image,caption,split"]
    words = ["red", "blue", "green", "circle", "square", "left", "right", "large", "small"]
    rng = np.random.default_rng(0)
    for i in range(40):
        for _ in range(3):
            cap = " ".join(rng.choice(words, size=6))
            rows.append(f"img{i}.png,a {cap},{'train' if i < 30 else 'test'}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "lsa"
    assert main(["semantics", "fit", "--data", str(tmp_path / "pairs.csv"), "--split", "train",
                 "--out", str(out), "--n-components", "5", "--n-iter", "5"]) == 0
    vecs = np.load(out / "vectors.npy")
    assert vecs.shape == (90, 5) and vecs.dtype == np.float32
    ids = json.loads((out / "caption_ids.json").read_text())
    assert len(ids) == 90
    model = LSAModel.load(out / "model")
    train_caps = [r.split(",")[1] for r in rows[1:] if r.endswith(",train")]
    np.testing.assert_allclose(model.transform(train_caps[:4]), vecs[:4], atol=1e-4)


def test_semantics_fit_missing_data_is_clear(tmp_path, capsys):
    assert main(["semantics", "fit", "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.csv" in capsys.readouterr().err
