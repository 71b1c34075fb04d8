"""``pretrain-update inspect``: per-shard counts, class histogram and integrity of WebDataset shards."""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import time
from typing import Any

from torch_pretrain_update.cli._common import EXIT_DAMAGED, PROG, CliError, positive_int, stderr_is_terminal

__all__: list[str] = []  # a command, not library API

HELP = f"""\
Read every member of every shard (nothing is decoded except the label) and report per-shard sample counts,
the class histogram, members that would be unpickled by a default decoder, and damage: truncated or corrupt
tar data, and counts, histograms, sizes or SHA-256 that differ from the manifest. The manifest written by
write_shards next to the shards (train-000000.tar -> train-manifest.json) is used when present.
Exit status: 0 all shards healthy, 1 damage found, 2 bad arguments.

examples:
  {PROG} inspect 'shards/train-{{000000..000009}}.tar'
  {PROG} inspect shards/*.tar --manifest shards/train-manifest.json --json
  {PROG} inspect 'shards/*.tar'                 # a quoted glob is expanded (sorted), like a brace pattern
"""


def add_parser(sub: Any, formatter_class: type[argparse.HelpFormatter]) -> None:
    """Add the ``inspect`` command to the subparsers ``sub``."""
    p = sub.add_parser("inspect", help="per-shard counts, class histogram, integrity against the manifest",
                       description=HELP, formatter_class=formatter_class)
    p.add_argument("shards", nargs="+", metavar="SHARDS", help="shard paths, brace patterns or globs")
    p.add_argument("--manifest", metavar="PATH", help="manifest to check against (default: found next to them)")
    p.add_argument("--no-manifest", action="store_true", help="do not look for a manifest")
    p.add_argument("--label-key", metavar="K", help="label member (default: the manifest's, else cls)")
    p.add_argument("--num-classes", type=positive_int, metavar="C", help="labels must be below C")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    p.set_defaults(func=run)


_GLOB_CHARS = re.compile(r"[*?\[]")


def _expand_globs(urls: list[str]) -> list[str]:
    """Expand shell globs (``'shards/*.tar'`` quoted, so the shell did not) in local paths, sorted; a pattern
    that matches no file is an error. An existing file whose name holds ``*?[`` is taken as it is."""
    out: list[str] = []
    for url in urls:
        if "://" in url or url.startswith("pipe:") or not _GLOB_CHARS.search(url) or os.path.exists(url):
            out.append(url)
            continue
        matches = sorted(m for m in glob.glob(url) if not os.path.isdir(m))
        if not matches:
            raise CliError(f"no shard file matches {url!r} (globs and brace patterns such as "
                           "'train-{000000..000009}.tar' are expanded)")
        out.extend(matches)
    return out


def run(args: argparse.Namespace) -> int:
    """Read every shard, print the report; exit status 1 when it finds damage."""
    from torch_pretrain_update.data.inspect import inspect_shards
    from torch_pretrain_update.data.manifest import directory_message, expand_urls
    from torch_pretrain_update.data.manifest_find import find_manifest

    urls: list[str] = []
    for pattern in args.shards:
        urls.extend(_expand_globs(expand_urls(pattern)))
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    if local and not any(os.path.exists(u) for u in local):
        raise CliError(f"no such shard file: {local[0]!r}" + (f" (nor any of the {len(local)} given)"
                                                               if len(local) > 1 else ""))
    manifest = args.manifest
    if manifest is not None and os.path.isdir(manifest):  # refused, not guessed: name the file to pass
        raise CliError(f"--manifest {directory_message(manifest, '--manifest')}")
    if manifest is not None and not os.path.isfile(manifest):
        raise CliError(f"manifest {manifest!r} does not exist")
    if manifest is None and not args.no_manifest:
        manifest = find_manifest(urls)
    t0 = time.perf_counter()
    report = inspect_shards(urls, manifest, label_key=args.label_key, num_classes=args.num_classes,
                            progress=not args.no_progress and stderr_is_terminal())
    if not args.no_progress and not stderr_is_terminal():  # the plain line of the progress rule (see Stage)
        print(f"inspect: read {len(urls):,} shards ({report.num_samples:,} samples) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        if manifest is None:
            print("manifest: none (counts not checked against one; pass --manifest)")
        else:
            print(f"manifest: {manifest}")
        print(report.format())
    return 0 if report.ok else EXIT_DAMAGED
