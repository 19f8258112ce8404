"""The header reader against Pillow's header facts, and against hostile bytes."""

from __future__ import annotations

import io
import random
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from gristmill.client.imageinfo import (
    HEAD_BYTES,
    MAX_READ_BYTES,
    ImageHeader,
    read_header,
    read_header_at,
)
from tests import images

ORIENTATION = 0x0112


def exif(orientation: int) -> bytes:
    e = Image.Exif()
    e[ORIENTATION] = orientation
    return e.tobytes()


def xmp(orientation: int) -> bytes:
    return (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/'
            b'02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/"'
            b' tiff:Orientation="%d"/></rdf:RDF></x:xmpmeta>' % orientation)


def rgb(w: int = 37, h: int = 23, seed: int = 0) -> np.ndarray:
    return images.gradient(w, h, seed)


def rgba(w: int = 37, h: int = 23) -> np.ndarray:
    a = rgb(w, h)
    return np.dstack([a, a[..., :1]])


def png_with_xmp(orientation: int, **kw: object) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp(orientation).decode())
    return images.encode(rgb(), "PNG", pnginfo=info, **kw)


def animated(fmt: str) -> bytes:
    frames = [Image.fromarray(rgb(40, 30, seed)) for seed in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=50,
                   exif=exif(6) if fmt == "WEBP" else b"")
    return buf.getvalue()


def corpus() -> dict[str, bytes]:
    """Many small images in every supported flavour, written by Pillow (and libvips/libjpeg)."""
    c: dict[str, bytes] = {
        "jpeg-baseline": images.encode(rgb(), "JPEG"),
        "jpeg-progressive": images.encode(rgb(301, 199), "JPEG", progressive=True),
        "jpeg-optimized": images.encode(rgb(64, 1), "JPEG", optimize=True),
        "jpeg-grey": images.encode(rgb()[..., 0], "JPEG"),
        "jpeg-cmyk": images.cmyk_jpeg((10, 20, 30, 40), size=48),
        "jpeg-ycck": images.ycck_jpeg((10, 20, 30, 40), size=40),
        "jpeg-restart-markers": images.encode(rgb(200, 120), "JPEG", restart_marker_blocks=1),
        "jpeg-xmp-orientation": images.encode(rgb(), "JPEG", xmp=xmp(6)),
        "jpeg-exif-and-xmp": images.encode(rgb(), "JPEG", exif=exif(3), xmp=xmp(6)),
        "jpeg-icc": images.encode(rgb(), "JPEG", icc_profile=b"\0" * 70_000),
        "png-grey": images.encode(rgb()[..., 0], "PNG"),
        "png-grey-alpha": images.encode(rgba()[..., 2:], "PNG"),
        "png-rgb": images.encode(rgb(), "PNG"),
        "png-rgba": images.encode(rgba(), "PNG"),
        "png-palette": images.palette_png(),
        "png-palette-opaque": images.palette_png(transparent_left=False),
        "png-16bit": images.png16(1234, 31, 17),
        "png-grey-16bit": images.encode(np.full((9, 11), 700, np.uint16), "PNG"),
        "png-1bit": images.encode(rgb()[..., 0] > 128, "PNG"),
        "png-xmp-orientation": png_with_xmp(8),
        "png-exif-and-xmp": png_with_xmp(6, exif=exif(2)),
        "webp-lossy": images.encode(rgb(), "WEBP", quality=80),
        "webp-lossless": images.encode(rgb(), "WEBP", lossless=True),
        "webp-lossy-alpha": images.encode(rgba(), "WEBP"),
        "webp-lossless-alpha": images.encode(rgba(), "WEBP", lossless=True),
        "webp-xmp": images.encode(rgb(), "WEBP", xmp=xmp(5)),
        "webp-animated": animated("WEBP"),
        "gif": images.encode(rgb(), "GIF"),
        "gif-animated": animated("GIF"),
        "tiff-rgb": images.encode(rgb(), "TIFF"),
        "tiff-lzw-rgba": images.encode(rgba(), "TIFF", compression="tiff_lzw"),
        "tiff-grey-16bit": images.encode(np.full((9, 11), 700, np.uint16), "TIFF"),
        "tiff-big": images.encode(rgb(), "TIFF", big_tiff=True),
        "tiff-cmyk": _cmyk_tiff(),
        "bmp-rgb": images.encode(rgb(), "BMP"),
        "bmp-grey": images.encode(rgb()[..., 0], "BMP"),
    }
    for o in range(1, 9):
        c[f"jpeg-exif-{o}"] = images.oriented_jpeg(rgb(33, 21), o)
        c[f"jpeg-progressive-exif-{o}"] = images.encode(rgb(), "JPEG", progressive=True,
                                                        exif=exif(o))
        c[f"png-exif-{o}"] = images.encode(rgb(), "PNG", exif=exif(o))
        c[f"png-palette-exif-{o}"] = images.encode(rgb(), "PNG", exif=exif(o), bits=4)
        c[f"webp-exif-{o}"] = images.encode(rgb(), "WEBP", exif=exif(o))
        c[f"webp-lossless-exif-{o}"] = images.encode(rgb(), "WEBP", lossless=True, exif=exif(o))
        c[f"tiff-exif-{o}"] = images.encode(rgb(), "TIFF", exif=exif(o))
    for seed in range(8):  # odd sizes
        w, h = 1 + seed * 97, 1 + (seed * 53) % 211
        c[f"jpeg-size-{w}x{h}"] = images.encode(rgb(w, h, seed), "JPEG")
        c[f"png-size-{w}x{h}"] = images.encode(rgb(w, h, seed), "PNG")
    return c


