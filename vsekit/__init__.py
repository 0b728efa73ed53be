"""vsekit: visual-semantic embeddings for image-text retrieval."""

__version__ = "0.1.0"
