"""compress-video core: ffmpeg (imageio-ffmpeg's static build, or the image's own minimal one).

API::

    info = compress_video(src_path, dest_path, codec="h264", crf=None, preset="fast",
                          max_width=None, max_height=None, audio_bitrate=None, format=None,
                          max_duration_s=settings.max_video_duration_s,
                          max_input_bytes=settings.max_video_input_bytes,
                          timeout_s=settings.video_timeout_s,
                          on_progress=..., should_cancel=...)
    info == {"format", "content_type", "ext", "codec", "encoder", "size", "input_size",
             "duration_s", "width", "height"}
    probe(path) -> Probe(duration_s, width, height, video_codec, has_audio, container)

Codecs: ``h264`` (libx264, CRF, x264 preset, ``+faststart``), ``vp9`` (libvpx-vp9,
constant quality), ``av1`` (libsvtav1 when the binary has it, else libaom-av1 with a fast
``cpu-used``). ``format`` is ``mp4`` (default; AAC audio) or ``webm`` (VP9/AV1 only; Opus
audio); with ``codec="vp9"`` and no format, webm. ``max_width``/``max_height`` cap the
size keeping the aspect ratio (never enlarging); dimensions are always even (yuv420p).
``crf`` defaults: h264 28, vp9 33, av1 35. ``audio_bitrate`` like ``"128k"``.

Safety: only container demuxers on ``DEMUXERS`` may open the input and only the ``file``
protocol (so a playlist disguised as a video cannot make ffmpeg fetch URLs or read other
files); metadata is dropped; the duration (checked as soon as ffmpeg has described the
input, and enforced on the output with ``-t``) and input size are capped; the whole run
has a timeout; on cancel or timeout ffmpeg's process group is killed. Progress is parsed
from ``-progress pipe:1`` (``out_time_us`` against the duration) and reported at most
every ``REPORT_EVERY_S``.

One ffmpeg process per task: no separate probe before or after. The encoding run's own
stderr (logged at ``info``) describes the input (duration, streams: the probe) before the
first frame is encoded, and the output stream (size, frame rate) it writes; its last
``out_time_us`` gives the output's length. The source is read in place, once.

Failures: ``UnsupportedVideo`` (not decodable, no video stream, a disallowed container),
``VideoTooLarge``, ``VideoTooLong``, ``BadVideoOptions``, ``VideoTimeout``, ``VideoFailed``
(ffmpeg rejected the input mid-way; the message ends with ffmpeg's stderr tail) — all
permanent: the same input would fail the same way again. ``RetryableError`` when ffmpeg is
missing, killed by a signal it did not get from us (OOM), or the disk is full.
``Cancelled`` when ``should_cancel()`` turned true.
"""
from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

from shared.errors import Cancelled, PermanentError, RetryableError
from shared.media import CancelFn, ProgressFn, child_env, never_cancel, no_progress, wait_exit


class UnsupportedVideo(PermanentError):
    code = "unsupported_video"


class VideoTooLarge(PermanentError):
    code = "too_large"


class VideoTooLong(PermanentError):
    code = "video_too_long"


class BadVideoOptions(PermanentError):
    code = "bad_options"


class VideoTimeout(PermanentError):
    code = "timeout"


class VideoFailed(PermanentError):
    code = "video_failed"


# Container demuxers an upload may be read with (ffmpeg ``-format_whitelist``): no
# playlists (hls, dash), no concat, no image sequences, nothing that opens other files.
DEMUXERS = ("mov", "matroska", "avi", "flv", "mpegts", "mpeg", "ogg", "asf", "ivf", "gif")
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
# x264 preset name -> the other encoders' speed knob (higher is faster)
_VP9_CPU_USED = dict(zip(PRESETS, (5, 5, 5, 4, 4, 3, 2, 1, 0), strict=True))
_SVT_PRESET = dict(zip(PRESETS, (12, 12, 11, 10, 9, 8, 6, 4, 2), strict=True))
_AOM_CPU_USED = dict(zip(PRESETS, (8, 8, 8, 7, 7, 6, 5, 4, 3), strict=True))
DEFAULT_CRF = {"h264": 28, "vp9": 33, "av1": 35}
MAX_CRF = {"h264": 51, "vp9": 63, "av1": 63}
CONTENT_TYPES = {"mp4": "video/mp4", "webm": "video/webm"}
REPORT_EVERY_S = 0.5  # progress and cancel polling: prompt for users, cheap for the callbacks
STDERR_TAIL = 1500  # characters of ffmpeg's stderr quoted in an error
_AUDIO_BITRATE = re.compile(r"^[1-9][0-9]{0,2}k$")


