"""The decode pipeline in-process: geometry, colour, messy files, companions."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from gristmill.client.imageinfo import read_header
from gristmill.decode import (
    BucketConfig,
    Color,
    CompanionTransform,
    Crop,
    DecodeError,
    Decoder,
    Encoding,
    Reason,
    Resample,
    SampleInput,
    Transform,
    bucket_table,
    decode_sample,
)
from tests import images

BUCKETS = Transform(buckets=BucketConfig(512, 16))


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def pil_reference(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """Scale to cover, centre-crop, the slow obvious way."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    tw, th = size
    s = max(tw / im.width, th / im.height)
    rw, rh = max(tw, round(im.width * s)), max(th, round(im.height * s))
    im = im.resize((rw, rh), Image.Resampling.BOX)
    x, y = (rw - tw) // 2, (rh - th) // 2
    return np.asarray(im.crop((x, y, x + tw, y + th)))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("size", [(1, 1), (9000, 12), (12, 9000), (1600, 1200), (700, 1300),
                                  (512, 512), (333, 1000)])
def test_output_is_exactly_its_bucket(fmt: str, size: tuple[int, int]) -> None:
    w, h = size
    data = images.encode(images.gradient(w, h), fmt)
    result = decode_sample(data, BUCKETS)
    table = bucket_table(BucketConfig(512, 16))
    assert result.bucket == table.nearest(w, h)
    assert result.image.pixels.shape == (result.bucket.height, result.bucket.width, 3)
    assert result.bucket.width % 16 == 0 and result.bucket.height % 16 == 0
    assert result.source_size == (w, h)
    assert result.image.pixels.flags.c_contiguous


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_pixels_match_a_plain_reference(fmt: str) -> None:
    data = images.encode(images.gradient(1600, 1000, seed=3), fmt, quality=95) \
        if fmt == "JPEG" else images.encode(images.gradient(1600, 1000, seed=3), fmt)
    result = decode_sample(data, BUCKETS)
    assert result.bucket is not None
    ref = pil_reference(data, (result.bucket.width, result.bucket.height))
    assert mean_abs_diff(result.image.pixels, ref) < 3.0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int) -> None:
    upright = images.quadrants(400, 240)
    data = images.oriented_jpeg(upright, orientation)
    result = decode_sample(data, Transform(size=(200, 120)))
    assert result.source_size == (400, 240)
    out = result.image.pixels
    for (y, x), color in zip([(30, 50), (30, 150), (90, 50), (90, 150)], images.QUADRANT_COLORS,
                             strict=True):
        assert np.abs(out[y, x].astype(int) - color).max() < 30, (orientation, y, x, out[y, x])


