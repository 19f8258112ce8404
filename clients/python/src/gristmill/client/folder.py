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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import BinaryIO

from gristmill.client.errors import InvalidArgument
from gristmill.client.names import validate_path

__all__ = ["FolderScan", "LocalSource", "is_skipped_name", "open_regular", "scan_folder",
           "walk_folder"]

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

    ``files`` are sorted by dataset path (NFC, validated); of two local names
    that are one path after Unicode normalisation, one is a failure (see
    :func:`walk_folder`).
    """
    scan = FolderScan()
    scan.files.extend(walk_folder(root, include, exclude, scan))
    scan.files.sort(key=lambda f: f.path)
    return scan


def walk_folder(root: Path | str, include: Sequence[str], exclude: Sequence[str],
                scan: FolderScan) -> Iterator[LocalSource]:
    """Yield the files an import takes, one directory in memory at a time.

    Files come sorted by their relative path (a directory's entries are
    visited in the order their paths sort). Links not followed, paths
    ignored and failures are added to ``scan`` as they are met; its
    ``files`` stays empty. Memory is one directory's entries per level,
    plus the paths spelled other than NFC.

    Of two names that are one dataset path after Unicode normalisation
    (NFC), the one spelled in NFC is taken if it exists on disk; otherwise
    the first met. The other is a failure.
    """
    includes = _check_patterns(include, "include")  # checked now, not at the first file
    excludes = _check_patterns(exclude, "exclude")
    return _walk(Path(root).resolve(strict=True), includes, excludes, scan)


def _walk(base: Path, includes: Sequence[str], excludes: Sequence[str], scan: FolderScan
          ) -> Iterator[LocalSource]:
    odd: dict[str, str] = {}  # NFC path -> the other spelling taken for it
    names, others = _children(scan, base, "")
    stack = [("", iter(names), others)]
    while stack:
        rel, children, others = stack[-1]
        item = next(children, None)
        if item is None:
            stack.pop()
            continue
        is_dir = item.endswith("/")
        name = item[:-1] if is_dir else item
        child = f"{rel}/{name}" if rel else name
        taken = _visit(scan, base, child, name, is_dir, includes, excludes,
                       regular=not is_dir and name not in others)
        if taken is True:
            names, inner = _children(scan, base, child)
            stack.append((child, iter(names), inner))
        elif isinstance(taken, tuple):
            found = _take(scan, odd, base, child, *taken)
            if found is not None:
                yield found


def _children(scan: FolderScan, base: Path, rel: str) -> tuple[list[str], set[str]]:
    """A directory's entry names, directories with a "/" after, in the order their paths sort.

    A directory sorts as its paths do: ``a/...`` after ``a.txt`` and before
    ``a0``. Only names are kept (a few dozen bytes each), and apart the names
    that are neither directories nor known regular files (links, pipes, or a
    type the directory listing did not say), which :func:`_visit` looks at.
    """
    out: list[str] = []
    others: set[str] = set()
    try:
        with os.scandir(base / rel if rel else base) as it:
            for entry in it:
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                    # the listing's file type: no stat unless the filesystem gives none
                    if not is_dir and not entry.is_file(follow_symlinks=False):
                        others.add(entry.name)
                except OSError:
                    is_dir = False  # _visit reports it
                    others.add(entry.name)
                out.append(f"{entry.name}/" if is_dir else entry.name)
    except OSError as e:
        scan.failed.append((f"{rel}/" if rel else ".", f"unreadable directory: {e.strerror or e}"))
        return [], set()
    out.sort()
    return out, others


def _visit(scan: FolderScan, base: Path, rel: str, name: str, is_dir: bool,
           includes: Sequence[str], excludes: Sequence[str], regular: bool = False
           ) -> tuple[Path, bool] | bool:
    """(source, via link) of a file to take, True for a directory to walk, else False.

    ``regular``: the directory listing said it is a regular file (no lstat
    then; a link put in its place later is refused when it is opened).
    """
    if is_skipped_name(name):
        scan.ignored.append(f"{rel}/" if is_dir else rel)
        return False
    if is_dir:
        if _matches(rel, excludes):
            scan.ignored.append(f"{rel}/")
            return False
        return True
    if (includes and not _matches(rel, includes)) or _matches(rel, excludes):
        scan.ignored.append(rel)
        return False
    source = base / rel
    if regular:
        return source, False
    try:
        mode = source.lstat().st_mode
    except OSError as e:
        scan.failed.append((rel, f"unreadable: {e.strerror or e}"))
        return False
    if stat.S_ISLNK(mode):
        target, why = _link_target(base, source)
        if target is None:
            scan.links.append((rel, why))
            return False
        return target, True
    if not stat.S_ISREG(mode):
        scan.failed.append((rel, "not a regular file (a pipe, socket or device); "
                            "not imported"))
        return False
    return source, False


def _take(scan: FolderScan, odd: dict[str, str], base: Path, rel: str, source: Path,
          via_link: bool) -> LocalSource | None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        scan.failed.append((rel, "the file name is not valid UTF-8; rename it"))
        return None
    try:
        path = validate_path(rel)
    except InvalidArgument as e:
        scan.failed.append((rel, e.message))
        return None
    if path != rel:  # spelled other than NFC: the NFC spelling, or the first met, wins
        other = odd.get(path) or (path if os.path.lexists(base / path) else None)
        if other is not None:
            scan.failed.append((rel, f"same dataset path as {other!r} after Unicode "
                                "normalisation (NFC); rename one of them"))
            return None
        odd[path] = rel
    elif path in odd:
        scan.failed.append((rel, f"same dataset path as {odd[path]!r} after Unicode "
                            "normalisation (NFC); rename one of them"))
        return None
    return LocalSource(path, source, via_link)


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
