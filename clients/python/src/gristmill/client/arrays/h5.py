"""h5py-style access to Zarr v3 arrays: ``File``, ``Group``, ``Dataset``.

``File(target, mode)`` opens the array hierarchy of a gristmill server
(``"host:port"``, over :class:`~gristmill.client.arrays.store.GrpcZarrStore`)
or of a local directory (zarr-python's ``LocalStore``, no server). Datasets
are Zarr v3 arrays; selection, chunking and codecs are zarr-python's own, run
through :class:`~gristmill.client.arrays.pipeline.GristmillCodecPipeline`
(batched fetches, conditional partial-chunk writes, corrupt chunks named).
Every array gets a crc32c checksum as its last codec.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import ItemsView, Iterator, KeysView, ValuesView
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import zarr
import zarr.errors
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec, ZstdCodec
from zarr.core.metadata import ArrayV3Metadata
from zarr.storage import LocalStore

from gristmill.client.arrays.pipeline import GristmillCodecPipeline
from gristmill.client.arrays.store import GrpcZarrStore, valid_key

__all__ = ["COMPRESSIONS", "Dataset", "File", "Group", "is_server_address"]

Mode = Literal["r", "r+", "a", "w", "w-", "x"]
_MODES: dict[str, Literal["r", "r+", "a", "w", "w-"]] = {
    "r": "r", "r+": "r+", "a": "a", "w": "w", "w-": "w-", "x": "w-"}
#: ``compression=`` values understood (h5py's names where Zarr has the codec).
COMPRESSIONS = ("gzip", "zstd", "blosc")
_ADDRESS = re.compile(r"(?:grpc://)?((?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5})(/.*)?")
#: create_dataset keywords of h5py accepted and ignored (their effect does not apply).
_IGNORED = {"track_times", "track_order", "fletcher32", "shuffle", "scaleoffset"}
_DEFAULT_NJOBS = 4


def is_server_address(target: str | os.PathLike[str]) -> bool:
    """Whether ``target`` names a server (``host:port[/group]``) rather than a directory.

    A string of that shape that is also an existing local path is taken as
    the path; write ``./host:1`` to force a directory.
    """
    return (isinstance(target, str) and _ADDRESS.fullmatch(target) is not None
            and not os.path.exists(target))


def _check_name(name: str, what: str = "name") -> str:
    path = name.strip("/")
    if not path or not valid_key(path) or path.split("/")[-1] == "zarr.json":
        raise ValueError(f"invalid {what} {name!r}: use '/'-separated parts of letters, digits, "
                         "'.', '_' and '-' (not starting with '.')")
    return path


def _compressors(compression: Any, opts: Any) -> list[BytesBytesCodec]:
    """The bytes-to-bytes codecs of a new array: the compressor (if any), then crc32c."""
    codec: BytesBytesCodec | None
    if compression is None:
        codec = None
    elif isinstance(compression, BytesBytesCodec):
        codec = compression
    elif isinstance(compression, int) and not isinstance(compression, bool):
        if not 0 <= compression <= 9:
            raise ValueError(f"gzip level must be 0-9, got {compression}")
        codec = GzipCodec(level=compression)
    elif compression == "gzip":
        codec = GzipCodec(level=4 if opts is None else int(opts))
    elif compression == "zstd":
        codec = ZstdCodec(level=0 if opts is None else int(opts))
    elif compression == "blosc":
        codec = BloscCodec(cname="zstd", clevel=5 if opts is None else int(opts))
    else:
        raise ValueError(f"compression {compression!r} is not available; use one of "
                         f"{', '.join(COMPRESSIONS)}, a gzip level 0-9, a zarr codec, or None")
    return ([codec] if codec is not None else []) + [Crc32cCodec()]


def _numeric_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    dt = np.dtype(dtype)
    if dt.kind not in "biufc" or dt.fields is not None:
        raise TypeError(f"dtype {dt} is not supported: use a numeric numpy dtype or bool")
    return dt


class Dataset:
    """An N-d array, sliced like an h5py Dataset (reads and writes go through zarr-python).

    ``njobs`` sets how many chunk fetches (GetKeys calls on a server, chunk
    reads on a directory) run at once.
    """

    def __init__(self, array: zarr.Array[Any], file: File, njobs: int = _DEFAULT_NJOBS) -> None:
        self._array = array
        self._file = file
        self._njobs = 1
        self.njobs = njobs

    @property
    def njobs(self) -> int:
        """Chunk fetches in flight at once."""
        return self._njobs

    @njobs.setter
    def njobs(self, value: int) -> None:
        if int(value) < 1:
            raise ValueError(f"njobs must be at least 1, got {value}")
        self._njobs = int(value)
        inner = self._array._async_array
        if isinstance(inner.metadata, ArrayV3Metadata):
            # zarr builds a plain pipeline for each array; route its chunk I/O through ours
            object.__setattr__(inner, "codec_pipeline",
                               GristmillCodecPipeline.for_metadata(inner.metadata, self._njobs))

    # -- what h5py shows ----------------------------------------------------------
    @property
    def name(self) -> str:
        """Its path from the file's root, e.g. ``/features``."""
        return "/" + self._array.path.removeprefix(self._file._root_path).strip("/")

    @property
    def file(self) -> File:
        """The File it belongs to."""
        return self._file

    @property
    def shape(self) -> tuple[int, ...]:
        """The array's shape."""
        return tuple(self._array.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        """The numpy dtype."""
        return np.dtype(self._array.dtype)

    @property
    def chunks(self) -> tuple[int, ...]:
        """Chunk shape (always chunked: Zarr has no contiguous layout)."""
        return tuple(self._array.chunks)

    @property
    def fillvalue(self) -> Any:
        """What unwritten elements read as (a numpy scalar of the dtype)."""
        return self.dtype.type(self._array.fill_value)

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes of the whole array, uncompressed."""
        return self.size * self.dtype.itemsize

    @property
    def compression(self) -> str | None:
        """The compressor's name (``gzip``, ``zstd``, ``blosc``) or None."""
        for c in self._array.compressors:
            name = c.to_dict()["name"] if isinstance(c, BytesBytesCodec) else type(c).__name__
            if name != "crc32c":
                return str(name)
        return None

    @property
    def compression_opts(self) -> Any:
        """The compressor's level, as h5py reports gzip's."""
        for c in self._array.compressors:
            if isinstance(c, GzipCodec):
                return c.level
            if isinstance(c, ZstdCodec):
                return c.level
            if isinstance(c, BloscCodec):
                return c.clevel
        return None

    @property
    def attrs(self) -> Any:
        """The array's attributes (a mutable mapping stored in its zarr.json)."""
        return self._array.attrs

    @property
    def zarr_array(self) -> zarr.Array[Any]:
        """The zarr-python array underneath."""
        return self._array

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a scalar dataset")
        return self.shape[0]

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f'<gristmill Dataset "{self.name}": shape {self.shape}, type "{self.dtype.str}">'

    def __array__(self, dtype: npt.DTypeLike | None = None, copy: bool | None = None) -> np.ndarray:
        data = np.asarray(self[...])
        return data if dtype is None else data.astype(dtype, copy=False)

    # -- slicing ------------------------------------------------------------------
    def _probe(self, selection: Any) -> Any:
        """What numpy answers for the same selection on a zero-size stand-in (shape, errors)."""
        stand_in = np.broadcast_to(np.zeros((), dtype=np.bool_), self.shape)
        return stand_in[selection]

    def __getitem__(self, selection: Any) -> Any:
        _check_steps(selection)
        probe = self._probe(selection)
        try:
            result = np.asarray(self._array[selection])
        except IndexError as e:  # numpy took it (the probe): zarr cannot select this way
            raise _unsupported(selection, e) from None
        if not isinstance(probe, np.ndarray):  # numpy gives a scalar: so do we
            return result.reshape(())[()]
        if result.shape != probe.shape:  # zarr's orthogonal reading of several index arrays
            raise _unsupported(selection, None)
        return result

    def __setitem__(self, selection: Any, value: Any) -> None:
        _check_steps(selection)
        self._file._check_writable()
        probe = self._probe(selection)
        target = probe.shape if isinstance(probe, np.ndarray) else ()
        data = np.asarray(value)
        if data.shape != target:
            data = np.broadcast_to(data, target)  # numpy's rules, numpy's error
        try:
            self._array[selection] = data[()] if data.ndim == 0 else data
        except IndexError as e:
            raise _unsupported(selection, e) from None

    def read_direct(self, dest: np.ndarray, source_sel: Any = ..., dest_sel: Any = ...) -> None:
        """Read ``self[source_sel]`` into ``dest[dest_sel]`` (as h5py)."""
        dest[dest_sel] = self[source_sel]

    def write_direct(self, source: np.ndarray, source_sel: Any = ..., dest_sel: Any = ...
                     ) -> None:
        """Write ``source[source_sel]`` into ``self[dest_sel]`` (as h5py)."""
        self[dest_sel] = np.asarray(source)[source_sel]


def _unsupported(selection: Any, error: IndexError | None) -> TypeError:
    why = f" ({error})" if error is not None else ""
    return TypeError(f"selection {selection!r} is not supported{why}: combine at most one "
                     "index array with slices and integers (as h5py), or use the Zarr array's "
                     "oindex / vindex (Dataset.zarr_array)")


def _check_steps(selection: Any) -> None:
    items = selection if isinstance(selection, tuple) else (selection,)
    for s in items:
        if isinstance(s, slice) and s.step is not None and s.step < 1:
            raise ValueError(f"Step must be >= 1 (got {s.step})")


class Group:
    """A group of datasets and groups, used like an h5py Group."""

    def __init__(self, group: zarr.Group, file: File | None) -> None:
        self._group = group
        self._file_ref = file

    @property
    def file(self) -> File:
        """The File it belongs to."""
        assert self._file_ref is not None
        return self._file_ref

    @property
    def name(self) -> str:
        """Its path from the file's root (``/`` for the root)."""
        return "/" + self._group.path.removeprefix(self.file._root_path).strip("/")

    @property
    def attrs(self) -> Any:
        """The group's attributes."""
        return self._group.attrs

    def _wrap(self, node: Any) -> Dataset | Group:
        if isinstance(node, zarr.Array):
            return Dataset(node, self.file, self.file.njobs)
        return Group(node, self.file)

    def __getitem__(self, name: str) -> Dataset | Group:
        self.file._check_open()
        if name.strip("/") == "":
            return self.file if name.startswith("/") else self
        if name.startswith("/") and self is not self.file:
            return self.file[name]
        path = name.strip("/")
        if not valid_key(path):
            raise KeyError(f"no dataset or group {name!r} in {self.file.filename}")
        try:
            node = self._group[path]
        except KeyError:
            raise KeyError(f"no dataset or group {name!r} in {self.file.filename}") from None
        return self._wrap(node)

    def get(self, name: str, default: Any = None) -> Any:
        """``self[name]``, or ``default`` if there is none."""
        try:
            return self[name]
        except KeyError:
            return default

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self[name]
        except KeyError:
            return False
        return True

    def _names(self) -> list[str]:
        self.file._check_open()
        return sorted(name for name, _ in self._group.members())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def keys(self) -> KeysView[str]:
        """Member names, sorted (as h5py lists them)."""
        return dict.fromkeys(self._names()).keys()

    def values(self) -> ValuesView[Dataset | Group]:
        """Members, sorted by name."""
        return {n: self[n] for n in self._names()}.values()

    def items(self) -> ItemsView[str, Dataset | Group]:
        """(name, member) pairs, sorted by name."""
        return {n: self[n] for n in self._names()}.items()

    def __delitem__(self, name: str) -> None:
        self.file._check_writable()
        path = name.strip("/")
        if name not in self:
            raise KeyError(f"no dataset or group {name!r} in {self.file.filename}")
        del self._group[path]

    def __repr__(self) -> str:
        return f'<gristmill Group "{self.name}" ({len(self)} members)>'

    def create_group(self, name: str) -> Group:
        """A new (empty) group; ValueError if the name is taken."""
        self.file._check_writable()
        path = _check_name(name)
        if name in self:
            raise ValueError(f"cannot create group {name!r}: the name already exists")
        return Group(self._group.create_group(path), self.file)

    def require_group(self, name: str) -> Group:
        """The group ``name``, created if missing."""
        if name in self:
            node = self[name]
            if not isinstance(node, Group):
                raise TypeError(f"{name!r} is a dataset, not a group")
            return node
        return self.create_group(name)

    def create_dataset(self, name: str, shape: Any = None, dtype: npt.DTypeLike | None = None,
                       data: Any = None, *, chunks: Any = None, fillvalue: Any = None,
                       compression: Any = None, compression_opts: Any = None,
                       maxshape: Any = None, **kwds: Any) -> Dataset:
        """Create a dataset, as h5py's ``create_dataset`` (same positional order).

        Args:
            name: its path, e.g. ``"features"`` or ``"run1/latents"`` (groups are created).
            shape: the shape; taken from ``data`` when omitted.
            dtype: a numeric numpy dtype or bool; default ``data``'s, else float32.
            data: initial contents (any array-like; a scalar fills the dataset).
            chunks: a chunk shape; None or True lets zarr choose.
            fillvalue: what unwritten elements read as (default 0; NaN works).
            compression: None, ``"gzip"`` (or a level 0-9), ``"zstd"``, ``"blosc"``,
                or a zarr bytes-to-bytes codec. A crc32c checksum is always added.
            compression_opts: the compressor's level.
            maxshape: only None or the shape itself (datasets do not grow).
            **kwds: h5py's ``track_times``, ``fletcher32`` (always on: crc32c),
                ``shuffle`` and the like are accepted and ignored.
        """
        self.file._check_writable()
        unknown = set(kwds) - _IGNORED
        if unknown:
            raise TypeError(f"create_dataset() got unexpected keyword(s) {sorted(unknown)}")
        path = _check_name(name)
        arr = None if data is None else np.asarray(data)
        if shape is None:
            if arr is None:
                raise TypeError("create_dataset needs a shape or data")
            shape = arr.shape
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(n) for n in shape)
        if arr is not None and arr.shape != shape and arr.size != 1:
            if arr.size != int(np.prod(shape, dtype=np.int64)):
                raise ValueError(f"shape {shape} does not match data of shape {arr.shape}")
            arr = arr.reshape(shape)
        dt = _numeric_dtype(dtype if dtype is not None else
                            (arr.dtype if arr is not None else np.float32))
        if maxshape is not None and tuple(maxshape) != shape:
            raise ValueError("resizable datasets (maxshape) are not supported: create the "
                             "dataset at its final shape")
        if chunks is None or chunks is True or chunks is False:
            chunk_arg: Any = "auto"
        else:
            chunk_arg = (chunks,) if isinstance(chunks, int) else tuple(int(c) for c in chunks)
            if len(chunk_arg) != len(shape) or any(c < 1 for c in chunk_arg):
                raise ValueError(f"chunks {chunks} must have one positive size per dimension "
                                 f"of shape {shape}")
        if name in self:
            raise ValueError(f"cannot create dataset {name!r}: the name already exists")
        fill = 0 if fillvalue is None else fillvalue
        try:
            created = self._group.create_array(
                path, shape=shape, dtype=dt, chunks=chunk_arg, fill_value=fill,
                compressors=_compressors(compression, compression_opts),
                config={"write_empty_chunks": False})
        except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError,
                zarr.errors.ContainsArrayAndGroupError):
            raise ValueError(f"cannot create dataset {name!r}: the name already exists") from None
        ds = Dataset(created, self.file, self.file.njobs)
        if arr is not None:
            ds[...] = arr
        return ds

    def require_dataset(self, name: str, shape: Any, dtype: npt.DTypeLike, exact: bool = False,
                        **kwds: Any) -> Dataset:
        """The dataset ``name`` if its shape and dtype fit, else a new one (as h5py)."""
        if name not in self:
            return self.create_dataset(name, shape, dtype, **kwds)
        node = self[name]
        if not isinstance(node, Dataset):
            raise TypeError(f"{name!r} is a group, not a dataset")
        want = (shape,) if isinstance(shape, int) else tuple(shape)
        if node.shape != want:
            raise TypeError(f"shapes do not match (existing {node.shape} vs new {want})")
        if exact and node.dtype != np.dtype(dtype):
            raise TypeError(f"datatypes do not exactly match (existing {node.dtype} vs new "
                            f"{np.dtype(dtype)})")
        if not np.can_cast(np.dtype(dtype), node.dtype):
            raise TypeError(f"datatypes cannot be safely cast (existing {node.dtype} vs new "
                            f"{np.dtype(dtype)})")
        return node


