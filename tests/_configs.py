"""The tiny run config that the trainer tests build (:func:`tiny_config`)."""

from __future__ import annotations

from vsekit.config import RunConfig, resolve_config

# What every tiny run shares: the default data set (the synthetic demo set, ``data.format=demo``), a vocabulary
# of every word (a few dozen captions), no progress bar in the test log.
TINY = ("text.min_count=1", "train.progress=false")


def tiny_config(out, *overrides: str) -> RunConfig:
    """The default config with :data:`TINY`, written to ``out``; each test passes exactly the keys it changes
    (its size, model, loss, seed), so what it trains reads at the call."""
    return resolve_config(None, [f"output_dir={out}", *TINY, *overrides])

# A recipe's network at test size: 32-pixel images, 16-d embeddings, a 4-channel CNN, 8-d word vectors.
SMALL = ("transform.image_size=32", "transform.resize=32", "model.embed_size=16", "model.image_encoder.width=4",
         "model.text_encoder.word_dim=8")


def small_recipe_config(recipe: str, out, *overrides: str) -> RunConfig:
    """A built-in recipe (``demo_vsepp``, ``scratch_small``) at test size (:data:`SMALL`), no progress bar,
    written to ``out``; each test passes the keys it changes (data size, epochs, protocol)."""
    from vsekit.cli import recipe_path

    return resolve_config(recipe_path(recipe), [f"output_dir={out}", *SMALL, "train.progress=false", *overrides])


# GXN's two-level order model at test size (the small CNN and a GRU under two_level): 60 demo images, 2 steps
TINY_TWO_LEVEL = (
    "seed=1", "data.num_images=60", "data.val_max_images=12", "transform.image_size=32", "transform.resize=32",
    "model.embed_size=8", "model.use_abs=true", "model.similarity=two_level_order",
    "model.image_encoder={name: two_level, encoder: {name: cnn, backbone: small_cnn, width: 4, pretrained: false, "
    "finetune: true}}",
    "model.text_encoder={name: two_level, encoder: {name: gru, word_dim: 6}}",
    "train.batch_size=12", "train.epochs=1", "train.max_steps_per_epoch=2", "eval.chunk_size=8",
)
