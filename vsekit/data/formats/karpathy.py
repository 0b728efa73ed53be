"""The ``karpathy`` data format: Karpathy-split JSON files (``dataset_coco.json``, ``dataset_flickr30k.json``,
...) with the images beside them.

These files hold every split of a collection; one call returns one split. The JSON is parsed once per call
and only the images of the requested split are examined in detail, so reading COCO (123K images, 616K
sentences) stays a matter of seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from vsekit.data.corpus import Corpus, DataError
from vsekit.data.sources.base import DataConfig, register_source
from vsekit.data.textio import first_char, json_type, parse_json, read_utf8, short_repr

KARPATHY_SPLITS = ("train", "val", "test", "restval")
SPLIT_ALIASES = {"dev": "val"}  # the field's aliases onto the names used in Karpathy files
# Splits whose images are trained on: an image without captions there is a broken entry, not a distractor.
TRAINING_SPLITS = frozenset({"train", "restval"})
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@register_source("karpathy", sniff_priority=20)
class KarpathyData(DataConfig):
    """a Karpathy dataset_*.json."""

    format: Literal["karpathy"] = "karpathy"
    path: str
    image_root: str | None = None  # folder of filepath/filename (default: the JSON file's folder)
    restval_into_train: bool = False  # COCO: train on the restval images too (113,287 images)

    def read(self, split: str, max_images: int | None) -> Corpus:
        return read_karpathy(self.path, self.image_root, split, restval_into_train=self.restval_into_train,
                             max_images=max_images)

    @classmethod
    def sniff(cls, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".json" and first_char(path) == "{"

    @classmethod
    def from_path(cls, path: Path, image_root: str | None = None) -> dict[str, Any]:
        return {"path": str(path), "image_root": image_root or str(path.parent)}


def read_karpathy(json_path: str | Path, image_root: str | Path | None, split: str, *,
                  restval_into_train: bool = False, max_images: int | None = None) -> Corpus:
    """Read one split of a Karpathy-style JSON file.

    ``image_root`` is the folder the ``filepath``/``filename`` of each entry are relative to (``None``: the
    JSON file's folder). With ``restval_into_train`` the ``train`` split also holds the ``restval`` images,
    which is how COCO reaches 113,287 training images. ``max_images`` keeps the first N images of the split
    with all their captions (small dev sets).

    Errors name the file and the entry (``images[12].sentences[3]``), or the line and column of a JSON syntax
    error or a byte that is not UTF-8. ``meta["image_lines"]`` maps each image id to its entry, so
    :func:`~vsekit.data.checks.check_images` can say which entry names a missing image.
    """
    json_path = Path(json_path)
    root = json_path.parent if image_root is None else Path(image_root)
    wanted = SPLIT_ALIASES.get(split, split)
    if wanted not in KARPATHY_SPLITS:
        raise DataError(f"{json_path}: unknown split {split!r}; expected one of {', '.join(KARPATHY_SPLITS)} "
                        "(or 'dev')")
    if max_images is not None and max_images < 1:
        raise DataError(f"{json_path}: max_images must be >= 1, got {max_images}")
    accepted = {wanted} | ({"restval"} if wanted == "train" and restval_into_train else set())

    data = _load_json(json_path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{json_path}: expected a JSON object with an 'images' list")

    selected: list[int] = []
    for i, entry in enumerate(images):
        if not isinstance(entry, dict):
            raise DataError(f"{json_path}: images[{i}] is not a JSON object (got {json_type(entry)})")
        value = entry.get("split")
        if value is None:
            raise DataError(f"{json_path}: images[{i}] has no 'split' field")
        if value not in KARPATHY_SPLITS:
            raise DataError(f"{json_path}: images[{i}] has unknown split {short_repr(value)}; "
                            f"expected one of {', '.join(KARPATHY_SPLITS)}")
        if value in accepted:
            selected.append(i)
    if max_images is not None:
        selected = selected[:max_images]
    if not selected:
        raise DataError(f"{json_path}: split {split!r} holds no images")

    captions: list[str] = []
    caption_ids: list[str] = []
    caption_to_image: list[int] = []
    image_ids: list[str] = []
    image_paths: list[Path] = []
    labels: list[int] = []
    any_label = False
    first_index_of_id: dict[str, int] = {}
    image_lines: dict[str, str] = {}  # image id -> "file: images[i]"
    folders: dict[str | None, Path] = {}  # few distinct filepaths: build each folder Path once

    for row, i in enumerate(selected):
        entry = images[i]
        where = f"{json_path}: images[{i}]"
        filename = entry.get("filename")
        if not isinstance(filename, str) or not filename:
            raise DataError(f"{where} has no 'filename' (or it is not a non-empty string)")
        filepath = entry.get("filepath")
        if filepath is not None and not isinstance(filepath, str):
            raise DataError(f"{where}: 'filepath' must be a string")
        folder = folders.get(filepath)
        if folder is None:
            folder = folders[filepath] = root / filepath if filepath else root
        image_paths.append(folder / filename)

        image_id = _image_id(entry, filename)
        if image_id in first_index_of_id:
            raise DataError(f"{where} repeats image id {image_id!r} of images[{first_index_of_id[image_id]}]")
        first_index_of_id[image_id] = i
        image_lines[image_id] = where
        image_ids.append(image_id)

        label = entry.get("label")
        if label is None:
            labels.append(-1)
        elif isinstance(label, int) and not isinstance(label, bool) and _INT64_MIN <= label <= _INT64_MAX:
            labels.append(label)
            any_label = True
        else:
            raise DataError(f"{where}: 'label' must be an integer, got {short_repr(label)}")

        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            raise DataError(f"{where} has no 'sentences' list")
        if not sentences and entry["split"] in TRAINING_SPLITS:
            raise DataError(f"{where} (split {entry['split']!r}) has no sentences; training images need "
                            "captions")
        for k, sentence in enumerate(sentences):
            text = _sentence_text(sentence, f"{where}.sentences[{k}]")
            captions.append(text)
            caption_to_image.append(row)
            sentid = sentence.get("sentid")
            caption_ids.append(str(sentid) if sentid is not None else f"{image_id}#{k}")

    dataset = data.get("dataset") or json_path.stem.removeprefix("dataset_")
    if not isinstance(dataset, str):
        raise DataError(f"{json_path}: 'dataset' must be a string, got {short_repr(dataset)}")
    return Corpus(name=f"{dataset}_{wanted}", captions=captions, caption_to_image=caption_to_image,
                  image_ids=image_ids, image_paths=image_paths, caption_ids=caption_ids,
                  labels=labels if any_label else None,
                  meta={"format": "karpathy", "source": str(json_path), "dataset": dataset, "split": wanted,
                        "restval_into_train": bool(restval_into_train and wanted == "train"),
                        "max_images": max_images, "image_lines": image_lines})


def _load_json(json_path: Path) -> Any:
    """The parsed file. Not found, not UTF-8 (``file:line`` and byte offset) and not JSON (``file:line:col``)
    are errors naming the file."""
    if json_path.is_dir():
        raise DataError(f"{json_path}: is a folder, expected a Karpathy dataset_*.json file")
    return parse_json(read_utf8(json_path), str(json_path), whole_file=True)


def _image_id(entry: dict, filename: str) -> str:
    return next((str(entry[k]) for k in ("cocoid", "imgid") if entry.get(k) is not None), filename)


def _sentence_text(sentence: Any, where: str) -> str:
    """The caption of one sentence entry: ``raw`` if present, else the joined ``tokens``."""
    if not isinstance(sentence, dict):
        raise DataError(f"{where} is not a JSON object (got {json_type(sentence)})")
    raw = sentence.get("raw")
    if raw is None:
        tokens = sentence.get("tokens")
        if tokens is None:
            raise DataError(f"{where} has neither 'raw' nor 'tokens'")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DataError(f"{where}: 'tokens' must be a list of strings")
        raw = " ".join(tokens)
    elif not isinstance(raw, str):
        raise DataError(f"{where}: 'raw' must be a string, got {json_type(raw)}")
    text = raw.strip()
    if not text:
        raise DataError(f"{where}: empty caption")
    return text