def _cmyk_tiff() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba(), "RGBA").convert("CMYK").save(buf, "TIFF")
    return buf.getvalue()


CORPUS = corpus()


def pillow_facts(data: bytes) -> tuple[str, str, tuple[int, int], int, int]:
    """Format, media type, displayed size, orientation and bands, as Pillow reads them."""
    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format or ""
        w, h = im.size
        bands = len(im.getbands())
        orientation = int(im.getexif().get(ORIENTATION, 0) or 0)  # decodes small PNGs: fine here
    if fmt != "TIFF" and orientation in (5, 6, 7, 8):
        w, h = h, w  # Pillow's TIFF size is already as displayed
    return fmt, Image.MIME[fmt], (w, h), orientation, bands


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_facts_match_pillow(name: str) -> None:
    data = CORPUS[name]
    header = read_header(data)
    assert header is not None, name
    fmt, media_type, size, orientation, bands = pillow_facts(data)
    assert (header.format, header.media_type) == (fmt, media_type)
    assert (header.width, header.height) == size
    assert header.orientation == orientation
    if header.components:
        assert header.components == bands
    else:
        assert fmt == "BMP"


def test_corpus_covers_every_format_and_orientation() -> None:
    facts = [read_header(d) for d in CORPUS.values()]
    assert {f.format for f in facts if f} == {"JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"}
    for fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        assert {f.orientation for f in facts if f and f.format == fmt} >= set(range(1, 9))


def test_sources_agree(tmp_path: Path) -> None:
    data = CORPUS["jpeg-exif-6"]
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    expected = read_header(data)
    assert expected == ImageHeader("JPEG", "image/jpeg", 33, 21, 6, 3)
    assert expected.stored_size == (21, 33)  # stored turned a quarter
    assert read_header(bytearray(data)) == expected
    assert read_header(memoryview(data)) == expected
    assert read_header(io.BytesIO(data)) == expected
    assert read_header(path) == expected
    assert read_header(str(path)) == expected
    with open(path, "rb") as f:
        assert read_header(f) == expected
    assert read_header_at(lambda o, n: data[o:o + n]) == expected


def test_big_endian_exif_and_exif_prefix_twice() -> None:
    # IFD0 with two entries (ImageDescription, then Orientation), big-endian
    tiff = (b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 2)
            + struct.pack(">HHII", 0x010E, 2, 4, 0x61626300)
            + struct.pack(">HHIHH", ORIENTATION, 3, 1, 7, 0) + struct.pack(">I", 0))
    for segment in (b"Exif\x00\x00" + tiff, b"Exif\x00\x00Exif\x00\x00" + tiff):
        data = _with_app1(CORPUS["jpeg-baseline"], segment)
        assert pillow_facts(data)[3] == 7
        header = read_header(data)
        assert header is not None and header.orientation == 7 and header.stored_size == (37, 23)