@cache
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary: imageio-ffmpeg's where it is installed (the venv; it
    honours IMAGEIO_FFMPEG_EXE), else the one on PATH (the compress-video image builds its
    own, with only what this module uses: infra/images/ffmpeg.sh)."""
    try:
        import imageio_ffmpeg  # imported lazily: only video workers pay for it
    except ImportError:
        return shutil.which("ffmpeg") or "ffmpeg"  # a missing one fails as RetryableError on first use
    return str(imageio_ffmpeg.get_ffmpeg_exe())


@cache
def encoders(ffmpeg: str) -> frozenset[str]:
    """Names of the encoders ``ffmpeg`` was built with (``ffmpeg -encoders``)."""
    out = _run([ffmpeg, "-hide_banner", "-nostdin", "-encoders"], 30).stdout
    return frozenset(m.group(1) for m in re.finditer(r"^\s[VAS][.A-Z]{5}\s+(\S+)", out, re.MULTILINE))


def _run(cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    try:
        with tempfile.TemporaryDirectory(prefix="tf-ffmpeg-") as home:
            return subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout_s,
                                  stdin=subprocess.DEVNULL, env=child_env(home))
    except FileNotFoundError:
        raise RetryableError(f"ffmpeg is not installed at {cmd[0]}") from None
    except subprocess.TimeoutExpired:
        raise VideoTimeout(f"ffmpeg did not finish reading the input within {timeout_s:g} s") from None


# --- probing -------------------------------------------------------------------------
@dataclass(frozen=True)
class Probe:
    duration_s: float | None  # None when the container does not say
    width: int | None  # as displayed (rotation applied)
    height: int | None
    video_codec: str | None
    has_audio: bool
    container: str


_INPUT = re.compile(r"^Input #0, (.+?), from ", re.MULTILINE)
_DURATION = re.compile(r"Duration: (\d+):(\d{2}):(\d{2}(?:\.\d+)?)")
_VIDEO = re.compile(r"Stream #0:\d+\S*: Video: (\w+)[^\n]*?\b(\d{1,5})x(\d{1,5})\b")
_ROTATION = re.compile(r"rotation of (-?\d+(?:\.\d+)?) degrees")


def parse_probe(text: str) -> Probe:
    """Read what ``ffmpeg -i <file>`` printed about input #0. Pure.

    Raises ``UnsupportedVideo`` when ffmpeg could not open the input or found no video.
    """
    m_input = _INPUT.search(text)
    if not m_input:
        raise UnsupportedVideo("not a readable video: " + tail(text, 300))
    m_video = _VIDEO.search(text)
    if not m_video:
        raise UnsupportedVideo("the file has no video stream")
    duration = None
    m_dur = _DURATION.search(text)
    if m_dur:
        h, m, s = m_dur.groups()
        duration = int(h) * 3600 + int(m) * 60 + float(s)
    width, height = int(m_video.group(2)), int(m_video.group(3))
    m_rot = _ROTATION.search(text)
    if m_rot and round(abs(float(m_rot.group(1)))) % 180 == 90:
        width, height = height, width
    return Probe(duration_s=duration, width=width, height=height, video_codec=m_video.group(1),
                 has_audio=re.search(r"Stream #0:\d+\S*: Audio: ", text) is not None,
                 container=m_input.group(1))


def _input_args(path: str | os.PathLike[str]) -> list[str]:
    return ["-format_whitelist", ",".join(DEMUXERS), "-protocol_whitelist", "file", "-i", f"file:{os.fspath(path)}"]


def probe(path: str | os.PathLike[str], *, ffmpeg: str | None = None, timeout_s: float = 30.0) -> Probe:
    """Probe a video with ``ffmpeg -i`` (the imageio-ffmpeg wheel has no ffprobe)."""
    exe = ffmpeg or ffmpeg_exe()
    # Without an output ffmpeg prints the input description and exits 1: that is the probe.
    done = _run([exe, "-hide_banner", "-nostdin", *_input_args(path)], timeout_s)
    return parse_probe(done.stderr)


# --- the command ---------------------------------------------------------------------
def scale_filter(max_width: int | None, max_height: int | None) -> str:
    """A scale filter capping the size, keeping the aspect ratio, never enlarging, even sizes."""
    if max_width and max_height:
        return (f"scale=w='min({max_width},iw)':h='min({max_height},ih)'"
                ":force_original_aspect_ratio=decrease:force_divisible_by=2")
    if max_width:
        return f"scale=w='trunc(min({max_width},iw)/2)*2':h=-2"
    if max_height:
        return f"scale=w=-2:h='trunc(min({max_height},ih)/2)*2'"
    return "scale=w='trunc(iw/2)*2':h='trunc(ih/2)*2'"


def video_args(codec: str, crf: int, preset: str, available: frozenset[str]) -> tuple[list[str], str]:
    """Encoder arguments for ``codec`` and the encoder chosen. Raises ``BadVideoOptions``."""
    if codec == "h264":
        return ["-c:v", "libx264", "-crf", str(crf), "-preset", preset], "libx264"
    if codec == "vp9":
        # -b:v 0 makes -crf a pure constant-quality target
        return ["-c:v", "libvpx-vp9", "-crf", str(crf), "-b:v", "0", "-deadline", "good",
                "-cpu-used", str(_VP9_CPU_USED[preset]), "-row-mt", "1"], "libvpx-vp9"
    if codec == "av1":
        if "libsvtav1" in available:  # several times faster than libaom at similar quality
            return ["-c:v", "libsvtav1", "-crf", str(crf), "-preset", str(_SVT_PRESET[preset])], "libsvtav1"
        if "libaom-av1" in available:
            return ["-c:v", "libaom-av1", "-crf", str(crf), "-b:v", "0",
                    "-cpu-used", str(_AOM_CPU_USED[preset]), "-row-mt", "1"], "libaom-av1"
        raise BadVideoOptions("this worker's ffmpeg has no AV1 encoder")
    raise BadVideoOptions("codec must be h264, vp9 or av1")


@dataclass(frozen=True)
class Job:
    """A validated compress request."""

    codec: str
    format: str
    crf: int
    preset: str
    max_width: int | None
    max_height: int | None
    audio_bitrate: str


def make_job(codec: str = "h264", crf: int | None = None, preset: str | None = None, max_width: int | None = None,
             max_height: int | None = None, audio_bitrate: str | None = None, format: str | None = None) -> Job:
    """Validate the payload's options and fill the defaults. Raises ``BadVideoOptions``."""
    if codec not in DEFAULT_CRF:
        raise BadVideoOptions("codec must be h264, vp9 or av1")
    fmt = format or ("webm" if codec == "vp9" else "mp4")
    if fmt not in CONTENT_TYPES:
        raise BadVideoOptions("format must be mp4 or webm")
    if fmt == "webm" and codec == "h264":
        raise BadVideoOptions("webm holds only vp9 or av1 video: choose codec vp9 or av1")
    crf = DEFAULT_CRF[codec] if crf is None else crf
    if not isinstance(crf, int) or isinstance(crf, bool) or not 0 <= crf <= MAX_CRF[codec]:
        raise BadVideoOptions(f"crf must be an integer from 0 to {MAX_CRF[codec]} for {codec}")
    preset = preset or "fast"
    if preset not in PRESETS:
        raise BadVideoOptions(f"preset must be one of {', '.join(PRESETS)}")
    for name, value, top in (("max_width", max_width, 7680), ("max_height", max_height, 4320)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 16 <= value <= top):
            raise BadVideoOptions(f"{name} must be an integer from 16 to {top}")
    bitrate = audio_bitrate or ("128k" if fmt == "mp4" else "96k")
    if not isinstance(bitrate, str) or not _AUDIO_BITRATE.match(bitrate):
        raise BadVideoOptions("audio_bitrate must look like 128k")
    return Job(codec, fmt, crf, preset, max_width, max_height, bitrate)


