"""HTTP search over an index: a JSON API and a small web page (``vsekit serve``).

The limits (``vsekit.serve.limits``) can be read without importing the web stack.
"""

from __future__ import annotations

from vsekit.serve.limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_KEEP_ALIVE_TIMEOUT,
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_K,
    DEFAULT_MAX_QUERY_CHARS,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_READ_TIMEOUT,
)


def create_app(*args, **kwargs):
    """See :func:`vsekit.serve.app.create_app` (imported lazily: FastAPI is only needed to serve)."""
    from vsekit.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["DEFAULT_BODY_TIMEOUT", "DEFAULT_KEEP_ALIVE_TIMEOUT", "DEFAULT_MAX_ASPECT_RATIO",
           "DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_MAX_K", "DEFAULT_MAX_QUERY_CHARS", "DEFAULT_MAX_UPLOAD_BYTES",
           "DEFAULT_READ_TIMEOUT", "create_app"]
