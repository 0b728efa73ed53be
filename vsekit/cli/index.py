"""The ``index``, ``search`` and ``serve`` verbs of the ``vsekit`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vsekit.cli.common import finite_non_negative, parse_size, positive_int, read_float, thread_count

RERANK_HELP = ("an index of a model with a similarity network: shortlisted items each query reranks through the "
               "network (default: the index's)")


def positive_float(text: str) -> float:
    v = read_float(text)
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return v


def port_number(text: str) -> int:
    """A TCP port, 0..65535 (0: any free port)."""
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535 (0: any free port), got {text!r}")
    return int(text)


def positive_size(text: str) -> int:
    """A size in bytes (``parse_size``: 512K, 10M, ...) of at least one byte."""
    v = parse_size(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return v


def thumbnail_size(text: str) -> int:
    """Pixels on a thumbnail's long side: 0 (no thumbnails) to the index's limit."""
    from vsekit.cli.common import whole_number
    from vsekit.index.thumbnails import MAX_SIDE_LIMIT

    return whole_number(text, 0, MAX_SIDE_LIMIT)


def aspect_ratio(text: str) -> float:
    v = positive_float(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"is long side / short side, at least 1; got {text}")
    return v


ALL_ROWS = "all"  # --split all: every row of a pairs file
DEFAULT_SPLIT = "test"


def _load_source(args: argparse.Namespace, embedder):
    """The collection named by ``--images DIR`` or ``--data SPEC`` and a short description of it.

    ``--split all`` reads every row of a pairs file; without ``--split``, the test split, or every row of a
    pairs file that has no split column (a file of one collection, the usual thing to index)."""
    from vsekit.cli.common import data_from_arg
    from vsekit.data.corpus import DataError
    from vsekit.data.formats.pairs import NoSplitColumn
    from vsekit.data.sources import data_config, load_split
    from vsekit.index.build import corpus_from_folder

    if args.images:
        return corpus_from_folder(args.images), f"images:{Path(args.images).resolve()}"
    data = data_from_arg(args.data, args.image_root, embedder.config.data)
    every_row = data_config({**data.model_dump(), "split": None}) if data.format == "pairs" else None
    split = args.split or DEFAULT_SPLIT
    if split == ALL_ROWS:
        if every_row is None:
            raise DataError(f"--split {ALL_ROWS} reads every row of a pairs file; {data.describe()} has named "
                            f"splits: give one, e.g. --split {DEFAULT_SPLIT}")
        return load_split(every_row, DEFAULT_SPLIT, args.max_images), f"data:{args.data}:{ALL_ROWS}"
    try:
        return load_split(data, split, args.max_images), f"data:{args.data}:{split}"
    except NoSplitColumn:
        if args.split is not None or every_row is None:
            raise
    return load_split(every_row, DEFAULT_SPLIT, args.max_images), f"data:{args.data}:{ALL_ROWS}"


_QDRANT_OPTIONS = {"url": "--url", "qdrant_path": "--qdrant-path", "collection": "--collection",
                   "qdrant_shards": "--qdrant-shards", "qdrant_replicas": "--qdrant-replicas"}


def _backend_config(args: argparse.Namespace):
    """The backend ``--backend`` and its options describe; an option of another backend is an error."""
    from vsekit.index import SearchIndexError
    from vsekit.index.backends import LocalConfig, QdrantConfig

    given = [flag for key, flag in _QDRANT_OPTIONS.items() if getattr(args, key) is not None]
    if args.backend != "qdrant":
        if given:
            raise SearchIndexError(f"{', '.join(given)}: options of --backend qdrant")
        return LocalConfig()
    return QdrantConfig(url=args.url, path=args.qdrant_path, collection=args.collection,
                        shards=args.qdrant_shards, replicas=args.qdrant_replicas)


def _where(m: dict) -> str:
    q = m.get("qdrant")
    if not q:
        return ""
    return f" (qdrant {q.get('url') or q.get('path')}: collections {', '.join(q['collections'].values())})"


# -- handlers -----------------------------------------------------------------------------------------------
def cmd_index_build(args: argparse.Namespace) -> int:
    from vsekit.index import AnnParams
    from vsekit.index.build import build_index
    from vsekit.inference import Embedder

    backend = _backend_config(args)  # a bad option is refused before the model is loaded
    params = AnnParams(nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                       ef_construction=args.ef_construction, ef_search=args.ef_search)
    emb = Embedder.from_checkpoint(args.checkpoint, device=args.device)
    corpus, source = _load_source(args, emb)
    m = build_index(emb, corpus, args.out, kind=args.kind, captions=args.captions, params=params,
                    batch_size=args.batch_size, progress=not args.quiet, overwrite=args.overwrite,
                    source=source, rerank=args.rerank, context_dtype=args.context_dtype, backend=backend,
                    thumbnail_size=args.thumbnail_size)
    rerank = f", rerank {m['rerank']} through the network" if m.get("rerank") else ""
    thumbs = f"; thumbnails of {m['thumbnails']['count']} images" if m.get("thumbnails") else "; no thumbnails"
    print(f"built {m['kind']} index {args.out}{_where(m)}: {m['num_images']} images, {m['num_captions']} "
          f"captions, dim {m['dim']}, {m['similarity']} similarity{rerank}{thumbs}")
    if m.get("recall_at_10"):
        print("recall@10 of the approximate index against exact search: "
              + ", ".join(f"{t} {r:.3f}" for t, r in m["recall_at_10"].items()))
    return 0


def cmd_index_add(args: argparse.Namespace) -> int:
    from vsekit.index import SearchIndexError, read_manifest
    from vsekit.index.build import add_to_index
    from vsekit.inference import Embedder
    from vsekit.utils import distributed

    recorded = distributed.run_on_main(lambda: read_manifest(args.index)["checkpoint"])  # rank 0 reads the index
    path = args.checkpoint or recorded
    if not path:
        raise SearchIndexError(f"{args.index}: the manifest names no checkpoint; pass --checkpoint")
    emb = Embedder.from_checkpoint(path, device=args.device)
    corpus, source = _load_source(args, emb)
    m, added, skipped = add_to_index(args.index, emb, corpus, batch_size=args.batch_size,
                                     progress=not args.quiet, source=source)
    print(f"added {added} images ({skipped} already in the index); {args.index} now holds "
          f"{m['num_images']} images, {m['num_captions']} captions")
    if added and m.get("recall_at_10"):
        print("recall@10 against exact search: " + ", ".join(f"{t} {r:.3f}" for t, r in m["recall_at_10"].items()))
    return 0


def cmd_index_remove(args: argparse.Namespace) -> int:
    from vsekit.index.build import remove_from_index

    m, removed = remove_from_index(args.index, ids=args.ids or (), paths=args.paths or ())
    print(f"removed {removed} images; {args.index} now holds {m['num_images']} images, "
          f"{m['num_captions']} captions")
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    from vsekit.index import read_manifest

    print(json.dumps(read_manifest(args.index), indent=2, sort_keys=True))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from vsekit.index.search import SearchIndex

    if (args.query is None) == (args.image is None):
        print("vsekit: error: give either a text query or --image PATH", file=sys.stderr)
        return 2
    index = SearchIndex.open(args.index, checkpoint=args.checkpoint, device=args.device,
                             nprobe=args.nprobe, ef_search=args.ef_search, rerank=args.rerank)
    if args.image is not None:
        hits = index.search_image(args.image, k=args.k, target=args.target or "captions")
    else:
        hits = index.search_text(args.query, k=args.k, target=args.target or "images")
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], indent=2, ensure_ascii=False))
        return 0
    for h in hits:
        if h.target == "images":
            extra = f"  ({h.text})" if h.text else ""
            print(f"{h.rank:4d}  {h.score:+.4f}  {h.path or h.id}{extra}")
        else:
            print(f'{h.rank:4d}  {h.score:+.4f}  "{h.text}"  [image {h.image_id}]')
    if not hits:
        print("no results (the index is empty)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging
    from dataclasses import fields

    import torch

    from vsekit.serve.app import allowed_hosts, create_app, is_loopback
    from vsekit.serve.limits import Limits
    from vsekit.serve.server import bound_socket, make_server

    # bound (and listening) first: a port in use is one error line before the model is loaded, and
    # "serving on" is printed only once the address is ours, with the real port when --port 0 picked one
    sock = bound_socket(args.host, args.port)
    try:
        address, port = sock.getsockname()[:2]
        local = is_loopback(address)
        hosts = allowed_hosts(address, [*args.allow_host, args.host] if local else args.allow_host)
        torch.set_num_threads(args.torch_threads)
        limits = {f.name: getattr(args, f.name) for f in fields(Limits)}
        app = create_app(args.index, checkpoint=args.checkpoint, device=args.device, rerank=args.rerank,
                         allowed_hosts=hosts, reload_interval=args.reload_interval, **limits)
        server = make_server(app, address, port, read_timeout=args.read_timeout, body_timeout=args.body_timeout,
                             keep_alive_timeout=args.keep_alive_timeout)
        name = args.host.strip("[]")
        shown = f"[{name}]" if ":" in name else name
        print(f"serving {args.index} on http://{shown}:{port}/  (API docs at /docs)", flush=True)
        if hosts is None:
            logging.getLogger(__name__).info(
                "bound to %s, not a loopback address: requests for any Host name are answered "
                "(--allow-host NAME answers only NAME and this machine's loopback names)", args.host)
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


# -- parser -------------------------------------------------------------------------------------------------
def _add_source(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--images", help="a folder of image files (searched recursively; ids = relative paths)")
    g.add_argument("--data", help="a data set: demo | dataset_*.json | precomp folder | pairs .csv/.jsonl")
    p.add_argument("--image-root", help="folder the data set's image paths are relative to")
    p.add_argument("--split", help=f"split of --data to index, or {ALL_ROWS!r}: every row of a pairs file (default: "
                                   f"{DEFAULT_SPLIT}, or every row of a pairs file without a split column)")
    p.add_argument("--max-images", type=positive_int, help="first N images of the split only")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_ann(p: argparse.ArgumentParser, build: bool) -> None:
    from vsekit.index import AnnParams

    d = AnnParams()
    if build:
        p.add_argument("--nlist", type=positive_int, help="IVF lists (default: about sqrt(N))")
        p.add_argument("--hnsw-m", type=positive_int, default=d.hnsw_m, help="HNSW links per node")
        p.add_argument("--ef-construction", type=positive_int, default=d.ef_construction)
    p.add_argument("--nprobe", type=positive_int, default=d.nprobe if build else None,
                   help=f"IVF lists scanned per query (default {d.nprobe})")
    p.add_argument("--ef-search", type=positive_int, default=d.ef_search if build else None,
                   help=f"HNSW search breadth (default {d.ef_search})")


def _add_limits(p: argparse.ArgumentParser) -> None:
    """An option for each of the server's limits: the fields of :class:`vsekit.serve.limits.Limits`."""
    from dataclasses import fields

    from vsekit.serve.limits import Limits  # the defaults, without the web stack

    kinds = {"bytes": positive_size, "count": positive_int, "ratio": aspect_ratio, "seconds": positive_float}
    for f in fields(Limits):
        kind, d = f.metadata["kind"], f.default
        shown = f"{d >> 20}M" if kind == "bytes" else f"{d:g}" if isinstance(d, float) else d
        p.add_argument("--" + f.name.replace("_", "-"), type=kinds[kind], default=f.default,
                       metavar="SECONDS" if kind == "seconds" else None,
                       help=f"{f.metadata['help']} (default {shown})")