def _with_exif(exif: bytes, order: bytes = b"II") -> bytes:
    """A small JPEG whose APP1 segment holds ``exif`` (after the Exif marker)."""
    body = images.encode(images.gradient(16, 8), "JPEG")
    app1 = b"Exif\0\0" + exif
    return body[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + body[2:]


def test_xmp_orientation_is_applied_as_the_store_plans_it() -> None:
    # the store and Loader.from_folder bucket a JPEG by its Exif orientation, else its XMP
    # one (gristmill.client.imageinfo); the decoder must turn it the same way
    body = images.encode(images.gradient(16, 8), "JPEG")
    xmp = (b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta><rdf:RDF><rdf:Description "
           b'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    data = body[:2] + b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp + body[2:]
    header = read_header(data)
    assert header is not None and header.orientation == 6
    assert decode_sample(data, Transform(size=(8, 8))).source_size == (header.width,
                                                                       header.height) == (8, 16)


@pytest.mark.parametrize("exif", [
    b"", b"II", b"II*\0\xff\xff\xff\xff", b"MM\0*\0\0\0\x08\xff\xff",
    b"II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0\x09\0\0\0",  # orientation 9
    b"II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0\x06\0\0\0",  # 6, little-endian
    b"MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0\x08\0\0",  # 8, big-endian
    b"II*\0\x08\0\0\0\x05\0\x12\x01\x03\0",  # entries cut short
], ids=["empty", "order-only", "bad-offset", "huge-count", "out-of-range", "le-6", "be-8",
        "truncated"])
def test_exif_orientation_is_read_as_pillow_reads_it(exif: bytes) -> None:
    data = _with_exif(exif)
    with Image.open(io.BytesIO(data)) as im:
        try:
            value = im.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - Pillow gives up on some broken blocks: as stored
            value = 1
    expected = value if isinstance(value, int) and 1 <= value <= 8 else 1
    info = decode_sample(data, Transform(size=(8, 8)))
    assert info.source_size == ((8, 16) if expected >= 5 else (16, 8))


@pytest.mark.parametrize("make", [images.cmyk_jpeg, images.ycck_jpeg])
def test_cmyk_and_ycck_jpegs_become_rgb(make: object) -> None:
    data = make((255, 0, 0, 0))  # type: ignore[operator]
    out = decode_sample(data, Transform(size=(32, 32))).image.pixels
    r, g, b = out[16, 16].astype(int)
    assert r < 80 and g > 120 and b > 180, (r, g, b)  # cyan
    white = decode_sample(make((0, 0, 0, 0)), Transform(size=(32, 32))).image.pixels  # type: ignore[operator]
    assert white.min() > 200


def test_grayscale_and_progressive_jpeg() -> None:
    gray = images.gradient(300, 200)[..., 0]
    out = decode_sample(images.encode(gray, "JPEG"), Transform(size=(150, 100))).image.pixels
    assert out.shape == (100, 150, 3)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    one = decode_sample(images.encode(gray, "JPEG"),
                        Transform(size=(150, 100), color=Color.GRAY)).image.pixels
    assert one.shape == (100, 150, 1)
    rgb = images.gradient(640, 480, seed=1)
    base = decode_sample(images.encode(rgb, "JPEG", quality=95), BUCKETS).image.pixels
    prog = decode_sample(images.encode(rgb, "JPEG", quality=95, progressive=True),
                         BUCKETS).image.pixels
    assert base.shape == prog.shape and mean_abs_diff(base, prog) < 2.0


def test_sixteen_bit_png() -> None:
    out = decode_sample(images.png16(40000), Transform(size=(15, 10))).image.pixels
    assert out.shape == (10, 15, 3)
    assert abs(int(out[5, 5, 0]) - round(40000 / 257)) <= 1


def test_palette_png_with_transparency_and_background() -> None:
    data = images.palette_png()
    out = decode_sample(data, Transform(size=(10, 10), background=(0, 0, 255))).image.pixels
    assert out[5, 1].tolist() == [0, 0, 255]  # transparent: the background
    assert out[5, 8].tolist() == [0, 255, 0]
    rgba = decode_sample(data, Transform(size=(10, 10), color=Color.RGBA)).image.pixels
    assert rgba.shape == (10, 10, 4) and rgba[5, 1, 3] == 0 and rgba[5, 8, 3] == 255


def _gray_png_with_transparency() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(images.gradient(20, 10)[..., 0]).save(buf, "PNG", transparency=7)
    return buf.getvalue()


@pytest.mark.parametrize(("data", "channels"), [
    (images.encode(images.gradient(30, 20), "JPEG"), 3),
    (images.encode(images.gradient(30, 20)[..., 0], "JPEG"), 1),
    (images.cmyk_jpeg((255, 0, 0, 0)), 3),
    (images.encode(images.gradient(30, 20)[..., 0], "PNG"), 1),
    (_gray_png_with_transparency(), 2),
    (images.encode(np.dstack([images.gradient(30, 20)[..., 0]] * 2), "PNG"), 2),
    (images.encode(images.gradient(30, 20), "PNG"), 3),
    (images.encode(np.dstack([images.gradient(30, 20), np.full((20, 30), 9, np.uint8)]),
                   "PNG"), 4),
    (images.palette_png(transparent_left=False), 3),
    (images.palette_png(), 4),
    (images.png16(40000), 3),
    (images.encode(images.gradient(30, 20), "WEBP"), 3),
], ids=["jpeg", "gray-jpeg", "cmyk-jpeg", "gray-png", "gray-trns-png", "la-png", "rgb-png",
        "rgba-png", "palette-png", "palette-trns-png", "16-bit-png", "webp"])
def test_the_source_channels_and_size_are_reported(data: bytes, channels: int) -> None:
    out = decode_sample(data, Transform(size=(8, 8)))
    with Image.open(io.BytesIO(data)) as im:
        assert out.source_size == im.size
    assert out.source_channels == channels


@pytest.mark.parametrize(("mode", "color"), [("L", Color.RGB), ("RGB", Color.RGB),
                                            ("RGBA", Color.RGBA), ("RGBA", Color.RGB)])
def test_plain_pngs_decode_to_their_exact_pixels(mode: str, color: Color) -> None:
    # plain 8-bit PNGs go through OpenCV, the rest through libvips: both must give the file's
    # own pixels (the bucket here is the file's size, so nothing is resampled)
    rgb = images.gradient(40, 30, seed=4)
    a = {"L": rgb[..., :1], "RGB": rgb,
         "RGBA": np.dstack([rgb, np.arange(40, dtype=np.uint8)[None, :].repeat(30, 0) * 6])}[mode]
    data = images.encode(a, "PNG")
    out = decode_sample(data, Transform(size=(40, 30), color=color)).image.pixels
    with Image.open(io.BytesIO(data)) as im:
        expected = np.asarray(im.convert("RGBA" if color is Color.RGBA else "RGB"))
    if mode == "RGBA" and color is Color.RGB:  # flattened over white
        expected = np.rint(rgb * (a[..., 3:] / 255) + 255 * (1 - a[..., 3:] / 255))
        assert np.abs(out.astype(float) - expected).max() <= 1
    else:
        np.testing.assert_array_equal(out, expected)
    with pytest.raises(DecodeError) as e:
        decode_sample(data[:len(data) // 2], Transform(size=(40, 30), color=color))
    assert e.value.reason is Reason.TRUNCATED


def test_rgba_png_composited_unless_alpha_kept() -> None:
    a = np.zeros((20, 20, 4), np.uint8)
    a[..., 0] = 255
    a[:, 10:, 3] = 255  # right half opaque red, left half fully transparent
    data = images.encode(a, "PNG")
    white = decode_sample(data, Transform(size=(20, 20))).image.pixels
    assert white[10, 2].tolist() == [255, 255, 255] and white[10, 17].tolist() == [255, 0, 0]
    black = decode_sample(data, Transform(size=(20, 20), background=(0, 0, 0))).image.pixels
    assert black[10, 2].tolist() == [0, 0, 0]
    kept = decode_sample(data, Transform(size=(20, 20), color=Color.RGBA)).image.pixels
    assert kept[10, 2, 3] == 0 and kept[10, 17].tolist() == [255, 0, 0, 255]
    gray = decode_sample(data, Transform(size=(20, 20), color=Color.GRAY)).image.pixels
    assert gray.shape == (20, 20, 1) and gray[10, 2, 0] == 255


def test_rgba_output_of_a_jpeg_is_opaque() -> None:
    out = decode_sample(images.encode(images.gradient(64, 64)),
                        Transform(size=(32, 32), color=Color.RGBA)).image.pixels
    assert out.shape == (32, 32, 4) and (out[..., 3] == 255).all()


@pytest.mark.parametrize("data, reason", [
    (b"", Reason.CORRUPT),
    (os.urandom(4096), Reason.UNSUPPORTED_FORMAT),
    (b"just some text, not an image\n" * 20, Reason.UNSUPPORTED_FORMAT),
    (images.encode(images.gradient(400, 300))[:3000], Reason.TRUNCATED),
    (images.encode(images.gradient(400, 300))[:300], Reason.TRUNCATED),
    (images.encode(images.gradient(400, 300), "PNG")[:5000], Reason.TRUNCATED),
    (b"\xff\xd8\xff\xe0" + os.urandom(2000) + b"\xff\xd9", Reason.CORRUPT),
    (b"\x89PNG\r\n\x1a\n" + os.urandom(2000), Reason.CORRUPT),
    (images.huge_png_header(), Reason.TOO_LARGE),
    (images.huge_jpeg_header(), Reason.TOO_LARGE),
])
def test_bad_files_give_the_right_reason(data: bytes, reason: Reason) -> None:
    with pytest.raises(DecodeError) as info:
        decode_sample(data, BUCKETS)
    assert info.value.reason is reason, info.value
    assert info.value.image_index == -1
    assert len(info.value.message) > 20


def test_pixel_limit_is_configurable() -> None:
    data = images.encode(images.gradient(400, 300))
    with pytest.raises(DecodeError, match="limit") as info:
        decode_sample(data, BUCKETS, max_pixels=100_000)
    assert info.value.reason is Reason.TOO_LARGE
    lowered = Transform(buckets=BucketConfig(512, 16), max_pixels=1000)
    with pytest.raises(DecodeError):
        decode_sample(data, lowered)
    # a transform may not raise the decoder's limit
    raised = Transform(buckets=BucketConfig(512, 16), max_pixels=10**9)
    with pytest.raises(DecodeError):
        decode_sample(data, raised, max_pixels=1000)


def test_format_comes_from_the_bytes_not_a_name() -> None:
    png = images.encode(images.gradient(64, 48), "PNG")
    assert decode_sample(png, Transform(size=(32, 24))).format == "png"
    webp = images.encode(images.gradient(64, 48), "WEBP")
    assert decode_sample(webp, Transform(size=(32, 24))).format == "webp"


def labelled_scene(w: int, h: int, cell: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """An image of coloured cells and the label map of those cells."""
    rng = np.random.default_rng(7)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    y, x = np.mgrid[0:h, 0:w]
    labels = ((y // cell) * 13 + (x // cell) * 7) % 250 + 1
    return palette[labels], labels.astype(np.uint8), palette  # type: ignore[return-value]


@pytest.mark.parametrize("mask_scale", [1, 2])
@pytest.mark.parametrize("crop", [Crop.CENTER, Crop.RANDOM])
def test_companions_stay_pixel_aligned(mask_scale: int, crop: Crop) -> None:
    w, h = 1200, 800
    img, labels, palette = labelled_scene(w, h)  # type: ignore[misc]
    mask = labels[::mask_scale, ::mask_scale]
    t = Transform(buckets=BucketConfig(256, 16), crop=crop, seed=11,
                  resample=Resample.NEAREST)
    result = decode_sample(images.encode(img, "PNG"), t, companions=[images.encode(mask, "PNG")],
                           seed=3)
    out, m = result.image.pixels, result.companions[0].pixels
    assert m.shape == out.shape[:2] + (1,)
    # every mask label is the label of the cell whose colour the image shows there
    agree = (palette[m[..., 0]] == out).all(axis=-1).mean()
    assert agree > 0.97, agree
    assert set(np.unique(m)) <= set(np.unique(labels))  # nearest: no mixed labels


def test_companion_geometry_follows_the_main_jpeg_orientation() -> None:
    upright = images.quadrants(400, 240)
    mask = (np.arange(4, dtype=np.uint8)[[0, 1, 2, 3]])
    labels = np.zeros((240, 400), np.uint8)
    labels[:120, 200:], labels[120:, :200], labels[120:, 200:] = mask[1], mask[2], mask[3]
    result = decode_sample(images.oriented_jpeg(upright, 6), Transform(size=(100, 60)),
                           companions=[images.encode(labels, "PNG")])
    m = result.companions[0].pixels[..., 0]
    assert m[10, 10] == 0 and m[10, 90] == 1 and m[50, 10] == 2 and m[50, 90] == 3


def test_companion_with_another_shape_is_refused() -> None:
    with pytest.raises(DecodeError) as info:
        decode_sample(images.encode(images.gradient(400, 300)), BUCKETS,
                      companions=[images.encode(images.gradient(300, 300), "PNG")])
    assert info.value.reason is Reason.COMPANION_MISMATCH and info.value.image_index == 0
    with pytest.raises(DecodeError) as info:
        decode_sample(images.encode(images.gradient(400, 300)), BUCKETS,
                      companions=[images.encode(images.gradient(400, 300), "PNG"), b"junk"])
    assert info.value.image_index == 1 and info.value.message.startswith("companion 1")


def test_palette_mask_keeps_its_indices() -> None:
    out = decode_sample(images.encode(images.gradient(10, 10), "PNG"), Transform(size=(10, 10)),
                        companions=[images.palette_png(transparent_left=False)])
    m = out.companions[0].pixels
    assert m.shape == (10, 10, 1) and m[5, 1, 0] == 0 and m[5, 8, 0] == 1
    rgb = decode_sample(images.encode(images.gradient(10, 10), "PNG"), Transform(
        size=(10, 10), companions=CompanionTransform(color=Color.RGB)),
        companions=[images.palette_png(transparent_left=False)])
    assert rgb.companions[0].pixels[5, 8].tolist() == [0, 255, 0]


def test_random_crop_is_seeded() -> None:
    data = images.encode(images.gradient(1200, 400, seed=2), "PNG")
    t = Transform(size=(200, 200), crop=Crop.RANDOM, seed=1)

    def run(s: int) -> np.ndarray:
        return decode_sample(data, t, seed=s).image.pixels

    assert np.array_equal(run(5), run(5))
    assert len({run(s).tobytes() for s in range(6)}) > 3


@pytest.mark.parametrize("resample", list(Resample))
def test_every_filter_gives_the_target_size(resample: Resample) -> None:
    data = images.encode(images.gradient(1000, 700, seed=4), "JPEG")
    out = decode_sample(data, Transform(size=(321, 123), resample=resample)).image.pixels
    assert out.shape == (123, 321, 3)
    ref = pil_reference(data, (321, 123))
    assert mean_abs_diff(out, ref) < 6.0


def test_pre_encoding() -> None:
    data = images.encode(images.gradient(800, 600, seed=5))
    raw = decode_sample(data, BUCKETS).image
    png = decode_sample(data, Transform(buckets=BucketConfig(512, 16), encoding=Encoding.PNG))
    assert png.image.data is not None and png.image.encoding is Encoding.PNG
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.image.data))), raw.pixels)
    jpg = decode_sample(data, Transform(buckets=BucketConfig(512, 16), encoding=Encoding.JPEG,
                                        quality=85), companions=[data])
    assert jpg.image.data is not None and jpg.image.data[:3] == b"\xff\xd8\xff"
    assert len(jpg.image.data) < raw.pixels.nbytes / 5
    back = np.asarray(Image.open(io.BytesIO(jpg.image.data)))
    assert mean_abs_diff(back, raw.pixels) < 4.0
    # companions are re-encoded losslessly
    assert jpg.companions[0].encoding is Encoding.PNG


def test_decoder_pool_keeps_order_and_returns_errors() -> None:
    good = [images.encode(images.gradient(300 + 10 * i, 200)) for i in range(12)]
    inputs = [SampleInput(d, id=str(i)) for i, d in enumerate(good)]
    inputs.insert(5, SampleInput(b"broken", id="bad"))
    with Decoder(workers=2) as decoder:
        results = decoder.decode_batch(inputs, BUCKETS)
        streamed = list(decoder.map(iter(inputs), BUCKETS, max_inflight=3))
    assert isinstance(results[5], DecodeError)
    assert [r.source_size for r in results if not isinstance(r, DecodeError)] == [
        (300 + 10 * i, 200) for i in range(12)]
    assert [type(r) for r in streamed] == [type(r) for r in results]


def test_invalid_transforms_are_refused() -> None:
    from gristmill.client.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="exactly one"):
        Transform()
    with pytest.raises(InvalidArgument, match="image_size"):
        Transform(buckets=BucketConfig(4, 16))
    with pytest.raises(InvalidArgument, match="16384"):
        Transform(size=(0, 100))
    with pytest.raises(InvalidArgument, match="alpha"):
        Transform(size=(10, 10), color=Color.RGBA, encoding=Encoding.JPEG)
    with pytest.raises(InvalidArgument, match="quality"):
        Transform(size=(10, 10), quality=0)
