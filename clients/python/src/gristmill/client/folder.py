"""Which files of a local folder an import takes: the walk, what it skips, and patterns.

Rules (``docs/store.md`` describes them for users):

- Symbolic links are never followed out of the folder: a link whose target
  resolves outside it, a broken link and a link to a directory are listed in
  :attr:`FolderScan.links` and not imported. A link to a regular file inside
  the folder is imported at the link's own path (the store keeps the bytes
  once). Directory links are never walked, so the walk cannot loop or see a
  file twice through them.
- Skipped without a word beyond :attr:`FolderScan.ignored`: dotfiles and
  dot-directories (``.git/``, ``.DS_Store``, ``._*``), other VCS directories
  (``CVS/``, ``_darcs/``) and OS junk (``Thumbs.db``, ``desktop.ini``,
  ``__MACOSX/``, ``$RECYCLE.BIN/``, ``System Volume Information/``).
- ``include``/``exclude`` patterns use :func:`fnmatch.fnmatchcase`
  (case-sensitive; ``*`` also matches ``/``). A pattern without ``/`` is
  matched against the file's name, at any depth; a pattern with ``/`` against
  its whole relative POSIX path. A file is taken if it matches some include
  pattern (or none are given) and no exclude pattern; an exclude pattern that
  matches a directory skips everything under it.
- Pipes, sockets and devices are failures (opening a pipe would block).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import BinaryIO

from gristmill.client.errors import InvalidArgument
from gristmill.client.names import validate_path

__all__ = ["FolderScan", "LocalSource", "is_skipped_name", "open_regular", "scan_folder"]

#: Version-control directories whose names do not start with a dot.
VCS_DIRS = frozenset({"CVS", "_darcs", "RCS", "SCCS"})
#: Operating-system junk, compared case-insensitively (dot-names are skipped anyway).
OS_JUNK = frozenset(n.lower() for n in (
    "Thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "__MACOSX", "$RECYCLE.BIN",
    "System Volume Information", "Icon\r"))


@dataclass(frozen=True)
class LocalSource:
    """One file to import: its dataset path and where its bytes are read."""

    path: str
    source: Path
    via_link: bool = False


@dataclass
class FolderScan:
    """What :func:`scan_folder` found."""

    files: list[LocalSource] = field(default_factory=list)
    #: symbolic links not followed: (relative path, why)
    links: list[tuple[str, str]] = field(default_factory=list)
    #: relative paths skipped by the rules or patterns (directories end with "/")
    ignored: list[str] = field(default_factory=list)
    #: (relative path, why) for what cannot be imported
    failed: list[tuple[str, str]] = field(default_factory=list)


def is_skipped_name(name: str) -> bool:
    """A dotfile or dot-directory, a VCS directory or OS junk."""
    return name.startswith(".") or name in VCS_DIRS or name.lower() in OS_JUNK


def _check_patterns(patterns: Sequence[str], what: str) -> list[str]:
    out = []
    for p in patterns:
        p = p.removeprefix("./")
        if not p or p == "/":
            raise InvalidArgument(what, "an empty pattern matches nothing; give one like "
                                  "'*.jpg' or 'train/*'")
        out.append(p)
    return out


def _matches(rel: str, patterns: Sequence[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatchcase(rel if "/" in p.rstrip("/") else name, p.rstrip("/"))
               for p in patterns)


def scan_folder(root: Path | str, include: Sequence[str] = (),
                exclude: Sequence[str] = ()) -> FolderScan:
    """The files under ``root`` that an import takes, by the rules in this module's doc.

    ``files`` are sorted by dataset path (NFC, validated); two local names
    that are one path after Unicode normalisation are a failure for the second.
    """
    includes = _check_patterns(include, "include")
    excludes = _check_patterns(exclude, "exclude")
    base = Path(root).resolve(strict=True)
    scan = FolderScan()
    taken: dict[str, str] = {}
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        directory = base / rel_dir if rel_dir else base
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            scan.failed.append((f"{rel_dir}/" if rel_dir else ".",
                                f"unreadable directory: {e.strerror or e}"))
            continue
        subdirs: list[str] = []
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                is_link = entry.is_symlink()
                is_dir = not is_link and entry.is_dir(follow_symlinks=False)
                is_file = not is_link and entry.is_file(follow_symlinks=False)
            except OSError as e:
                scan.failed.append((rel, f"unreadable: {e.strerror or e}"))
                continue
            if is_skipped_name(entry.name):
                scan.ignored.append(f"{rel}/" if is_dir else rel)
                continue
            if is_dir:
                if _matches(rel, excludes):
                    scan.ignored.append(f"{rel}/")
                else:
                    subdirs.append(rel)
                continue
            if (includes and not _matches(rel, includes)) or _matches(rel, excludes):
                scan.ignored.append(rel)
                continue
            source = Path(entry.path)
            if is_link:
                target, why = _link_target(base, source)
                if target is None:
                    scan.links.append((rel, why))
                    continue
                source = target
            elif not is_file:
                scan.failed.append((rel, "not a regular file (a pipe, socket or device); "
                                    "not imported"))
                continue
            _take(scan, taken, rel, source, is_link)
        stack.extend(reversed(subdirs))
    scan.files.sort(key=lambda f: f.path)
    return scan


def _take(scan: FolderScan, taken: dict[str, str], rel: str, source: Path,
          via_link: bool) -> None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        scan.failed.append((rel, "the file name is not valid UTF-8; rename it"))
        return
    try:
        path = validate_path(rel)
    except InvalidArgument as e:
        scan.failed.append((rel, e.message))
        return
    if path in taken:
        scan.failed.append((rel, f"same dataset path as {taken[path]!r} after Unicode "
                            "normalisation (NFC); rename one of them"))
        return
    taken[path] = rel
    scan.files.append(LocalSource(path, source, via_link))


def _link_target(base: Path, link: Path) -> tuple[Path | None, str]:
    """(resolved target, "") for a link to a regular file inside ``base``, else (None, why)."""
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):
        return None, "broken link, or a loop of links"
    if not target.is_relative_to(base):
        return None, f"points outside the folder, to {target}; not followed"
    inner = target.relative_to(base).parts
    if any(is_skipped_name(part) for part in inner):
        return None, f"points into a skipped file or directory ({'/'.join(inner)}); not followed"
    try:
        mode = target.stat().st_mode
    except OSError as e:
        return None, f"its target is unreadable: {e.strerror or e}"
    if stat.S_ISDIR(mode):
        return None, ("a link to a directory inside the folder; not walked (its files are "
                      "imported at their own paths)")
    if not stat.S_ISREG(mode):
        return None, "points to a pipe, socket or device; not followed"
    return target, ""


_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0))


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading, refusing a link or pipe put in its place since the scan.

    Raises:
        OSError: with a message that says what the path has become.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(e.errno, "it became a symbolic link after the scan; not "
                          "followed") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "it is no longer a regular file (a pipe, socket or "
                          "device?)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
