"""The default limits of one request; here so that the command line can show them without the web stack."""

from __future__ import annotations

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_QUERY_CHARS = 500
DEFAULT_MAX_K = 100
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
