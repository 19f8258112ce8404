"""A dataset version's manifest as the Hub returns it: the message, iterable and sized."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from operator import attrgetter
from typing import Any, overload

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from gristmill.v1 import store_pb2

__all__ = ["Manifest"]


class Manifest:
    """A ``gristmill.v1.Manifest`` that is also a sequence of its entries.

    ``len(m)``, ``for e in m`` and ``m[i]`` go over ``m.files``; every field
    and method of the message (``files``, ``dataset``, ``version``,
    ``SerializeToString``, ...) works as on the message itself, which is
    ``m.message`` (pass that where a real protobuf message is required, e.g.
    to ``CopyFrom``). :meth:`find` looks an entry up by path.
    """

    __slots__ = ("_by_path", "_sorted", "digest", "message")

    def __init__(self, message: store_pb2.Manifest, digest: str = "") -> None:
        self.message = message
        #: sha256 of the compressed manifest as the server sent it ("" if not known)
        self.digest = digest
        self._sorted: bool | None = None  # paths strictly ascending (checked on first find)
        self._by_path: dict[str, int] | None = None  # index by path, if they are not

    def find(self, path: str) -> store_pb2.FileEntry | None:
        """The entry of ``path`` (None if there is none), in O(log N).

        The first call checks once that the entries are sorted by path, as
        the server sends them, and then binary-searches; entries in any other
        order get a dict from path to entry instead, built once. Do not
        change ``files`` after the first call.
        """
        files = self.message.files
        if self._sorted is None:
            paths = [e.path for e in files]
            self._sorted = all(a < b for a, b in zip(paths, paths[1:], strict=False))
            if not self._sorted:
                self._by_path = {p: i for i, p in enumerate(paths)}
        if self._by_path is not None:
            i = self._by_path.get(path, -1)
            return files[i] if i >= 0 else None
        i = bisect_left(files, path, key=attrgetter("path"))
        return files[i] if i < len(files) and files[i].path == path else None

    @property
    def files(self) -> RepeatedCompositeFieldContainer[store_pb2.FileEntry]:
        """The entries, sorted by path (the message's repeated field)."""
        return self.message.files

    @property
    def dataset(self) -> str:
        """Dataset name."""
        return self.message.dataset

    @property
    def version(self) -> str:
        """Resolved version id ("latest" for the head)."""
        return self.message.version

    def __getattr__(self, name: str) -> Any:
        if name in self.__slots__:  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.message, name)

    def __len__(self) -> int:
        return len(self.message.files)

    def __iter__(self) -> Iterator[store_pb2.FileEntry]:
        return iter(self.message.files)

    @overload
    def __getitem__(self, index: int) -> store_pb2.FileEntry: ...
    @overload
    def __getitem__(self, index: slice) -> list[store_pb2.FileEntry]: ...

    def __getitem__(self, index: int | slice) -> store_pb2.FileEntry | list[store_pb2.FileEntry]:
        if isinstance(index, slice):
            return list(self.message.files[index])
        return self.message.files[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Manifest):
            return self.message == other.message
        return bool(self.message == other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Manifest(dataset={self.dataset!r}, version={self.version!r}, "
                f"files={len(self)})")
