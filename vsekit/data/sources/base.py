"""The data-source registry: one typed options class and one reader per data format.

A data source turns its options (the ``data`` section of a config, discriminated by ``format``) and a split
name into a :class:`~vsekit.data.corpus.Corpus`. Every command (train, eval, encode, index, serve) reads
data through :func:`load_split`, so one data spec gives the same corpus everywhere.

Adding a source is one module in :mod:`vsekit.data.formats`: a subclass of :class:`DataConfig` with
``format: Literal["name"]``, its own fields, :meth:`DataConfig.read` and optionally :meth:`DataConfig.sniff`,
registered with :func:`register_source` (see ``docs/data.md``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vsekit.data.corpus import Corpus, DataError
from vsekit.errors import ConfigError, did_you_mean
from vsekit.registry import Registry

logger = logging.getLogger("vsekit.data")

#: data format name -> its :class:`DataConfig` subclass
SOURCES = Registry("data format")


class DataConfig(BaseModel):
    """Options every source shares: which splits, how many images, how images are checked, how batches are
    drawn. Subclasses add what their format needs (a path, an image root, ...)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    format: str = "demo"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    max_images: int | None = Field(None, ge=1, description="keep the first N images of every split")
    val_max_images: int | None = Field(1000, ge=1, description="first N images of the validation split "
                                                                "(the field's 1,000-image dev sets)")
    # true: read every image header before use; "decode": decode every image fully (finds truncated files)
    check_images: bool | Literal["decode"] = True
    skip_missing_images: bool = False
    num_workers: int = Field(0, ge=0)
    # decoded, resized training images kept in memory (MiB; 0: off): epochs after the first skip decoding
    image_cache_mb: int = Field(512, ge=0, le=1 << 20)
    sample: Literal["caption", "image"] = "caption"

    #: True when the source reads image files (its corpus has ``image_paths``) rather than features
    reads_image_files: ClassVar[bool] = True
    #: where :func:`sniff_source` tries this source (lower first; None: never); see :func:`register_source`
    sniff_priority: ClassVar[int | None] = None

    @field_validator("check_images", mode="before")
    @classmethod
    def _check_images_value(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "decode":
            return "decode"
        bool_words = {"true", "false", "yes", "no", "on", "off", "1", "0"}
        if isinstance(v, bool) or v in (0, 1) or (isinstance(v, str) and v.strip().lower() in bool_words):
            return v
        raise ValueError('must be true (read image headers), false (no check) or "decode" (decode every image)')

    def read(self, split: str, max_images: int | None) -> Corpus:
        """The corpus of ``split`` (its first ``max_images`` images when given)."""
        raise NotImplementedError

    @classmethod
    def sniff(cls, path: Path) -> bool:
        """True when ``path`` (a ``--data`` argument) looks like this source's data."""
        return False

    @classmethod
    def from_path(cls, path: Path, image_root: str | None = None) -> dict[str, Any]:
        """The source-specific options for a sniffed ``path``."""
        return {"path": str(path)}

    def describe(self) -> str:
        path = getattr(self, "path", None)
        return f"{self.format}:{path}" if path else self.format


def register_source(name: str, sniff_priority: int | None = None):
    """Class decorator: register a :class:`DataConfig` subclass as data format ``name`` in :data:`SOURCES`.
    Sources with a ``sniff_priority`` take part in recognising ``--data PATH`` (lower first); no two share
    one, so the order never depends on which module was imported first."""

    def deco(cls: type[DataConfig]) -> type[DataConfig]:
        owner = {SOURCES.get(n).sniff_priority: n for n in sniff_order()}.get(sniff_priority)
        if owner is not None and name not in SOURCES:
            raise KeyError(f"data format {name!r}: sniff_priority {sniff_priority} is {owner!r}'s already; "
                           "give each format its own, so the sniffing order does not depend on imports")
        SOURCES.register(name)(cls)
        cls.sniff_priority = sniff_priority
        return cls

    return deco


def sniff_order() -> list[str]:
    """The formats :func:`sniff_source` tries, in order (by their distinct ``sniff_priority``)."""
    sniffed = [n for n in SOURCES.names() if SOURCES.get(n).sniff_priority is not None]
    return sorted(sniffed, key=lambda n: SOURCES.get(n).sniff_priority)


def source_names() -> list[str]:
    return SOURCES.names()


def data_config(spec: dict[str, Any] | DataConfig, where: str = "data") -> DataConfig:
    """Validate a ``data`` section into its source's options (a :class:`ConfigError` names a bad key)."""
    from vsekit.registry import validate_section

    if isinstance(spec, DataConfig):
        return spec
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping, got {spec!r}")
    fmt = spec.get("format", DataConfig.model_fields["format"].default)
    if fmt not in SOURCES:
        raise ConfigError(f"{where}.format: unknown data format {fmt!r}{did_you_mean(fmt, SOURCES.names())} "
                          f"(known: {', '.join(source_names())})")
    return validate_section(SOURCES.get(fmt), spec, where)


def load_split(data: DataConfig | dict[str, Any], split: str, max_images: int | None = None) -> Corpus:
    """One split of a data set: read by its source, cut to ``max_images`` (else ``data.max_images``), and,
    for image files, checked (:func:`~vsekit.data.checks.check_images`: headers, or every image decoded
    when ``data.check_images`` is ``"decode"``) unless ``data.check_images`` is off."""
    from vsekit.data.checks import check_images, take_first_images

    data = data_config(data)
    n = max_images if max_images is not None else data.max_images
    if n is not None and n < 1:
        raise DataError(f"{data.describe()}: max_images must be >= 1, got {n}")
    corpus = data.read(split, n)
    if n is not None and corpus.num_images > n:
        corpus = take_first_images(corpus, n)
    if corpus.image_paths is not None and data.check_images:
        corpus = check_images(corpus, skip_missing=data.skip_missing_images, decode=data.check_images == "decode")
    return corpus


def sniff_source(arg: str, image_root: str | None = None, base: DataConfig | dict | None = None) -> DataConfig:
    """A ``--data`` argument to a data spec: ``demo``, or a path that one registered source recognises
    (a Karpathy ``dataset_*.json``, a precomputed-feature folder, a pairs file, a folder of images).

    The options every source shares (image checks, splits, ...) are taken from ``base`` (e.g. a checkpoint's
    own data section); so are a demo set's options when ``base`` is the demo set too.
    """
    base_cfg = data_config(base) if base is not None else None
    # the keys every data source has are kept when the format changes
    shared = {k: v for k, v in (base_cfg.model_dump() if base_cfg else {}).items()
              if k in DataConfig.model_fields and k != "format"}
    if arg == "demo":
        if base_cfg is not None and base_cfg.format == "demo":
            return base_cfg
        return data_config({**shared, "format": "demo"})
    path = Path(arg)
    if not path.exists():
        raise DataError(f"--data {arg}: no such file or folder")
    for name in sniff_order():
        cls = SOURCES.get(name)
        if cls.sniff(path):
            return data_config({**shared, "format": name, **cls.from_path(path, image_root)})
    kinds = ", ".join(SOURCES.get(n).__doc__.splitlines()[0].rstrip(".") for n in sniff_order())
    raise DataError(f"--data {arg}: not a data set vsekit recognises (expected 'demo' or one of: {kinds})")
