"""Media core figures (issue 4): the time our cores take next to the bare library or tool
doing the same work, measured in the same run, alternating rounds.

* ``resize_overhead``: ``shared.media.image.resize_image`` on a generated 4000x3000 JPEG
  (to 400 px wide, JPEG q85) vs a plain Pillow script doing the same work the same way
  (open, ``draft()``, apply EXIF orientation, LANCZOS resize, save): the like-for-like
  cost of our checks (format sniffing, pixel caps, output probe). ``plain_without_draft_ms``
  is the naive script that decodes every pixel, for orientation.
* ``compress_overhead``: ``shared.media.video.compress_video`` (duration and size caps read
  from the run's own stderr, progress parsing, output description) on a generated 10 s
  1280x720 clip with sound, H.264 CRF 28 preset fast, vs running the *same* ffmpeg command
  line directly.
* ``pdf_overhead``: ``shared.media.pdf.render_pdf`` with wkhtmltopdf (egress proxy,
  pdfkit command, output checks) vs calling wkhtmltopdf directly on the same HTML file
  with the same page options and JavaScript delay.
* ``pdf_chromium_overhead``: the same with ``engine="chromium"`` (the worker's warm browser,
  a fresh context per render, over the DevTools pipe) vs ``chromium --headless
  --print-to-pdf`` on the file, a new browser each time as a one-off command is. The warm
  browser is started before the timed rounds, as a worker's first render would. Chromium's
  own background traffic is sent to a dead loopback port in both, so nothing leaves the
  machine.

Values and baselines are medians in milliseconds per item. Inputs are generated here.
"""
from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageOps

from bench.harness import BenchContext, Figure, alternate, median
from shared.media import chromium as chromium_core
from shared.media import image, pdf, video

PAGE_HTML = ("<!doctype html><html><head><meta charset='utf-8'><style>body{font-family:sans-serif}"
             "td{border:1px solid #999;padding:2px}</style></head><body><h1>TaskForge invoice</h1>"
             + "<table>" + "".join(f"<tr><td>item {i}</td><td>{i * 3.5:.2f}</td></tr>" for i in range(60))
             + "</table><script>document.body.appendChild(document.createTextNode('rendered'))</script>"
             "</body></html>")
JS_DELAY_MS = 200  # wkhtmltopdf's own default, used on both sides