def build_command(ffmpeg: str, src: str | os.PathLike[str], dest: str | os.PathLike[str], job: Job,
                  max_duration_s: float, available: frozenset[str]) -> tuple[list[str], str]:
    """The full ffmpeg command line and the video encoder it uses. Pure.

    It logs at ``info`` (without the running stats): the input and output descriptions
    on stderr are the probe (:func:`run_ffmpeg`). Audio options are always given; without
    an audio stream they go unused.
    """
    vargs, encoder = video_args(job.codec, job.crf, job.preset, available)
    cmd = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "info", "-y", *_input_args(src),
           "-map", "0:v:0", "-map", "0:a:0?", "-sn", "-dn", "-map_metadata", "-1", "-map_chapters", "-1",
           # -t on the output: a file that lies about its length still stops at the cap
           "-t", f"{max_duration_s:g}", "-vf", scale_filter(job.max_width, job.max_height),
           *vargs, "-pix_fmt", "yuv420p"]
    cmd += ["-c:a", "aac" if job.format == "mp4" else "libopus", "-b:a", job.audio_bitrate]
    if job.format == "mp4":
        cmd += ["-movflags", "+faststart"]  # index first: playback starts before the download ends
    cmd += ["-progress", "pipe:1", "-f", job.format, f"file:{os.fspath(dest)}"]
    return cmd, encoder