def add_cli(subparsers) -> None:
    """Register ``index`` (build/add/remove/info), ``search`` and ``serve`` on the main subparsers."""
    ix = subparsers.add_parser("index", help="build and update a search index over a collection")
    isub = ix.add_subparsers(dest="index_verb", required=True)

    b = isub.add_parser("build", help="encode a collection and write a search index")
    b.add_argument("checkpoint", help="a .pt checkpoint or a run folder (best.pt is used)")
    _add_source(b)
    b.add_argument("--out", required=True, help="index folder to write")
    b.add_argument("--kind", choices=["exact", "ivf", "hnsw"], default="exact",
                   help="exact inner product (default), or approximate IVF / HNSW for large collections "
                        "(qdrant: exact or hnsw)")
    b.add_argument("--backend", choices=["local", "qdrant"], default="local",
                   help="where the vectors go: the index folder (default; NumPy exact search, FAISS for ivf / "
                        "hnsw), or Qdrant collections (a server with --url, local mode with --qdrant-path)")
    b.add_argument("--url", help="Qdrant server URL, e.g. http://localhost:6333 (its API key, if any, from "
                                 "the environment variable QDRANT_API_KEY)")
    b.add_argument("--qdrant-path", metavar="DIR",
                   help="a folder for the Qdrant client's local mode (no server; one process at a time, small "
                        "collections: it scans every point and writes each in its own transaction)")
    b.add_argument("--collection", metavar="NAME",
                   help="Qdrant collections NAME-images and NAME-captions (default: the --out folder's name)")
    b.add_argument("--qdrant-shards", type=positive_int, metavar="N", help="shards per collection on a cluster")
    b.add_argument("--qdrant-replicas", type=positive_int, metavar="N",
                   help="replication factor of the collections on a cluster")
    b.add_argument("--captions", action=argparse.BooleanOptionalAction, default=None,
                   help="also index the data set's captions for image -> text search (default: when it has any)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    b.add_argument("--rerank", type=positive_int, default=100,
                   help="models with a similarity network (SGR, SAF): shortlisted items each query reranks through "
                        "the network, recorded as the searches' default (default 100)")
    b.add_argument("--thumbnail-size", type=thumbnail_size, default=256, metavar="PIXELS",
                   help="long side of the JPEG thumbnails the index keeps of its images, the only image bytes "
                        "`vsekit serve` sends (default 256; 0: none)")
    b.add_argument("--context-dtype", choices=["float32", "float16"], default="float32",
                   help="models with a similarity network: storage of the local sets (float16 halves their size)")
    _add_ann(b, build=True)
    b.set_defaults(fn=cmd_index_build)

    a = isub.add_parser("add", help="add images to an index; only new files are encoded")
    a.add_argument("index", help="index folder")
    _add_source(a)
    a.add_argument("--checkpoint", help="the model (default: the checkpoint recorded in the index)")
    a.set_defaults(fn=cmd_index_add)

    r = isub.add_parser("remove", help="remove images (and their captions) from an index")
    r.add_argument("index", help="index folder")
    r.add_argument("--ids", nargs="+", help="image ids as stored in the index")
    r.add_argument("--paths", nargs="+", help="image file paths")
    r.set_defaults(fn=cmd_index_remove)

    i = isub.add_parser("info", help="print an index's manifest")
    i.add_argument("index", help="index folder")
    i.set_defaults(fn=cmd_index_info)

    s = subparsers.add_parser("search", help="search an index by text or by image")
    s.add_argument("index", help="index folder")
    s.add_argument("query", nargs="?", help="text query (text -> image search)")
    s.add_argument("--image", help="an image file: image -> text (default) or image -> image search")
    s.add_argument("--target", choices=["images", "captions"],
                   help="what to return (default: images for text, captions for --image)")
    s.add_argument("-k", type=positive_int, default=10, help="number of results (default 10)")
    s.add_argument("--checkpoint", help="the model (default: the checkpoint recorded in the index)")
    s.add_argument("--device", default="auto")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.add_argument("--rerank", type=positive_int, help=RERANK_HELP)
    _add_ann(s, build=False)
    s.set_defaults(fn=cmd_search)

    from vsekit.serve.limits import DEFAULT_RELOAD_INTERVAL

    v = subparsers.add_parser("serve", help="serve an index over HTTP: JSON API and a search page")
    v.add_argument("index", help="index folder")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=port_number, default=8000, help="TCP port, 0..65535 (0: any free port, printed)")
    v.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header names NAME (repeatable). Bound to a loopback "
                        "address (the default), only localhost, 127.0.0.1, [::1] and --host are answered, so "
                        "that a web page whose name resolves to 127.0.0.1 (DNS rebinding) cannot use the API; "
                        "bound elsewhere, any Host is answered unless --allow-host names some")
    v.add_argument("--reload-interval", type=finite_non_negative, default=DEFAULT_RELOAD_INTERVAL,
                   metavar="SECONDS", help="how often the index is checked for a generation that `index add` / "
                                           "`index remove` committed, which is then served without a restart "
                                           f"(default {DEFAULT_RELOAD_INTERVAL:g}; 0: before every request)")
    v.add_argument("--checkpoint", help="the model (default: the checkpoint recorded in the index)")
    v.add_argument("--device", default="auto")
    v.add_argument("--rerank", type=positive_int, help=RERANK_HELP)
    _add_limits(v)
    v.add_argument("--torch-threads", type=thread_count, default=1,
                   help="intra-op threads of the model (default 1: a query is small work, and more threads "
                        "only contend with concurrent requests)")
    v.set_defaults(fn=cmd_serve)
