"""A dataset version's manifest as the Hub returns it: the message, iterable and sized."""

from __future__ import annotations

from collections.abc import Iterator
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
    to ``CopyFrom``).
    """

    __slots__ = ("message",)

    def __init__(self, message: store_pb2.Manifest) -> None:
        self.message = message

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
        if name == "message":  # not set yet (copy, pickle): no recursion
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
