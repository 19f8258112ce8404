"""Names that look alike are one name; invisible and reordering characters are refused."""

from __future__ import annotations

import hashlib
import unicodedata
from pathlib import Path

import grpc
import pytest

from gristmill.client.hub import Hub
from gristmill.v1 import store_pb2
from tests.helpers import Running

NFC = unicodedata.normalize("NFC", "café")
NFD = unicodedata.normalize("NFD", "café")

#: (character, what it is): bidi controls, zero-width characters, C1 controls, format chars.
REFUSED = [
    ("\u202e", "RIGHT-TO-LEFT OVERRIDE"), ("\u202a", "LEFT-TO-RIGHT EMBEDDING"),
    ("\u2066", "LEFT-TO-RIGHT ISOLATE"), ("\u2069", "POP DIRECTIONAL ISOLATE"),
    ("\u200e", "LEFT-TO-RIGHT MARK"), ("\u200f", "RIGHT-TO-LEFT MARK"),
    ("\u061c", "ARABIC LETTER MARK"), ("\u200b", "ZERO WIDTH SPACE"),
    ("\u200c", "ZERO WIDTH NON-JOINER"), ("\u200d", "ZERO WIDTH JOINER"),
    ("\u2060", "WORD JOINER"), ("\ufeff", "ZERO WIDTH NO-BREAK SPACE"), ("\x85", ""),
    ("\x9f", ""), ("\x1b", ""), ("\u00ad", "SOFT HYPHEN"), ("\u2028", "LINE SEPARATOR"),
]


def put(dataset: str, path: str, data: bytes) -> store_pb2.PutFilesRequest:
    req = store_pb2.PutFilesRequest(dataset=dataset)
    req.chunks.add(path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                   data=data, last=True)
    return req


def read(server: Running, dataset: str, path: str) -> tuple[str, bytes]:
    pieces = [p for r in server.store().ReadFiles(
        store_pb2.ReadFilesRequest(dataset=dataset, paths=[path])) for p in r.files]
    assert not any(p.HasField("error") for p in pieces), pieces
    return pieces[0].path, b"".join(p.data for p in pieces)


def test_nfc_and_nfd_paths_are_one_file(server: Running) -> None:
    stub = server.store()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name="d"))
    first = stub.PutFiles(iter([put("d", f"{NFD}/{NFD}.jpg", b"decomposed")]))
    assert first.files[0].path == f"{NFC}/{NFC}.jpg"
    stub.PutFiles(iter([put("d", f"{NFC}/{NFC}.jpg", b"composed")]))
    listing = stub.ListManifest(store_pb2.ListManifestRequest(dataset="d"))
    assert [f.path for f in listing.files] == [f"{NFC}/{NFC}.jpg"]
    # read, listed by prefix and deleted under either spelling
    for spelling in (NFC, NFD):
        assert read(server, "d", f"{spelling}/{spelling}.jpg") == (
            f"{spelling}/{spelling}.jpg", b"composed")
        listing = stub.ListManifest(store_pb2.ListManifestRequest(dataset="d", prefix=spelling))
        assert len(listing.files) == 1
    deleted = stub.DeleteFiles(store_pb2.DeleteFilesRequest(dataset="d",
                                                            paths=[f"{NFD}/{NFD}.jpg"]))
    assert deleted.deleted == 1


def test_nfc_and_nfd_dataset_names_cannot_be_two_datasets(server: Running) -> None:
    stub = server.store()
    for name in (NFC, NFD):  # names are ASCII: neither spelling makes a dataset
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateDataset(store_pb2.CreateDatasetRequest(name=name))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    listing = stub.ListDatasets(store_pb2.ListDatasetsRequest())
    assert list(listing.datasets) == []


@pytest.mark.parametrize(("char", "name"), REFUSED, ids=lambda v: f"U+{ord(v):04X}"
                         if isinstance(v, str) and len(v) == 1 else None)
def test_invisible_and_reordering_characters_are_refused(server: Running, char: str,
                                                         name: str) -> None:
    stub = server.store()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name="d"))
    code = f"U+{ord(char):04X}"
    with pytest.raises(grpc.RpcError) as info:
        stub.PutFiles(iter([put("d", f"photos/cat{char}gpj.exe", b"x")]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = info.value.details() or ""
    assert code in message and name in message and "rename the file" in message
    assert char not in message  # shown escaped, so that it cannot reorder the message
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateDataset(store_pb2.CreateDatasetRequest(name=f"data{char}set"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert code in (info.value.details() or "")
    listing = stub.ListManifest(store_pb2.ListManifestRequest(dataset="d"))
    assert list(listing.files) == []


def test_a_255_byte_segment_uploads_and_downloads(hub: Hub, tmp_path: Path) -> None:
    name = "é" * 125 + "a.bin"
    assert len(name.encode()) == 255
    folder = tmp_path / "src"
    (folder / "deep").mkdir(parents=True)
    (folder / "deep" / name).write_bytes(b"long name")
    report = hub.import_folder("long", folder)
    assert report.uploaded == 1 and not report.failed
    [path] = hub.download_dataset("long", dest=tmp_path / "out")
    assert path == tmp_path / "out" / "deep" / name
    assert path.read_bytes() == b"long name"
    assert hub.get_file("long", f"deep/{name}").read_bytes() == b"long name"
    leftovers = [p.name for p in (tmp_path / "out").rglob(".*")]
    assert leftovers == []


def test_paths_stored_before_the_rules_stay_readable_and_deletable(server: Running) -> None:
    """Rows written by an older release (NFD spelling, a zero-width joiner in an emoji name)
    are read and deleted by the spelling the manifest shows; new uploads stay strict."""
    stub = server.store()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name="legacy"))
    legacy = {f"{NFD}.txt": b"nfd", "family-\U0001F468\u200d\U0001F469.txt": b"zwj"}
    for i, data in enumerate(legacy.values()):
        stub.PutFiles(iter([put("legacy", f"tmp{i}.txt", data)]))
    assert server.server is not None
    catalog = server.server.context.local["store"].catalog
    for i, path in enumerate(legacy):  # as the previous release stored them
        catalog.db.execute("UPDATE files SET path = ? WHERE dataset = 'legacy' AND path = ?",
                           [path, f"tmp{i}.txt"])
    listed = [f.path for f in stub.ListManifest(
        store_pb2.ListManifestRequest(dataset="legacy")).files]
    assert sorted(listed) == sorted(legacy)
    for path, data in legacy.items():
        assert read(server, "legacy", path) == (path, data)
    deleted = stub.DeleteFiles(store_pb2.DeleteFilesRequest(dataset="legacy",
                                                            paths=list(legacy)))
    assert deleted.deleted == 2
    with pytest.raises(grpc.RpcError) as info:
        stub.PutFiles(iter([put("legacy", "family-\U0001F468\u200d\U0001F469.txt", b"x")]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
