"""resize-image core (Pillow).

API::

    info = resize_image(src_path, dest_path, width=800, height=None, fit="contain",
                        format=None, quality=85, max_pixels=settings.max_image_pixels,
                        on_progress=..., should_cancel=...)
    info == {"width", "height", "format", "content_type", "ext", "size", "frames",
             "source_width", "source_height", "source_format"}

``width``/``height`` are pixels (at least one). With only one, the other follows the
aspect ratio. With both, ``fit`` decides (the names and meanings of sharp):
``contain`` fits inside the box and pads to exactly the box (transparent where the
format has alpha, white for JPEG); ``cover`` fills the box and crops the centre;
``fill`` stretches to the box; ``inside`` fits inside the box without padding.
``format`` is ``jpeg``/``png``/``webp``; by default the input's (GIF stays GIF so an
animation survives; BMP and TIFF become PNG). ``quality`` (1..100) drives JPEG/WebP.

What it does beyond resizing: EXIF orientation is applied and metadata dropped (the ICC
profile is kept); large JPEGs are decoded at a reduced scale with ``draft()``; animated
GIF/WebP/PNG frames are all resized (a JPEG output takes the first frame).
``dest_path`` is written whatever its name: store it under ``info["ext"]``.

Failures: ``UnsupportedImage`` (not an image, or a format outside JPEG/PNG/WebP/GIF/BMP/
TIFF), ``CorruptImage`` (truncated, undecodable), ``ImageTooLarge`` (over ``max_pixels``
— Pillow's decompression-bomb guard — or an output over it), ``BadImageOptions`` — all
permanent; ``RetryableError`` when the output cannot be written; ``Cancelled``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from shared.errors import Cancelled, PermanentError, RetryableError
from shared.media import CancelFn, ProgressFn, never_cancel, no_progress


class UnsupportedImage(PermanentError):
    code = "unsupported_image"


class CorruptImage(PermanentError):
    code = "corrupt_image"


class ImageTooLarge(PermanentError):
    code = "image_too_large"


class BadImageOptions(PermanentError):
    code = "bad_options"


# Only these decoders are ever tried: Pillow has plugins (EPS through Ghostscript, ...)
# that have no business parsing untrusted uploads.
INPUT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# output name -> (Pillow format, content type, extension)
OUTPUTS = {
    "jpeg": ("JPEG", "image/jpeg", "jpg"),
    "png": ("PNG", "image/png", "png"),
    "webp": ("WEBP", "image/webp", "webp"),
    "gif": ("GIF", "image/gif", "gif"),
}
_DEFAULT_OUTPUT = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif",
                   "BMP": "png", "TIFF": "png"}
FITS = ("contain", "cover", "fill", "inside")
MAX_FRAMES = 2000
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Plan:
    """How to turn a ``src``-sized image into the output: resize (optionally from a crop box), then pad."""

    resize: tuple[int, int]
    canvas: tuple[int, int]
    box: tuple[float, float, float, float] | None = None  # source crop box (cover)


def plan_resize(src: tuple[int, int], width: int | None, height: int | None, fit: str) -> Plan:
    """The geometry of a resize, pure. Sizes in pixels, ``(width, height)``."""
    sw, sh = src
    if width is None and height is None:
        raise BadImageOptions("give at least one of width or height")
    if width is None or height is None:
        scale = (width / sw) if width is not None else (height / sh)  # type: ignore[operator]
        size = (width or max(1, round(sw * scale)), height or max(1, round(sh * scale)))
        return Plan(resize=size, canvas=size)
    if fit == "fill":
        return Plan(resize=(width, height), canvas=(width, height))
    if fit == "cover":
        if sw * height > sh * width:  # source is wider than the box: crop its sides
            cw = sh * width / height
            box = ((sw - cw) / 2, 0.0, (sw + cw) / 2, float(sh))
        else:
            ch = sw * height / width
            box = (0.0, (sh - ch) / 2, float(sw), (sh + ch) / 2)
        return Plan(resize=(width, height), canvas=(width, height), box=box)
    if fit in ("contain", "inside"):
        scale = min(width / sw, height / sh)
        size = (min(width, max(1, round(sw * scale))), min(height, max(1, round(sh * scale))))
        return Plan(resize=size, canvas=(width, height) if fit == "contain" else size)
    raise BadImageOptions(f"fit must be one of {', '.join(FITS)}")


def _draft_request(plan: Plan, src: tuple[int, int]) -> tuple[int, int]:
    """The smallest decode size (in oriented pixels) that still loses nothing for ``plan``."""
    if plan.box is None:
        return plan.resize
    bw, bh = plan.box[2] - plan.box[0], plan.box[3] - plan.box[1]
    # the crop box shrinks with the decode scale; keep it at least the output size
    scale = max(plan.resize[0] / bw, plan.resize[1] / bh)
    return (math.ceil(src[0] * scale), math.ceil(src[1] * scale))


def _open(src_path: str | os.PathLike[str], max_pixels: int) -> Image.Image:
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's decompression-bomb guard (warns past it, raises at 2x)
    try:
        img = Image.open(src_path, formats=INPUT_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"the image has more pixels than the limit of {max_pixels}: {exc}") from None
    except UnidentifiedImageError:
        raise UnsupportedImage(f"not an image in a supported format ({', '.join(INPUT_FORMATS)})") from None
    except FileNotFoundError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow raises SyntaxError for some bad headers
        raise CorruptImage(f"cannot read the image: {exc}") from None
    w, h = img.size
    frames = getattr(img, "n_frames", 1)
    if w < 1 or h < 1:
        raise CorruptImage("the image has no pixels")
    if w * h > max_pixels:  # also between 1x and 2x, where Pillow only warns
        raise ImageTooLarge(f"the image is {w}x{h} pixels; the limit is {max_pixels}")
    if frames > MAX_FRAMES or w * h * frames > max_pixels:
        raise ImageTooLarge(f"the animation has {frames} frames of {w}x{h}; over the limit of {max_pixels} pixels in all")
    return img


def _working_mode(img: Image.Image) -> Image.Image:
    """A mode that resamples well: palettes and odd depths become RGB(A)."""
    if img.mode in ("L", "LA", "RGB", "RGBA", "CMYK"):
        return img
    has_alpha = "A" in img.getbands() or "transparency" in img.info
    return img.convert("RGBA" if has_alpha else "RGB")


def _for_output(img: Image.Image, fmt: str) -> Image.Image:
    """Convert to a mode the output format stores; JPEG flattens alpha onto white."""
    if fmt == "jpeg":
        if img.mode in ("RGBA", "LA"):
            rgba = img.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            return flat
        return img if img.mode in ("RGB", "L", "CMYK") else img.convert("RGB")
    if img.mode == "CMYK" or (fmt == "webp" and img.mode == "L"):
        return img.convert("RGB")
    if fmt == "webp" and img.mode == "LA":
        return img.convert("RGBA")
    return img


def _apply(img: Image.Image, plan: Plan, fmt: str) -> Image.Image:
    """Resize one frame per ``plan`` and pad it onto the canvas when the plan says so."""
    img = _working_mode(img)
    out = img.resize(plan.resize, Image.Resampling.LANCZOS, box=plan.box, reducing_gap=3.0)
    if plan.canvas == plan.resize:
        return out
    fill: int | tuple[int, ...]
    if fmt == "jpeg":  # no alpha: pad with white
        mode, fill = ("L", 255) if out.mode == "L" else ("RGB", (255, 255, 255))
        out = _for_output(out, fmt)
    else:
        mode, fill = "RGBA", (0, 0, 0, 0)
    canvas = Image.new(mode, plan.canvas, fill)
    offset = ((plan.canvas[0] - plan.resize[0]) // 2, (plan.canvas[1] - plan.resize[1]) // 2)
    canvas.paste(out.convert(mode), offset)
    return canvas


def resize_image(src_path: str | os.PathLike[str], dest_path: str | os.PathLike[str], *,
                 width: int | None = None, height: int | None = None, fit: str = "contain",
                 format: str | None = None, quality: int = 85, max_pixels: int = 100_000_000,
                 on_progress: ProgressFn = no_progress, should_cancel: CancelFn = never_cancel,
                 **_ignored: Any) -> dict[str, Any]:
    """Resize ``src_path`` into ``dest_path``; see the module docstring. ``**_ignored`` takes ``source``."""
    for name, value in (("width", width), ("height", height)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 10000):
            raise BadImageOptions(f"{name} must be an integer from 1 to 10000")
    if fit not in FITS:
        raise BadImageOptions(f"fit must be one of {', '.join(FITS)}")
    if format is not None and format not in ("jpeg", "png", "webp"):
        raise BadImageOptions("format must be jpeg, png or webp")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise BadImageOptions("quality must be an integer from 1 to 100")
    if should_cancel():
        raise Cancelled("cancelled before the image was read")

    with _open(src_path, max_pixels) as img:
        source = {"source_width": img.width, "source_height": img.height, "source_format": img.format}
        fmt = format or _DEFAULT_OUTPUT.get(img.format or "", "png")
        animated = getattr(img, "n_frames", 1) > 1
        oriented = img.size
        if not animated:
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            if orientation in _SWAPS_AXES:
                oriented = (img.height, img.width)
        plan = plan_resize(oriented, width, height, fit)
        if plan.canvas[0] * plan.canvas[1] > max_pixels:
            raise ImageTooLarge(f"the output would be {plan.canvas[0]}x{plan.canvas[1]}; the limit is {max_pixels} pixels")
        on_progress(5)
        try:
            if animated and fmt != "jpeg":
                frames, durations = _resize_frames(img, oriented, width, height, fit, fmt, on_progress, should_cancel)
            else:
                frames, durations = [_resize_still(img, plan, oriented, width, height, fit, fmt)], []
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise CorruptImage(f"cannot decode the image: {exc}") from None
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(str(exc)) from None
        icc = img.info.get("icc_profile")
        loop = img.info.get("loop", 0)
    if should_cancel():
        raise Cancelled("cancelled before the image was written")
    on_progress(80)
    _save(frames, durations, loop, dest_path, fmt, quality, icc)
    pil_format, content_type, ext = OUTPUTS[fmt]
    return {"width": frames[0].width, "height": frames[0].height, "format": fmt, "content_type": content_type,
            "ext": ext, "size": os.path.getsize(dest_path), "frames": len(frames), **source}


def _resize_still(img: Image.Image, plan: Plan, oriented: tuple[int, int], width: int | None,
                  height: int | None, fit: str, fmt: str) -> Image.Image:
    if img.format in ("JPEG", "MPO"):
        want = _draft_request(plan, oriented)
        if oriented != img.size:  # draft works in stored (unrotated) pixels
            want = (want[1], want[0])
        img.draft(img.mode, want)  # decode at 1/2, 1/4 or 1/8 scale when that still covers ``want``
    img.load()
    upright = ImageOps.exif_transpose(img)
    if upright.size != oriented:  # draft shrank it: plan again on the decoded size (crop box moves)
        plan = plan_resize(upright.size, width, height, fit)
    return _for_output(_apply(upright, plan, fmt), fmt)


def _resize_frames(img: Image.Image, size: tuple[int, int], width: int | None, height: int | None, fit: str,
                   fmt: str, on_progress: ProgressFn, should_cancel: CancelFn) -> tuple[list[Image.Image], list[int]]:
    """Every frame of an animation, resized; and each frame's duration in milliseconds."""
    total = getattr(img, "n_frames", 1)
    frames: list[Image.Image] = []
    durations: list[int] = []
    for i, frame in enumerate(ImageSequence.Iterator(img)):
        if i % 10 == 0 and should_cancel():
            raise Cancelled("cancelled while resizing the frames")
        # Pillow hands GIF/WebP frames already composited; resize each as RGBA so
        # transparency and disposal stay right.
        rgba = frame.convert("RGBA")
        frames.append(_apply(rgba, plan_resize(rgba.size, width, height, fit), fmt))
        durations.append(int(frame.info.get("duration", 100)) or 100)
        on_progress(5 + 70 * (i + 1) // total)
    return frames, durations


def _save(frames: list[Image.Image], durations: list[int], loop: int, dest_path: str | os.PathLike[str],
          fmt: str, quality: int, icc: bytes | None) -> None:
    pil_format = OUTPUTS[fmt][0]
    opts: dict[str, Any] = {}
    if icc and fmt != "gif":
        opts["icc_profile"] = icc
    if fmt in ("jpeg", "webp"):
        opts["quality"] = quality
    if len(frames) > 1:
        opts.update(save_all=True, append_images=frames[1:], duration=durations, loop=loop)
        if fmt == "gif":
            opts["disposal"] = 2  # frames are whole pictures: clear before drawing the next
    try:
        with open(dest_path, "wb") as out:
            frames[0].save(out, format=pil_format, **opts)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError | PermissionError) or exc.errno is not None:
            raise RetryableError(f"cannot write the resized image: {exc}") from None
        raise CorruptImage(f"cannot encode the image as {fmt}: {exc}") from None