# --- running -------------------------------------------------------------------------
def tail(text: str, limit: int = STDERR_TAIL) -> str:
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-limit:]


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill ffmpeg's whole process group (it leads one: ``start_new_session``)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@dataclass
class Run:
    """What one ffmpeg run said about itself: its stderr (start and end) and its progress."""

    head: str = ""  # the first ``HEAD_BYTES`` of stderr: the input and output descriptions
    tail: str = ""  # the last ``STDERR_TAIL`` characters of stderr
    out_time_s: float = 0.0  # the last ``out_time_us`` reported: the output's length so far
    source: Probe | None = None  # the input, once ffmpeg described it

    def output_stream(self) -> tuple[int | None, int | None, float | None]:
        """Width, height and frame rate of the output's video stream, as ffmpeg announced it."""
        _, sep, out = self.head.partition("\nOutput #0")
        m = _VIDEO.search(out) if sep else None
        if not m:
            return None, None, None
        fps = _FPS.search(out[m.start():].split("\n", 1)[0])
        return int(m.group(2)), int(m.group(3)), float(fps.group(1)) if fps else None


HEAD_BYTES = 64 * 1024
_FPS = re.compile(r", (\d+(?:\.\d+)?) fps\b")
_INPUT_DONE = ("\nStream mapping:", "\nOutput #0")


def run_ffmpeg(cmd: list[str], *, expected_s: float | None, timeout_s: float, on_progress: ProgressFn,
               should_cancel: CancelFn, max_input_s: float | None = None) -> Run:
    """Run an ffmpeg command that writes ``-progress pipe:1``; see the module docstring for errors.

    ``expected_s`` is the output duration that means 100 % (None: the input's, capped at
    ``max_input_s``, once ffmpeg has described it). With ``max_input_s`` an input that
    says it is longer fails with ``VideoTooLong`` as soon as ffmpeg has read its header:
    the one run is also the probe.
    """
    with tempfile.TemporaryDirectory(prefix="tf-ffmpeg-") as home:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=child_env(home), start_new_session=True)
        except FileNotFoundError:
            raise RetryableError(f"ffmpeg is not installed at {cmd[0]}") from None
        run = Run()
        try:
            _watch(proc, run, expected_s, max_input_s, timeout_s, on_progress, should_cancel)
        except BaseException:
            _kill(proc)
            raise
        finally:
            for pipe in (proc.stdout, proc.stderr):
                if pipe:
                    pipe.close()
    if proc.returncode == 0:
        return run
    if proc.returncode < 0:
        raise RetryableError(f"ffmpeg was killed by signal {-proc.returncode}")
    if "No space left on device" in run.tail:
        raise RetryableError("ffmpeg ran out of disk space: " + tail(run.tail, 300))
    if max_input_s is not None and run.source is None:
        parse_probe(run.head)  # raises UnsupportedVideo when ffmpeg could not read the input (or it has no video)
    raise VideoFailed(f"ffmpeg failed (exit {proc.returncode}): {tail(run.tail)}")