def _with_app1(jpeg: bytes, segment: bytes) -> bytes:
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + jpeg[2:]


# hostile input -------------------------------------------------------------
class CountingReader:
    """A read_at over bytes (or a generator of bytes) that records what was asked."""

    def __init__(self, data: bytes | Callable[[int, int], bytes]) -> None:
        self.data = data
        self.calls = 0
        self.bytes = 0

    def __call__(self, offset: int, length: int) -> bytes:
        self.calls += 1
        self.bytes += length
        if callable(self.data):
            return self.data(offset, length)
        return self.data[offset:offset + length]

    def check_bounded(self) -> None:
        assert self.bytes <= HEAD_BYTES + MAX_READ_BYTES
        assert self.calls <= 1 + MAX_READ_BYTES // 1024


def timed(read_at: Callable[[int, int], bytes]) -> tuple[ImageHeader | None, float]:
    start = time.perf_counter()
    header = read_header_at(read_at)
    return header, time.perf_counter() - start


def test_png_header_claiming_60000_squared() -> None:
    data = images.huge_png_header(60000, 60000)
    assert len(data) < 100
    reader = CountingReader(data)
    header, seconds = timed(reader)
    assert header == ImageHeader("PNG", "image/png", 60000, 60000, 0, 3)
    assert reader.calls == 1 and seconds < 0.1


def test_png_decompression_bomb_is_never_inflated() -> None:
    data = images.png_bomb(20000, 20000)  # 400 MB of pixels in ~390 KB
    assert len(data) < 4 << 20
    reader = CountingReader(data)
    header, seconds = timed(reader)
    assert header == ImageHeader("PNG", "image/png", 20000, 20000, 0, 1)
    assert reader.calls == 1 and reader.bytes == HEAD_BYTES and seconds < 0.1
    # the same through a real file
    assert read_header(io.BytesIO(data)) == header


def test_huge_jpeg_frame_header() -> None:
    header = read_header(images.huge_jpeg_header(60000, 50000))
    assert header is not None and (header.width, header.height) == (60000, 50000)


