"""Caption semantics for LSEH: one LSA (TF-IDF -> truncated SVD) vector per training caption."""

from vsekit.semantics.cache import (
    StaleCacheError,
    fit_or_load_caption_vectors,
    fit_or_load_lsa_model,
    fit_to_folder,
    load_caption_vectors,
)
from vsekit.semantics.lsa import (
    DEFAULT_N_COMPONENTS,
    DEFAULT_N_ITER,
    DEFAULT_RANDOM_STATE,
    PIPELINE_VERSION,
    STOP_WORDS,
    LSAModel,
    lsa_caption_vectors,
    preprocess_caption,
)

__all__ = ["DEFAULT_N_COMPONENTS", "DEFAULT_N_ITER", "DEFAULT_RANDOM_STATE", "PIPELINE_VERSION", "STOP_WORDS",
           "LSAModel", "StaleCacheError", "fit_or_load_caption_vectors", "fit_or_load_lsa_model",
           "fit_to_folder", "load_caption_vectors", "lsa_caption_vectors", "preprocess_caption"]