def _watch(proc: subprocess.Popen[bytes], run: Run, expected_s: float | None, max_input_s: float | None,
           timeout_s: float, on_progress: ProgressFn, should_cancel: CancelFn) -> None:
    assert proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + timeout_s
    last_report, last_pct, buf = 0.0, -1, b""
    head, err_tail = bytearray(), b""
    out_us = 0
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        open_pipes = 2
        while open_pipes:
            now = time.monotonic()
            if now >= deadline:
                raise VideoTimeout(f"compressing took longer than {timeout_s:g} s")
            for key, _ in sel.select(timeout=min(0.2, deadline - now)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_pipes -= 1  # ffmpeg closed it: it is exiting
                elif key.fileobj is proc.stderr:
                    if len(head) < HEAD_BYTES:
                        head += chunk[:HEAD_BYTES - len(head)]
                    err_tail = (err_tail + chunk)[-STDERR_TAIL * 4:]
                    if run.source is None and max_input_s is not None and any(m in head.decode("utf-8", "replace")
                                                                                for m in _INPUT_DONE):
                        run.source = _input_described(head.decode("utf-8", "replace"), max_input_s)
                        if expected_s is None and run.source.duration_s:
                            expected_s = min(run.source.duration_s, max_input_s)
                else:
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if line.startswith(b"out_time_us=") and line[12:].strip().isdigit():
                            out_us = int(line[12:])
            now = time.monotonic()
            if now - last_report >= REPORT_EVERY_S:
                last_report = now
                if should_cancel():
                    raise Cancelled("cancelled while compressing")
                if expected_s:
                    pct = max(0, min(99, int(out_us / 1e6 * 100 / expected_s)))
                    if pct > last_pct:
                        last_pct = pct
                        on_progress(pct)
    run.head = head.decode("utf-8", "replace")
    run.tail = err_tail.decode("utf-8", "replace")
    run.out_time_s = out_us / 1e6
    if run.source is None and max_input_s is not None and run.head:
        try:
            run.source = parse_probe(run.head.split("\nOutput #0")[0])
        except UnsupportedVideo:
            pass  # judged with the exit status
    if not wait_exit(proc, max(0.1, deadline - time.monotonic())):
        raise VideoTimeout(f"compressing took longer than {timeout_s:g} s")
    proc.wait()


def _input_described(text: str, max_input_s: float) -> Probe:
    """The input as ffmpeg described it before encoding; ``VideoTooLong`` past the cap."""
    source = parse_probe(min((text.split(m)[0] for m in _INPUT_DONE), key=len))
    if source.duration_s is not None and source.duration_s > max_input_s:
        raise VideoTooLong(f"the video lasts {source.duration_s:.1f} s; the limit is {max_input_s:g} s")
    return source


def compress_video(src_path: str | os.PathLike[str], dest_path: str | os.PathLike[str], *, codec: str = "h264",
                   crf: int | None = None, preset: str | None = None, max_width: int | None = None,
                   max_height: int | None = None, audio_bitrate: str | None = None, format: str | None = None,
                   max_duration_s: float = 600.0, max_input_bytes: int = 500 * 1024 * 1024,
                   timeout_s: float = 540.0, ffmpeg: str | None = None, on_progress: ProgressFn = no_progress,
                   should_cancel: CancelFn = never_cancel, **_ignored: Any) -> dict[str, Any]:
    """Compress ``src_path`` into ``dest_path``; see the module docstring. ``**_ignored`` takes ``source``."""
    job = make_job(codec, crf, preset, max_width, max_height, audio_bitrate, format)
    input_size = os.path.getsize(src_path)
    if input_size > max_input_bytes:
        raise VideoTooLarge(f"the video is {input_size} bytes; the limit is {max_input_bytes}")
    if should_cancel():
        raise Cancelled("cancelled before compressing")
    exe = ffmpeg or ffmpeg_exe()
    cmd, encoder = build_command(exe, src_path, dest_path, job, max_duration_s, encoders(exe))
    try:
        run = run_ffmpeg(cmd, expected_s=None, timeout_s=timeout_s, on_progress=on_progress,
                         should_cancel=should_cancel, max_input_s=max_duration_s)
        width, height, fps = run.output_stream()
        # out_time is the last frame's start: the output lasts one frame longer
        duration = round(run.out_time_s + (1 / fps if fps else 0), 3) if run.out_time_s else None
        source = run.source
        if duration is not None and duration >= max_duration_s - 0.05 and (
                source is None or source.duration_s is None or source.duration_s > max_duration_s):
            raise VideoTooLong(f"the video runs past the limit of {max_duration_s:g} s")
    except BaseException:
        try:
            os.unlink(dest_path)
        except OSError:
            pass
        raise
    return {"format": job.format, "content_type": CONTENT_TYPES[job.format], "ext": job.format,
            "codec": job.codec, "encoder": encoder, "size": os.path.getsize(dest_path), "input_size": input_size,
            "duration_s": duration, "width": width, "height": height}
