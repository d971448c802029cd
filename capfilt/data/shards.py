"""Shard specifications → lists of shard URLs.

A spec is a brace pattern (``data/web/{00000000..00000041}.tar``), a folder (its ``*.tar``
files, and ``*.tar.gz``/``*.tgz``, sorted), a single ``.tar`` path, a glob (``**`` spanning
folders), or a remote/pipe URL that webdataset opens; or a list file (``urls.txt``, or any name
as ``@list``) of such specs, one a line (blank lines and ``#`` comments skipped, relative paths
read from the current folder, as ``tar -T`` reads them).
"""

from __future__ import annotations

import glob
import json
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from braceexpand import braceexpand

HTTP_PREFIXES = ("http://", "https://")
"""Remote shards read over http(s): through curl with a stall limit (``data/remote.py``), and
with a ``sizes.json`` in the same remote folder."""

REMOTE_PREFIXES = ("pipe:", *HTTP_PREFIXES, "s3://", "gs://", "hf://")

SIZES_TIMEOUT_S = 10.0
"""How long the ``sizes.json`` beside http(s) shards may take (a slow or silent server leaves the
sizes unknown rather than holding a stage up)."""


SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
"""The files a folder spec reads (a compressed tar is read as it is, more slowly)."""


class ShardSpecError(ValueError):
    """A shard spec names nothing readable."""


LIST_SUFFIX = ".txt"
"""A local file spec with this suffix lists specs (a shard is never a text file)."""


def _listed_specs(spec: str) -> list[str] | None:
    """The specs a list file spec (``@file``, or an existing ``*.txt`` file) names; None if
    ``spec`` is not one."""
    if spec.startswith("@"):
        path = Path(spec[1:])
        if not path.is_file():
            raise ShardSpecError(f"shard list not found: {path}")
    elif spec.endswith(LIST_SUFFIX) and not spec.startswith(REMOTE_PREFIXES):
        path = Path(spec)
        if not path.is_file():
            return None  # said as a missing shard, as any other missing path
    else:
        return None
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    specs = [line for line in lines if line and not line.startswith("#")]
    if not specs:
        raise ShardSpecError(f"shard list {path} names no shards")
    return specs


def expand_shard_spec(spec: str) -> list[str]:
    """Expand one spec into shard URLs (sorted for folders and globs; pattern order for braces;
    a list file's specs in its order)."""
    spec = str(spec)
    listed = _listed_specs(spec)
    if listed is None:
        return _expand_one(spec)
    out = []
    for item in listed:
        if _listed_specs(item) is not None:
            raise ShardSpecError(f"{spec}: a shard list cannot name another list ({item})")
        out += _expand_one(item)
    return out


def _expand_one(spec: str) -> list[str]:
    """One spec other than a list file into shard URLs."""
    if spec.startswith("s3://"):  # webdataset opens pipes, http(s), gs and hf, not s3
        raise ShardSpecError(
            f"{spec}: s3:// shards are read through a command, e.g. --shards "
            f"'pipe:aws s3 cp {spec} -' (or 'pipe:s5cmd cat {spec}')"
        )
    if spec.startswith(REMOTE_PREFIXES):
        return list(braceexpand(spec))
    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for p in path.iterdir() if p.name.endswith(SHARD_SUFFIXES))
        if not shards:
            raise ShardSpecError(f"folder {spec} has no .tar shards")
        return shards
    out: list[str] = []
    for item in braceexpand(spec):
        if any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))  # `**` spans folders
            if not matches:
                raise ShardSpecError(f"no shard matches {item}")
            out.extend(matches)
        elif Path(item).is_file():
            out.append(item)
        else:
            raise ShardSpecError(f"shard not found: {item}")
    return out


def expand_shards(specs: str | Iterable[str]) -> list[str]:
    """Expand one or several specs, keeping their order and dropping repeats."""
    if isinstance(specs, str | Path):
        specs = [str(specs)]
    seen: dict[str, None] = {}
    for spec in specs:
        for url in expand_shard_spec(spec):
            seen.setdefault(url, None)
    if not seen:
        raise ShardSpecError("no shards given")
    return list(seen)


def shard_sizes(urls: list[str]) -> list[int | None]:
    """Sample counts from the ``sizes.json`` beside each shard (None where unknown): a local
    folder's file, or the one in the same remote folder of an http(s) shard, so a source counts
    the same whether it is read from disk or from a server. A ``pipe:`` command (or gs://,
    hf://) has no folder to look in: its sizes stay unknown."""
    cache: dict[str, dict] = {}
    sizes: list[int | None] = []
    for url in urls:
        folder, name = _sizes_place(url)
        if folder is None:
            sizes.append(None)
            continue
        if folder not in cache:
            cache[folder] = _read_sizes(folder)
        size = cache[folder].get(name)
        sizes.append(size if isinstance(size, int) else None)
    return sizes


def _sizes_place(url: str) -> tuple[str | None, str]:
    """(the folder whose ``sizes.json`` lists ``url``, the name it is listed under); no folder for
    a remote kind other than http(s)."""
    if url.startswith(HTTP_PREFIXES):
        parts = urllib.parse.urlsplit(url)
        folder, _, name = parts.path.rpartition("/")
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, folder + "/", "", "")), name
    if url.startswith(REMOTE_PREFIXES):
        return None, ""
    return str(Path(url).parent), Path(url).name


def _read_sizes(folder: str) -> dict:
    """A folder's ``sizes.json`` (``{}`` when it has none, or it is unreadable)."""
    try:
        if folder.startswith(HTTP_PREFIXES):
            with urllib.request.urlopen(folder + "sizes.json", timeout=SIZES_TIMEOUT_S) as resp:
                found = json.loads(resp.read())
        else:
            found = json.loads((Path(folder) / "sizes.json").read_text())
    except (OSError, ValueError):  # URLError, HTTPError and timeouts are OSErrors
        return {}
    return found if isinstance(found, dict) else {}


def count_samples(urls: list[str]) -> int | None:
    """Total samples over ``urls`` from ``sizes.json``; None if any shard is unlisted."""
    sizes = shard_sizes(urls)
    if any(s is None for s in sizes):
        return None
    return int(sum(sizes))  # type: ignore[arg-type]