def test_sides_over_int32_or_zero_are_not_images() -> None:
    ihdr = struct.pack(">IIBBBBB", 2**31, 5, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + images._chunk(b"IHDR", ihdr) + images._chunk(b"IDAT", b"")
    assert read_header(png) is None
    zero = bytearray(images.huge_jpeg_header(0, 10))
    assert read_header(bytes(zero)) is None


def _app_chain(segment_length: int, then: bytes = b"") -> Callable[[int, int], bytes]:
    """An endless JPEG: SOI, then APP15 segments of ``segment_length`` bytes forever."""
    period = 2 + segment_length
    unit = b"\xff\xef" + struct.pack(">H", segment_length) + b"\xa5" * (segment_length - 2)

    def read_at(offset: int, length: int) -> bytes:
        stream = b"\xff\xd8"
        out = bytearray()
        pos = offset
        while len(out) < length:
            if pos < 2:
                out += stream[pos:2]
                pos = 2
                continue
            k = (pos - 2) % period
            piece = unit[k:k + length - len(out)]
            out += piece
            pos += len(piece)
        return bytes(out)

    return read_at


@pytest.mark.parametrize("segment_length", [2, 16, 700, 5000, 65535])
def test_endless_app_segment_chain_stops_at_the_cap(segment_length: int) -> None:
    reader = CountingReader(_app_chain(segment_length))
    header, seconds = timed(reader)
    assert header is None
    reader.check_bounded()
    assert seconds < 1.0


@pytest.mark.parametrize("prefix", [b"ICC_PROFILE\x00", b"http://ns.adobe.com/xmp/extension/\x00"])
def test_app_segments_skipped_not_read(prefix: bytes) -> None:
    # 40 segments of 64 KiB (2.6 MB: ICC profiles, a phone's extended XMP) before the
    # frame: walked by their lengths, not read
    base = CORPUS["jpeg-exif-6"]
    marker = b"\xff\xe2" if prefix.startswith(b"ICC") else b"\xff\xe1"
    filler = b"".join(marker + b"\xff\xff" + prefix + b"\x00" * (65533 - len(prefix))
                      for _ in range(40))
    data = base[:2] + filler + base[2:]
    reader = CountingReader(data)
    header = read_header_at(reader)
    assert header == read_header(base)
    reader.check_bounded()
    assert reader.bytes < 100_000


def test_png_text_chunks_skipped_not_read() -> None:
    info = PngImagePlugin.PngInfo()
    for i in range(40):
        info.add_itxt(f"Comment{i}", "x" * 60_000)
    info.add_itxt("XML:com.adobe.xmp", xmp(6).decode())
    data = images.encode(rgb(), "PNG", pnginfo=info)
    reader = CountingReader(data)
    header = read_header_at(reader)
    assert header is not None and header.orientation == pillow_facts(data)[3] == 6
    reader.check_bounded()
    assert reader.bytes < 100_000


def test_looping_and_out_of_range_exif_is_ignored() -> None:
    jpeg = CORPUS["jpeg-baseline"]
    cases = [
        b"II*\x00\x08\x00\x00\x00\xff\xff",  # 65535 entries, none present
        b"II*\x00\xff\xff\xff\x7f",  # IFD far outside the segment
        b"MM\x00*\x00\x00\x00\x08\x00\x01" + struct.pack(">HHII", ORIENTATION, 3, 3, 10**9),
        b"II*\x00\x08\x00\x00\x00\x01\x00" + struct.pack("<HHIHH", ORIENTATION, 3, 1, 9, 0),
        b"II*\x00\x08\x00\x00\x00\x01\x00" + struct.pack("<HHIHH", ORIENTATION, 7, 1, 6, 0),
        b"XX*\x00",
        b"",
    ]
    for tiff in cases:
        header = read_header(_with_app1(jpeg, b"Exif\x00\x00" + tiff))
        assert header is not None and header.orientation == 0 and header.stored_size == (37, 23)


@pytest.mark.parametrize("tiff", [
    b"II+\x00\x08\x00\x00\x00" + struct.pack("<Q", 2**64 - 1),  # BigTIFF IFD at 16 EiB
    b"MM\x00*" + struct.pack(">I", 2**32 - 1),
    b"II*\x00\x08\x00\x00\x00\x01\x00" + struct.pack("<HHII", 0x0100, 4, 2, 2**32 - 1),
])
def test_far_offsets_in_a_real_file(tmp_path: Path, tiff: bytes) -> None:
    path = tmp_path / "far.tif"
    path.write_bytes(tiff + b"\x00" * 2 * HEAD_BYTES)  # longer than the head: pread runs
    assert read_header(path) is None
    with open(path, "rb") as f:
        assert read_header(f) is None


NOT_IMAGES = [b"", b"hello", b"\x00" * 10_000, b"PK\x03\x04" + b"\x00" * 100,
              b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
              b"GIF89a\x01", b"II*\x00", b"BM" + b"\x00" * 40, b"\xff\xd8\xff\xd9"]


@pytest.mark.parametrize("data", NOT_IMAGES)
def test_not_images(data: bytes) -> None:
    assert read_header(data) is None


def _prefix_is_consistent(prefix: bytes, full: ImageHeader) -> None:
    header = read_header(prefix)
    if header is None or header == full:
        return
    # WebP keeps its orientation after the image data: without it, the size stands
    assert full.format == "WEBP" and header.orientation == 0
    assert (header.format, header.stored_size) == (full.format, full.stored_size)


@pytest.mark.parametrize("name", ["jpeg-exif-6", "jpeg-progressive", "jpeg-cmyk", "png-exif-5",
                                  "png-palette", "png-xmp-orientation", "webp-exif-7",
                                  "webp-lossless-alpha", "webp-animated", "gif", "tiff-exif-6",
                                  "tiff-big", "bmp-rgb", "jpeg-icc"])
def test_truncated_at_every_length(name: str) -> None:
    data = CORPUS[name]
    full = read_header(data)
    assert full is not None
    n = len(data)
    lengths = range(n) if n <= 6000 else sorted({*range(6000), *range(6000, n, 97)})
    for length in lengths:
        _prefix_is_consistent(data[:length], full)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_fuzz_random_bytes(data: bytes) -> None:
    start = time.perf_counter()
    read_header(data)
    assert time.perf_counter() - start < 1.0


MAGICS = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR", b"RIFF\x00\x00\x00\x00WEBP",
          b"RIFF\x00\x00\x00\x00WEBPVP8X", b"GIF89a", b"II*\x00", b"MM\x00*", b"II+\x00",
          b"BM", b"\xff\xd8\xff\xe1\x00\x40Exif\x00\x00II*\x00"]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(MAGICS), st.binary(max_size=5000))