class File(Group):
    """An array hierarchy on a gristmill server or in a local directory, used like h5py.File.

    Args:
        target: ``"host:port"`` (optionally ``"host:port/group"`` for a
            sub-hierarchy) for a server, or a directory (``str`` or path).
        mode: ``"r"`` read only, must exist; ``"r+"`` read/write, must exist;
            ``"a"`` read/write, created if missing; ``"w"`` created, or emptied
            if it exists (on a server: every array under the target, for
            every user of that server); ``"w-"``/``"x"`` created, must not exist.
        api_key: for a server; default ``GRISTMILL_API_KEY``.
        ca_file: TLS root certificate for a server; default ``GRISTMILL_CA_FILE``.
        njobs: chunk fetches in flight at once (each dataset can change it).
        shared_memory: for a server on this host, chunk bytes through rings in
            ``/dev/shm`` instead of the socket. None (default): when the
            address is a loopback one and the server can open the rings;
            True: required; False: never (see :class:`GrpcZarrStore`).
    """

    def __init__(self, target: str | os.PathLike[str], mode: Mode = "r", *,
                 api_key: str | None = None, ca_file: str | os.PathLike[str] | None = None,
                 njobs: int = _DEFAULT_NJOBS, shared_memory: bool | None = None) -> None:
        if mode not in _MODES:
            raise ValueError(f"invalid mode {mode!r}; use one of {', '.join(_MODES)}")
        self.mode = "r" if mode == "r" else "r+"
        self.njobs = njobs
        self._closed = False
        self._root_path = ""
        store: GrpcZarrStore | LocalStore
        match = _ADDRESS.fullmatch(str(target)) if is_server_address(target) else None
        if match is not None:
            self.filename = str(target)
            self._root_path = _check_name(match.group(2), "group") if (
                match.group(2) or "/").strip("/") else ""
            store = GrpcZarrStore(match.group(1), api_key=api_key,
                                  ca_file=Path(ca_file) if ca_file else None,
                                  read_only=mode == "r", shared_memory=shared_memory)
        else:
            directory = Path(target)
            self.filename = str(directory)
            if mode in ("r", "r+") and not (directory / "zarr.json").is_file():
                raise FileNotFoundError(errno.ENOENT, "no Zarr hierarchy (zarr.json) to open",
                                        str(directory))
            store = LocalStore(directory, read_only=mode == "r")
        self._store = store
        try:
            group = zarr.open_group(store=store, mode=_MODES[mode], path=self._root_path or None,
                                    zarr_format=3)
        except (zarr.errors.GroupNotFoundError, FileNotFoundError):
            self.close()
            raise FileNotFoundError(errno.ENOENT, "no array hierarchy here; open it with mode "
                                    "'a' to create one", self.filename) from None
        except zarr.errors.ContainsArrayError:
            self.close()
            raise FileExistsError(errno.EEXIST, "this is a Zarr array, not a group of them: open "
                                  "it with zarr.open_array, or its parent with File",
                                  self.filename) from None
        except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayAndGroupError):
            self.close()
            raise FileExistsError(errno.EEXIST, "an array hierarchy exists here (mode "
                                  f"{mode!r} creates a new one only)", self.filename) from None
        except BaseException:
            self.close()
            raise
        super().__init__(group, None)

    @property
    def file(self) -> File:
        """The File itself."""
        return self

    @property
    def store(self) -> GrpcZarrStore | LocalStore:
        """The Zarr store underneath (give it to zarr-python to use the arrays directly)."""
        return self._store

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the File {self.filename} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.mode == "r":
            raise ValueError(f"the File {self.filename} is open read-only (mode 'r'); open it "
                             "with mode 'r+' or 'a' to write")

    def close(self) -> None:
        """Close the connection (server) or the store (directory)."""
        if not self._closed:
            self._closed = True
            self._store.close()

    def __enter__(self) -> File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"mode {self.mode}"
        return f'<gristmill File "{self.filename}" ({state})>'

    def __bool__(self) -> bool:
        return not self._closed
