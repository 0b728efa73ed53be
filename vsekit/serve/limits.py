"""What one request may ask of ``vsekit serve``: one :class:`Limits`, which the app, the HTTP server and the
command line read (here, so that the command line can show the defaults without the web stack)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from vsekit.data.images import MAX_QUERY_ASPECT_RATIO, MAX_QUERY_IMAGE_PIXELS

MIB = 1 << 20
# Memory for decoding uploads: one decode may hold at most max_decode_bytes (estimated from the image's header
# before decoding, vsekit.data.images.decode_bytes: a 40-megapixel RGB, RGBA or 16-bit grey upload fits, a
# progressive JPEG of about 36 megapixels), and at most max_decodes uploads are decoded and embedded at once,
# so that all of them together stay within DECODE_MEMORY. A request that finds every slot taken waits up to
# decode_wait seconds for one, then gets 503 with Retry-After: a queue bounded in time, not in length.
DECODE_MEMORY, _ONE_DECODE = 2048 * MIB, 512 * MIB
# Seconds between two looks at the index's manifest for a generation that `index add`/`remove` committed
# (one stat() of manifest.json; the new generation is opened only when it changed).
DEFAULT_RELOAD_INTERVAL = 1.0


def _limit(default: Any, kind: str, help: str) -> Any:
    """A field of :class:`Limits`. ``kind``: bytes or count (>= 1), ratio (>= 1), seconds (> 0); the command
    line reads each kind its way, and says ``help``."""
    return field(default=default, metadata={"kind": kind, "help": help})


@dataclass(frozen=True)
class Limits:
    """The limits of one request (and connection) to ``vsekit serve``: each is an option of the command and a
    keyword of :func:`vsekit.serve.app.create_app`. A value out of range is a ValueError naming it."""

    max_upload_bytes: int = _limit(10 * MIB, "bytes", "largest accepted image upload, e.g. 512K, 10M")
    max_query_chars: int = _limit(500, "count", "longest text query")
    max_k: int = _limit(100, "count", "most results per request")
    # an uploaded image's pixels, and its long side / short side (vsekit.data.images says why)
    max_image_pixels: int = _limit(MAX_QUERY_IMAGE_PIXELS, "count",
                                   "largest accepted upload in pixels, before and after the model's resize")
    max_aspect_ratio: float = _limit(MAX_QUERY_ASPECT_RATIO, "ratio",
                                     "most elongated accepted upload, long side / short side")
    read_timeout: float = _limit(10.0, "seconds", "longest wait for a request's headers, or for the next "
                                 "piece of an upload; a stalled client gets 408 and is disconnected")
    # 10 MB in 60 s is 1.4 Mbit/s
    body_timeout: float = _limit(60.0, "seconds", "longest time a whole request body may take to arrive")
    # uvicorn's default
    keep_alive_timeout: float = _limit(5.0, "seconds", "idle keep-alive connections are closed after this")
    max_decode_bytes: int = _limit(_ONE_DECODE, "bytes", "most memory one upload's decode may take, estimated "
                                   "from its header before any pixel is decoded (larger: 413), e.g. 256M")
    max_decodes: int = _limit(DECODE_MEMORY // _ONE_DECODE, "count", "uploads decoded and embedded at once; "
                              "the worst case of decode memory is this times --max-decode-bytes")
    decode_wait: float = _limit(10.0, "seconds", "longest wait of an upload for a free decode slot before it "
                                "is answered 503 with Retry-After")

    def __post_init__(self) -> None:
        for f in fields(self):
            value, seconds = getattr(self, f.name), f.metadata["kind"] == "seconds"
            if not (value > 0 if seconds else value >= 1):  # NaN fails both
                bound = "> 0 seconds" if seconds else ">= 1"
                raise ValueError(f"limits: {f.name} must be {bound}, got {value!r}")

    def to_json(self) -> dict[str, Any]:
        """What a client must keep to, as ``/health`` says it (seconds as ``*_s``)."""
        d = asdict(self)
        del d["keep_alive_timeout"]
        return {f"{k}_s" if k.endswith(("_timeout", "_wait")) else k: v for k, v in d.items()}