def test_fuzz_magic_then_random_bytes(magic: bytes, tail: bytes) -> None:
    reader = CountingReader(magic + tail)
    start = time.perf_counter()
    header = read_header_at(reader)
    assert time.perf_counter() - start < 1.0
    reader.check_bounded()
    if header is not None:
        assert 0 < header.width < 2**31 and 0 < header.height < 2**31
        assert 0 <= header.orientation <= 8


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CORPUS)), st.lists(
    st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_mutated_images(name: str, edits: list[tuple[int, int]]) -> None:
    data = bytearray(CORPUS[name][:20_000])
    for pos, value in edits:
        data[pos % len(data)] = value
    reader = CountingReader(bytes(data))
    start = time.perf_counter()
    read_header_at(reader)
    assert time.perf_counter() - start < 1.0
    reader.check_bounded()


def test_deterministic_bulk_mutation() -> None:
    """Many more mutations than hypothesis runs, seeded: never raises, always bounded."""
    rng = random.Random(11)
    names = sorted(CORPUS)
    for _ in range(3000):
        data = bytearray(CORPUS[rng.choice(names)][:8000])
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            del data[rng.randrange(len(data)):]
        reader = CountingReader(bytes(data))
        read_header_at(reader)
        reader.check_bounded()


# the services use it -------------------------------------------------------
def test_store_sniff_reads_the_header_only() -> None:
    from gristmill.store.images import sniff

    bomb = images.png_bomb(20000, 20000)
    reader = CountingReader(bomb)
    media_type, info = sniff("x.png", reader)
    assert media_type == "image/png" and info is not None
    assert (info.width, info.height, info.format, info.orientation) == (20000, 20000, "PNG", 0)
    assert reader.bytes == HEAD_BYTES
    media_type, info = sniff("notes.txt", CountingReader(b"plain text"))
    assert (media_type, info) == ("text/plain", None)
    assert sniff("blob", CountingReader(b"\x00" * 10))[0] == "application/octet-stream"
    data = CORPUS["jpeg-exif-6"]
    media_type, info = sniff("a.bin", CountingReader(data))
    assert media_type == "image/jpeg" and info is not None
    assert (info.width, info.height, info.format, info.orientation) == (33, 21, "JPEG", 6)


def test_pillow_limit_left_alone() -> None:
    import gristmill.ingest.local
    import gristmill.store.images
    import gristmill.store.store  # noqa: F401

    assert Image.MAX_IMAGE_PIXELS is not None


def test_folder_scan_reads_headers_only(tmp_path: Path) -> None:
    from gristmill.ingest.local import FolderStore

    (tmp_path / "bomb.png").write_bytes(images.png_bomb(20000, 20000))
    (tmp_path / "claims.png").write_bytes(images.huge_png_header(60000, 60000))
    (tmp_path / "turned.jpg").write_bytes(CORPUS["jpeg-exif-6"])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    store = FolderStore(tmp_path, show_progress=False)
    by_path = {e.path: e for e in store.entries}
    assert (by_path["bomb.png"].image.width, by_path["bomb.png"].image.height) == (20000, 20000)
    assert by_path["claims.png"].image.width == 60000
    turned = by_path["turned.jpg"].image
    assert (turned.width, turned.height, turned.orientation, turned.format) == (33, 21, 6, "JPEG")
    assert not by_path["broken.png"].HasField("image")


def test_zlib_bomb_helper_is_a_valid_png() -> None:
    data = images.png_bomb(300, 200, 2)
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (300, 200) and im.mode == "RGB"
        assert not np.asarray(im).any()
    assert zlib.decompress(data[data.index(b"IDAT") + 4:-16])[:1] == b"\x00"
