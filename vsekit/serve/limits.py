"""The default limits of one request; here so that the command line can show them without the web stack."""

from __future__ import annotations

from vsekit.data.images import MAX_QUERY_ASPECT_RATIO, MAX_QUERY_IMAGE_PIXELS

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_QUERY_CHARS = 500
DEFAULT_MAX_K = 100
# an uploaded image's pixels, and its long side / short side (vsekit.data.images says why)
DEFAULT_MAX_IMAGE_PIXELS = MAX_QUERY_IMAGE_PIXELS
DEFAULT_MAX_ASPECT_RATIO = MAX_QUERY_ASPECT_RATIO
# Seconds: the most a client may take to send a request's headers, or between two pieces of its body ...
DEFAULT_READ_TIMEOUT = 10.0
# ... and to send a whole request body (10 MB in 60 s is 1.4 Mbit/s).
DEFAULT_BODY_TIMEOUT = 60.0
# Seconds an idle keep-alive connection stays open (uvicorn's default).
DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0
# Memory for decoding uploaded images. One decode may hold at most DEFAULT_MAX_DECODE_BYTES (estimated from the
# image's header before decoding, vsekit.data.images.decode_bytes: a 40-megapixel RGB, RGBA or 16-bit grey
# upload fits, a progressive JPEG of about 36 megapixels), and at most DEFAULT_MAX_DECODES uploads are decoded and embedded at once, so all of them
# together stay within DEFAULT_DECODE_MEMORY (2 GiB). A request that finds every slot taken waits up to
# DEFAULT_DECODE_WAIT seconds for one, then gets 503 with Retry-After: a queue bounded in time, not in length.
DEFAULT_MAX_DECODE_BYTES = 512 * 1024 * 1024
DEFAULT_DECODE_MEMORY = 2 * 1024 * 1024 * 1024
DEFAULT_MAX_DECODES = DEFAULT_DECODE_MEMORY // DEFAULT_MAX_DECODE_BYTES
DEFAULT_DECODE_WAIT = 10.0
# Seconds between two looks at the index's manifest for a generation that `index add`/`remove` committed
# (one stat() of manifest.json; the new generation is opened only when it changed).
DEFAULT_RELOAD_INTERVAL = 1.0
# The most digits a request's k may have (it is then compared with --max-k): "k" is ASCII digits only.
MAX_K_DIGITS = 6
