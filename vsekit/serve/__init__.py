"""HTTP search over an index: a JSON API and a small web page (``vsekit serve``).

The limits (``vsekit.serve.limits``) can be read without importing the web stack.
"""

from __future__ import annotations


def create_app(*args, **kwargs):
    """See :func:`vsekit.serve.app.create_app` (imported lazily: FastAPI is only needed to serve)."""
    from vsekit.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["create_app"]