def _cpu_ms() -> float:
    """CPU time of this process and its waited-for children, in ms."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime) * 1000


def _ms_cpu(fn: Callable[[], object]) -> Callable[[], tuple[float, float]]:
    """``fn`` timed: (wall ms, CPU ms of this process and the tools it ran). CPU time holds
    still on a loaded machine where wall time does not; it misses a process that outlives
    the call (the warm Chromium), so it is reported only where every tool exits."""
    def timed() -> tuple[float, float]:
        cpu, start = _cpu_ms(), time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1000, _cpu_ms() - cpu
    return timed


def _ms(fn: Callable[[], object]) -> Callable[[], float]:
    def timed() -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1000
    return timed


# --- resize ------------------------------------------------------------------------------
def _photo(path: Path) -> Path:
    """A 4000x3000 JPEG with detail in every channel (noise, gradient, fractal)."""
    size = (4000, 3000)
    bands = [Image.effect_noise(size, 60), Image.linear_gradient("L").resize(size),
             Image.effect_mandelbrot(size, (-2.0, -1.2, 1.0, 1.2), 60)]
    Image.merge("RGB", bands).save(path, quality=90)
    return path


def _plain_resize(src: Path, dest: Path, draft: bool) -> None:
    with Image.open(src) as im:
        if draft:
            im.draft("RGB", (400, 300))
        upright = ImageOps.exif_transpose(im)
        upright.resize((400, 300), Image.Resampling.LANCZOS).save(dest, format="JPEG", quality=85)


def resize_overhead(ctx: BenchContext) -> Figure:
    rounds = 20 if ctx.full else 6
    with tempfile.TemporaryDirectory(prefix="bench-media-") as tmp:
        src = _photo(Path(tmp) / "photo.jpg")
        ours = _ms(lambda: image.resize_image(src, Path(tmp) / "a", width=400, format="jpeg", quality=85))
        plain = _ms(lambda: _plain_resize(src, Path(tmp) / "b.jpg", draft=False))
        plain_draft = _ms(lambda: _plain_resize(src, Path(tmp) / "c.jpg", draft=True))
        ours(), plain()  # warm the page cache and Pillow's plugins
        v, b, d = alternate(ours, plain_draft, rounds, plain)
    return Figure("resize_overhead", median(v), "ms", "plain Pillow script doing the same work (with draft())",
                  median(b), {"plain_without_draft_ms": median(d), "rounds": rounds})


# --- compress ----------------------------------------------------------------------------
def _clip(path: Path, seconds: int) -> Path:
    subprocess.run([video.ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate=30:duration={seconds}",
                    "-f", "lavfi", "-i", f"sine=frequency=330:duration={seconds}",
                    "-c:v", "libx264", "-preset", "ultrafast", "-crf", "12", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", "-b:a", "192k", str(path)], check=True, timeout=300)
    return path


def compress_overhead(ctx: BenchContext) -> Figure:
    rounds = 5 if ctx.full else 2
    with tempfile.TemporaryDirectory(prefix="bench-media-") as tmp:
        src = _clip(Path(tmp) / "clip.mp4", 10)
        exe = video.ffmpeg_exe()
        job = video.make_job(codec="h264", crf=28, preset="fast")
        cmd, _ = video.build_command(exe, src, Path(tmp) / "direct.mp4", job, 600.0, video.encoders(exe))
        ours = _ms_cpu(lambda: video.compress_video(src, Path(tmp) / "ours.mp4", codec="h264", crf=28,
                                                    preset="fast"))
        direct = _ms_cpu(lambda: subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                check=True))
        v, b = alternate(ours, direct, rounds)
        size = (Path(tmp) / "ours.mp4").stat().st_size
        src_size = src.stat().st_size
    return Figure("compress_overhead", median([w for w, _ in v]), "ms", "the same ffmpeg command run directly",
                  median([w for w, _ in b]), {"clip_s": 10, "output_to_input_size": round(size / src_size, 3),
                                              "rounds": rounds, **_cpu_extra(v, b)})


def _cpu_extra(v: list[tuple[float, float]], b: list[tuple[float, float]]) -> dict[str, float]:
    ours, base = median([c for _, c in v]), median([c for _, c in b])
    return {"cpu_ms": round(ours, 1), "baseline_cpu_ms": round(base, 1), "cpu_ratio": round(ours / base, 3)}


# --- pdf ---------------------------------------------------------------------------------
def _direct_wkhtmltopdf(src: Path, dest: Path) -> None:
    subprocess.run(["wkhtmltopdf", "--quiet", "--page-size", "A4", "--orientation", "Portrait",
                    "--margin-top", "10mm", "--margin-right", "10mm", "--margin-bottom", "10mm",
                    "--margin-left", "10mm", "--javascript-delay", str(JS_DELAY_MS), str(src), str(dest)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


def _direct_chromium(src: Path, dest: Path, hole_port: int) -> None:
    """One ``chromium --print-to-pdf``, sandboxed and started as ours is (as ``nobody`` when we are root)."""
    with tempfile.TemporaryDirectory(prefix="bench-chromium-") as profile:
        args = chromium_core.chromium_args(shutil.which("chromium") or "chromium", f"http://127.0.0.1:{hole_port}",
                                           profile)
        args = [a for a in args if a not in ("--remote-debugging-pipe", "about:blank")]
        out = Path(profile) / "direct.pdf"  # written by Chromium's user
        argv, owner = chromium_core.launch([*args, "--no-pdf-header-footer", f"--print-to-pdf={out}",
                                            f"--virtual-time-budget={JS_DELAY_MS}", src.as_uri()],
                                           sandbox=True, euid=os.geteuid(), user="nobody",
                                           setpriv=shutil.which("setpriv"))
        if owner is not None:
            os.chown(profile, *owner)
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        shutil.move(out, dest)


def pdf_overhead(ctx: BenchContext, engine: str = "wkhtmltopdf") -> Figure:
    rounds = 15 if ctx.full else 5
    name = "pdf_overhead" if engine == "wkhtmltopdf" else f"pdf_{engine}_overhead"
    hole = socket.socket()  # a bound, never-listening port: refused connections for background traffic
    hole.bind(("127.0.0.1", 0))
    try:
        with tempfile.TemporaryDirectory(prefix="bench-media-") as tmp:
            src = Path(tmp) / "page.html"
            src.write_text(PAGE_HTML, encoding="utf-8")
            os.chmod(tmp, 0o755)  # the direct Chromium may run as another user: let it read the page
            src.chmod(0o644)
            ours = _ms_cpu(lambda: pdf.render_pdf(Path(tmp) / "ours.pdf", html=PAGE_HTML, engine=engine,
                                                  js_delay_ms=JS_DELAY_MS, resolver=_no_dns))
            if engine == "wkhtmltopdf":
                direct = _ms_cpu(lambda: _direct_wkhtmltopdf(src, Path(tmp) / "direct.pdf"))
                label = "wkhtmltopdf called directly"
            else:
                direct = _ms_cpu(lambda: _direct_chromium(src, Path(tmp) / "direct.pdf", hole.getsockname()[1]))
                label = "chromium --print-to-pdf called directly"
            ours(), direct()  # fonts and binaries into the page cache (and Chromium started once)
            v, b = alternate(ours, direct, rounds)
    finally:
        hole.close()
    extra: dict[str, float] = {"rounds": rounds}
    if engine == "wkhtmltopdf":  # the warm Chromium outlives the call: its CPU is not counted
        extra.update(_cpu_extra(v, b))
    return Figure(name, median([w for w, _ in v]), "ms", label, median([w for w, _ in b]), extra)


def _no_dns(host: str, port: int) -> list[str]:
    raise OSError("benchmarks resolve no names")  # the page has no external references anyway


def run(ctx: BenchContext) -> list[Figure]:
    return [resize_overhead(ctx), compress_overhead(ctx), pdf_overhead(ctx), pdf_overhead(ctx, "chromium")]
