"""shared/media/image.py: resize-image on images generated here."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, JpegImagePlugin

from shared.errors import Cancelled, is_retryable
from shared.media import image
from shared.media.image import plan_resize


def make(path: Path, size: tuple[int, int], fmt: str, mode: str = "RGB", color: Any = (200, 30, 30), **save: Any) -> Path:
    Image.new(mode, size, color).save(path, format=fmt, **save)
    return path


def halves(size: tuple[int, int], left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


def close(a: Any, b: Any, tol: int = 40) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=False))


# --- geometry (pure) -------------------------------------------------------------------
@pytest.mark.parametrize(("src", "w", "h", "fit", "resize", "canvas"), [
    ((400, 200), 200, None, "contain", (200, 100), (200, 100)),
    ((400, 200), None, 50, "cover", (100, 50), (100, 50)),
    ((400, 200), 200, 200, "contain", (200, 100), (200, 200)),
    ((400, 200), 200, 200, "inside", (200, 100), (200, 100)),
    ((400, 200), 200, 200, "fill", (200, 200), (200, 200)),
    ((400, 200), 200, 200, "cover", (200, 200), (200, 200)),
    ((100, 100), 400, 300, "inside", (300, 300), (300, 300)),  # enlarging is allowed
    ((3, 1000), 1, None, "contain", (1, 333), (1, 333)),
    ((1000, 3), 10, None, "contain", (10, 1), (10, 1)),  # never zero pixels
])
def test_plan(src, w, h, fit, resize, canvas) -> None:  # type: ignore[no-untyped-def]
    plan = plan_resize(src, w, h, fit)
    assert (plan.resize, plan.canvas) == (resize, canvas)


def test_cover_crops_the_centre() -> None:
    assert plan_resize((400, 200), 100, 100, "cover").box == (100.0, 0.0, 300.0, 200.0)
    assert plan_resize((200, 400), 100, 100, "cover").box == (0.0, 100.0, 200.0, 300.0)


# --- formats and fits ------------------------------------------------------------------
def test_large_jpeg_is_drafted_and_resized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "big.jpg"
    halves((4000, 3000), (250, 0, 0), (0, 0, 250)).save(src, quality=90)
    decoded: list[tuple[int, int]] = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):  # type: ignore[no-untyped-def]
        result = real(self, mode, size)
        decoded.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    info = image.resize_image(src, tmp_path / "out", width=400)
    assert (info["width"], info["height"], info["format"], info["content_type"], info["ext"]) == (400, 300, "jpeg", "image/jpeg", "jpg")
    assert decoded == [(500, 375)]  # decoded at 1/8 scale, never at 4000x3000
    with Image.open(tmp_path / "out") as out:
        assert (out.format, out.size) == ("JPEG", (400, 300))
        assert close(out.getpixel((50, 150)), (250, 0, 0)) and close(out.getpixel((350, 150)), (0, 0, 250))
    assert info["size"] == (tmp_path / "out").stat().st_size


def test_cover_after_draft_keeps_the_centre(tmp_path: Path) -> None:
    src = tmp_path / "wide.jpg"
    img = Image.new("RGB", (4000, 1000), (0, 200, 0))
    img.paste((250, 0, 0), (0, 0, 1000, 1000))  # red left quarter is cropped away by cover
    img.save(src)
    info = image.resize_image(src, tmp_path / "o", width=100, height=100, fit="cover", format="png")
    with Image.open(tmp_path / "o") as out:
        assert out.size == (100, 100) and info["format"] == "png"
        assert all(close(out.getpixel((x, 50)), (0, 200, 0)) for x in (0, 50, 99))


def test_contain_pads_transparent_for_png_and_white_for_jpeg(tmp_path: Path) -> None:
    src = make(tmp_path / "s.png", (400, 200), "PNG", color=(10, 20, 200))
    image.resize_image(src, tmp_path / "p", width=200, height=200, fit="contain")
    with Image.open(tmp_path / "p") as out:
        assert out.format == "PNG" and out.size == (200, 200) and out.mode == "RGBA"
        assert out.getpixel((100, 5))[3] == 0 and close(out.getpixel((100, 100)), (10, 20, 200, 255))
    image.resize_image(src, tmp_path / "j", width=200, height=200, fit="contain", format="jpeg")
    with Image.open(tmp_path / "j") as out:
        assert out.format == "JPEG" and out.size == (200, 200)
        assert close(out.getpixel((100, 5)), (255, 255, 255)) and close(out.getpixel((100, 100)), (10, 20, 200))


@pytest.mark.parametrize(("fit", "size"), [("fill", (120, 90)), ("inside", (120, 60)), ("cover", (120, 90)),
                                           ("contain", (120, 90))])
def test_fit_modes_output_size(tmp_path: Path, fit: str, size: tuple[int, int]) -> None:
    src = make(tmp_path / "s.webp", (400, 200), "WEBP")
    info = image.resize_image(src, tmp_path / "o", width=120, height=90, fit=fit)
    with Image.open(tmp_path / "o") as out:
        assert out.format == "WEBP" and out.size == size == (info["width"], info["height"])


@pytest.mark.parametrize(("src_fmt", "mode", "want", "pil"), [
    ("PNG", "RGBA", "jpeg", "JPEG"), ("PNG", "P", "webp", "WEBP"), ("WEBP", "RGB", "png", "PNG"),
    ("JPEG", "CMYK", "webp", "WEBP"), ("JPEG", "L", "png", "PNG"), ("BMP", "RGB", None, "PNG"),
    ("TIFF", "RGB", None, "PNG"), ("PNG", "I;16", None, "PNG"), ("PNG", "LA", "webp", "WEBP"),
])
def test_format_conversions(tmp_path: Path, src_fmt: str, mode: str, want: str | None, pil: str) -> None:
    color: Any = {"RGBA": (1, 2, 3, 100), "P": 3, "CMYK": (0, 100, 100, 0), "L": 128, "I;16": 30000, "LA": (90, 200)}.get(mode, (9, 99, 199))
    src = make(tmp_path / "s", (64, 48), src_fmt, mode=mode, color=color)
    info = image.resize_image(src, tmp_path / "o", width=32, format=want)
    with Image.open(tmp_path / "o") as out:
        assert out.format == pil and out.size == (32, 24)
    assert info["content_type"] == f"image/{pil.lower()}"


def test_quality_changes_the_size(tmp_path: Path) -> None:
    src = tmp_path / "noise.png"
    Image.effect_noise((300, 300), 80).convert("RGB").save(src)
    low = image.resize_image(src, tmp_path / "lo", width=200, format="jpeg", quality=10)["size"]
    high = image.resize_image(src, tmp_path / "hi", width=200, format="jpeg", quality=95)["size"]
    assert low < high


def test_exif_orientation_is_applied_and_dropped(tmp_path: Path) -> None:
    src = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotates 90 degrees clockwise
    halves((300, 100), (250, 0, 0), (0, 0, 250)).save(src, exif=exif, quality=95)
    info = image.resize_image(src, tmp_path / "o", width=50)
    with Image.open(tmp_path / "o") as out:
        assert out.size == (50, 150) == (info["width"], info["height"])
        assert close(out.getpixel((25, 20)), (250, 0, 0)) and close(out.getpixel((25, 130)), (0, 0, 250))
        assert out.getexif().get(0x0112) is None


def test_icc_profile_is_kept(tmp_path: Path) -> None:
    from PIL import ImageCms
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = make(tmp_path / "s.jpg", (100, 100), "JPEG", icc_profile=icc)
    image.resize_image(src, tmp_path / "o", width=10, format="webp")
    with Image.open(tmp_path / "o") as out:
        assert out.info.get("icc_profile") == icc


# --- animations ------------------------------------------------------------------------
def animated(path: Path, fmt: str, colors: list[tuple[int, int, int]], size: tuple[int, int] = (100, 80)) -> Path:
    frames = [Image.new("RGB", size, c) for c in colors]
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=[70, 80, 90][: len(colors)], loop=0)
    return path


COLORS = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]


@pytest.mark.parametrize(("src_fmt", "want", "pil"), [("GIF", None, "GIF"), ("GIF", "webp", "WEBP"),
                                                      ("WEBP", None, "WEBP"), ("GIF", "png", "PNG")])
def test_animation_keeps_every_frame(tmp_path: Path, src_fmt: str, want: str | None, pil: str) -> None:
    src = animated(tmp_path / "a", src_fmt, COLORS)
    info = image.resize_image(src, tmp_path / "o", width=50, format=want)
    assert info["frames"] == 3
    with Image.open(tmp_path / "o") as out:
        assert out.format == pil and out.size == (50, 40) and out.n_frames == 3
        for i, color in enumerate(COLORS):
            out.seek(i)
            assert close(out.convert("RGB").getpixel((25, 20)), color)


def test_animation_to_jpeg_takes_the_first_frame(tmp_path: Path) -> None:
    info = image.resize_image(animated(tmp_path / "a.gif", "GIF", COLORS), tmp_path / "o", width=50, format="jpeg")
    assert info["frames"] == 1
    with Image.open(tmp_path / "o") as out:
        assert out.format == "JPEG" and close(out.getpixel((25, 20)), COLORS[0])


def test_animation_with_too_many_pixels_in_all_is_refused(tmp_path: Path) -> None:
    src = animated(tmp_path / "a.gif", "GIF", COLORS, size=(100, 100))
    with pytest.raises(image.ImageTooLarge, match="frames"):
        image.resize_image(src, tmp_path / "o", width=50, max_pixels=25_000)


# --- hostile and broken input ----------------------------------------------------------
def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width``x``height`` but carries almost no data: a bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_header_is_refused(tmp_path: Path) -> None:
    with pytest.raises(image.ImageTooLarge) as err:
        image.resize_image(png_header_only(tmp_path / "bomb.png", 50_000, 50_000), tmp_path / "o", width=10)
    assert not is_retryable(err.value) and err.value.code == "image_too_large"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("size", [(120, 100), (300, 300)])  # between 1x and 2x the cap (Pillow only warns), and past 2x
def test_pixel_cap_applies_below_pillows_error_threshold(tmp_path: Path, size: tuple[int, int]) -> None:
    src = make(tmp_path / "s.png", size, "PNG")
    with pytest.raises(image.ImageTooLarge):
        image.resize_image(src, tmp_path / "o", width=10, max_pixels=10_000)


def test_output_over_the_pixel_cap_is_refused(tmp_path: Path) -> None:
    src = make(tmp_path / "s.png", (10, 10), "PNG")
    with pytest.raises(image.ImageTooLarge, match="output"):
        image.resize_image(src, tmp_path / "o", width=10000, height=10000, fit="fill", max_pixels=1_000_000)


@pytest.mark.parametrize(("content", "error"), [
    (b"just some text, not a picture", image.UnsupportedImage),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", image.UnsupportedImage),
    (b"", image.UnsupportedImage),
])
def test_not_an_image(tmp_path: Path, content: bytes, error: type[Exception]) -> None:
    (tmp_path / "s").write_bytes(content)
    with pytest.raises(error):
        image.resize_image(tmp_path / "s", tmp_path / "o", width=10)


def test_truncated_jpeg_is_corrupt(tmp_path: Path) -> None:
    src = tmp_path / "s.jpg"
    Image.effect_noise((400, 400), 60).convert("RGB").save(src)
    src.write_bytes(src.read_bytes()[:3000])
    with pytest.raises(image.CorruptImage) as err:
        image.resize_image(src, tmp_path / "o", width=100)
    assert not is_retryable(err.value)


@pytest.mark.parametrize("opts", [dict(), dict(width=0), dict(width=10001), dict(width=10, fit="stretch"),
                                  dict(width=10, format="gif"), dict(width=10, quality=0), dict(width=True)])
def test_bad_options(tmp_path: Path, opts: dict[str, Any]) -> None:
    src = make(tmp_path / "s.png", (10, 10), "PNG")
    with pytest.raises(image.BadImageOptions):
        image.resize_image(src, tmp_path / "o", **opts)


def test_cancel_and_progress(tmp_path: Path) -> None:
    src = make(tmp_path / "s.png", (10, 10), "PNG")
    with pytest.raises(Cancelled):
        image.resize_image(src, tmp_path / "o", width=5, should_cancel=lambda: True)
    seen: list[int] = []
    image.resize_image(animated(tmp_path / "a.gif", "GIF", COLORS), tmp_path / "o", width=5, on_progress=seen.append)
    assert seen == sorted(seen) and seen and all(0 <= p < 100 for p in seen)


def test_payload_keys_pass_straight_through(tmp_path: Path) -> None:
    src = make(tmp_path / "s.png", (40, 20), "PNG")
    payload = {"source": {"upload_id": "x"}, "width": 20, "fit": "contain", "quality": 85}
    assert image.resize_image(src, tmp_path / "o", **payload)["width"] == 20
