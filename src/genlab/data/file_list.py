"""The image files of a folder, listed once and cached, and the files found unreadable.

Opening and verifying every file at start-up costs minutes on a million-image folder, at
every start and every resume. Instead the first start walks the folder (names only) and
keeps the list in `<cache>/file_lists/<hash of the folder>.json` with the modification time
of every sub-folder; a later start only compares those times (adding, removing or renaming
a file changes its folder's time) and walks again when one differs. Files that fail to
decode during training are appended to `<same name>.bad.jsonl` with their size and time,
and left out of later starts until they change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from genlab.data.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)
VERSION = 2  # 2: regular files only (lists of 1 may hold a FIFO)


def cache_root() -> Path:
    """genlab's cache: $GENLAB_CACHE or ~/.cache/genlab."""
    return Path(os.environ.get("GENLAB_CACHE", "~/.cache/genlab")).expanduser()


def _cache_file(root: Path, cache_dir: str | Path | None) -> Path:
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:16]
    return Path(cache_dir or cache_root() / "file_lists").expanduser() / f"{digest}.json"


def _walk(root: Path) -> tuple[list[str], dict[str, int]]:
    """(image files relative to root, sorted; every folder's mtime_ns), by names only.

    Only regular files (or links to them) count: a FIFO named `x.png` would block the first
    read forever. `scandir` knows an entry's type without a stat of its own on most file
    systems, so this costs no more than names; linked folders are not followed.
    """
    files, dirs, todo = [], {}, ["."]
    while todo:
        rel = todo.pop()
        folder = root if rel == "." else root / rel
        dirs[rel] = os.stat(folder).st_mtime_ns
        prefix = "" if rel == "." else rel + "/"
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    todo.append(prefix + entry.name)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file():
                    files.append(prefix + entry.name)
    return sorted(files), dirs


def _unchanged(root: Path, dirs: dict[str, int]) -> bool:
    try:
        return all(os.stat(root / rel).st_mtime_ns == mtime for rel, mtime in dirs.items())
    except OSError:  # a folder went away
        return False


def list_images(root: str | Path, cache_dir: str | Path | None = None) -> tuple[list[str], dict[str, str]]:
    """Every image file under `root` (recursively, sorted) and the ones known to be unreadable.

    Args:
        root: the folder.
        cache_dir: where the list is kept (None: <genlab cache>/file_lists).

    Returns:
        (files, bad), absolute paths as strings (100,000 Path objects cost seconds):
        `files` without the known-bad ones; `bad` maps each known-bad file that has not
        changed since it failed to the reason it failed.
    """
    root = Path(root).expanduser().resolve()
    cache = _cache_file(root, cache_dir)
    listing = None
    if cache.exists():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("version") == VERSION and saved.get("root") == str(root) and _unchanged(root, saved["dirs"]):
                listing = saved if _inside(saved["files"]) else None
        except (OSError, ValueError, KeyError):
            listing = None  # a damaged cache is rebuilt
    if listing is None:
        files, dirs = _walk(root)
        listing = {"version": VERSION, "root": str(root), "dirs": dirs, "files": files}
        _write_atomic(cache, json.dumps(listing))
    bad = _known_bad(root, cache.with_suffix(".bad.jsonl"))
    prefix = str(root) + os.sep
    files = [prefix + f for f in listing["files"]]
    return ([f for f in files if f not in bad] if bad else files), bad


def _inside(files: list) -> bool:
    """Whether every cached name lies under the folder: a cache file is data anyone could have
    written (a shared run's `data.cache_dir`), so a name that leaves the folder rebuilds the list."""
    return all(isinstance(f, str) and f and not f.startswith(("/", "~")) and ".." not in f.split("/") for f in files)


def _known_bad(root: Path, log_file: Path) -> dict[str, str]:
    """Files recorded as unreadable that are still the same file (same size and time)."""
    bad = {}
    if not log_file.exists():
        return bad
    for line in log_file.read_text().splitlines():
        try:
            row = json.loads(line)
            stat = os.stat(root / row["file"])
        except (ValueError, KeyError, OSError):
            continue  # a torn line, or a file since removed
        if (stat.st_size, stat.st_mtime_ns) == (row["size"], row["mtime_ns"]):
            bad[str(root / row["file"])] = row["reason"]
    return bad


def record_bad(root: str | Path, path: str | Path, reason: str, cache_dir: str | Path | None = None) -> None:
    """Remember that `path` (under `root`) failed to decode, so later starts leave it out."""
    root = Path(root).expanduser().resolve()
    try:
        stat = os.stat(path)
        row = {"file": str(Path(path).relative_to(root)), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
               "reason": reason}
        log_file = _cache_file(root, cache_dir).with_suffix(".bad.jsonl")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        # One short line per append: appends from several DataLoader workers do not interleave.
        with open(log_file, "a") as f:
            f.write(json.dumps(row) + "\n")
    except (OSError, ValueError) as error:
        log.debug("could not record the bad file %s: %s", path, error)


def _write_atomic(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as error:  # a read-only cache only costs the next start a walk
        log.warning("could not cache the file list in %s (%s); the next start lists the folder again", path, error)


def folder_metadata(root: str | Path) -> dict[str, dict]:
    """Rows of the folder's metadata.jsonl files (the HF imagefolder layout: {"file_name",
    "text", ...}), keyed by the resolved path of the file each row describes."""
    rows = {}
    for meta in Path(root).expanduser().rglob("metadata.jsonl"):
        for line in meta.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[str((meta.parent / row["file_name"]).resolve())] = row
    return rows
