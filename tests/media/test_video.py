"""shared/media/video.py: compress-video on short clips generated here with ffmpeg itself."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from shared.errors import Cancelled, PermanentError, RetryableError, is_retryable
from shared.media import video

FF = video.ffmpeg_exe()


def generate(path: Path, *, seconds: float = 3, size: str = "640x360", audio: bool = True, extra: list[str] | None = None) -> Path:
    """A testsrc clip (+ a sine tone) encoded at high quality, so compressing it shrinks it."""
    cmd = [FF, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
           "-f", "lavfi", "-i", f"testsrc=size={size}:rate=25:duration={seconds}"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}",
                "-c:a", "aac", "-b:a", "192k"]
    cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "8", "-pix_fmt", "yuv420p", *(extra or []), str(path)]
    subprocess.run(cmd, check=True, timeout=120)
    return path


def decodes(path: Path) -> bool:
    """Whether ffmpeg decodes every frame without an error."""
    done = subprocess.run([FF, "-hide_banner", "-nostdin", "-v", "error", "-i", str(path), "-f", "null", "-"],
                          capture_output=True, text=True, timeout=120)
    return done.returncode == 0 and not done.stderr.strip()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("v") / "clip.mp4")


# --- pure parts ------------------------------------------------------------------------
PROBE_TEXT = """Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'file:/x/clip.mp4':
  Duration: 00:01:02.50, start: 0.000000, bitrate: 991 kb/s
  Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(tv, bt709, progressive), 1920x1080 [SAR 1:1 DAR 16:9], 852 kb/s, 25 fps (default)
      Side data:
        displaymatrix: rotation of -90.00 degrees
  Stream #0:1[0x2](und): Audio: aac (LC) (mp4a / 0x6134706D), 44100 Hz, stereo, fltp, 129 kb/s (default)
At least one output file must be specified
"""


def test_parse_probe() -> None:
    p = video.parse_probe(PROBE_TEXT)
    assert p == video.Probe(duration_s=62.5, width=1080, height=1920, video_codec="h264", has_audio=True,
                            container="mov,mp4,m4a,3gp,3g2,mj2")
    raw = "Input #0, h264, from 'file:x':\n  Duration: N/A, bitrate: N/A\n  Stream #0:0: Video: h264 (High), yuv420p, 320x240, 25 fps\n"
    assert video.parse_probe(raw) == video.Probe(None, 320, 240, "h264", False, "h264")
    with pytest.raises(video.UnsupportedVideo, match="no video"):
        video.parse_probe("Input #0, mov,mp4, from 'a.m4a':\n  Duration: 00:00:01.00\n  Stream #0:0: Audio: aac, 44100 Hz\n")
    with pytest.raises(video.UnsupportedVideo, match="not a readable video"):
        video.parse_probe("file:x: Invalid data found when processing input\n")


def test_scale_filters() -> None:
    assert "force_original_aspect_ratio=decrease" in video.scale_filter(640, 360)
    assert video.scale_filter(640, None) == "scale=w='trunc(min(640,iw)/2)*2':h=-2"
    assert video.scale_filter(None, 360) == "scale=w=-2:h='trunc(min(360,ih)/2)*2'"
    assert video.scale_filter(None, None) == "scale=w='trunc(iw/2)*2':h='trunc(ih/2)*2'"


@pytest.mark.parametrize("opts", [dict(codec="h265"), dict(codec="h264", format="webm"), dict(format="avi"),
                                  dict(codec="h264", crf=52), dict(codec="vp9", crf=64), dict(crf=-1),
                                  dict(preset="placebo"), dict(max_width=8), dict(max_height=5000),
                                  dict(audio_bitrate="lots"), dict(audio_bitrate="128")])
def test_bad_options(opts: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(video.BadVideoOptions):
        video.make_job(**opts)


def test_defaults() -> None:
    assert video.make_job() == video.Job("h264", "mp4", 28, "fast", None, None, "128k")
    assert video.make_job(codec="vp9").format == "webm"
    assert video.make_job(codec="vp9", format="webm").audio_bitrate == "96k"
    assert video.make_job(codec="av1").format == "mp4"


# --- real encodes ----------------------------------------------------------------------
def test_h264_is_smaller_decodable_scaled_and_faststart(clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    info = video.compress_video(clip, out, max_width=320, preset="ultrafast")
    assert (info["format"], info["content_type"], info["ext"], info["encoder"]) == ("mp4", "video/mp4", "mp4", "libx264")
    assert (info["width"], info["height"]) == (320, 180)
    assert info["size"] == out.stat().st_size < clip.stat().st_size == info["input_size"]
    assert abs(info["duration_s"] - 3.0) < 0.1
    assert decodes(out)
    data = out.read_bytes()
    assert 0 < data.index(b"moov") < data.index(b"mdat")  # +faststart: the index comes first
    p = video.probe(out)
    assert p.video_codec == "h264" and p.has_audio


@pytest.mark.parametrize(("codec", "fmt", "vcodec"), [("vp9", "webm", "vp9"), ("av1", "mp4", "av1"), ("av1", "webm", "av1"),
                                                      ("vp9", "mp4", "vp9")])
def test_other_codecs(clip: Path, tmp_path: Path, codec: str, fmt: str, vcodec: str) -> None:
    out = tmp_path / "o"
    info = video.compress_video(clip, out, codec=codec, format=fmt, max_height=180, preset="ultrafast",
                                audio_bitrate="64k")
    p = video.probe(out)
    assert (p.video_codec, p.width, p.height, p.has_audio) == (vcodec, 320, 180, True)
    assert info["format"] == fmt and info["size"] < clip.stat().st_size
    assert decodes(out)
    with open(out, "rb") as fh:
        head = fh.read(64)
    assert (head[:4] == b"\x1a\x45\xdf\xa3") if fmt == "webm" else (b"ftyp" in head)


def test_odd_sizes_become_even_and_nothing_is_enlarged(tmp_path: Path) -> None:
    src = generate(tmp_path / "odd.mkv", seconds=1, size="321x241", audio=False,
                   extra=["-pix_fmt", "yuv444p"])
    info = video.compress_video(src, tmp_path / "o", max_width=4000, max_height=4000, preset="ultrafast")
    assert (info["width"], info["height"]) == (320, 240)
    assert not video.probe(tmp_path / "o").has_audio
    info = video.compress_video(src, tmp_path / "o2", max_height=101, preset="ultrafast")
    assert info["height"] == 100 and info["width"] % 2 == 0


def test_duration_and_size_caps(clip: Path, tmp_path: Path) -> None:
    with pytest.raises(video.VideoTooLong) as err:
        video.compress_video(clip, tmp_path / "o", max_duration_s=2.0)
    assert not is_retryable(err.value)
    with pytest.raises(video.VideoTooLarge):
        video.compress_video(clip, tmp_path / "o", max_input_bytes=1000)
    assert not (tmp_path / "o").exists()


def test_output_is_capped_when_the_length_is_unknown(tmp_path: Path) -> None:
    # a "live" Matroska file declares no duration: the -t cap on the output must stop it
    src = generate(tmp_path / "live.mkv", seconds=3, size="160x120", audio=False, extra=["-f", "matroska", "-live", "1"])
    assert video.probe(src).duration_s is None
    with pytest.raises(video.VideoTooLong):
        video.compress_video(src, tmp_path / "o", max_duration_s=1.5, preset="ultrafast")
    assert not (tmp_path / "o").exists()
    info = video.compress_video(src, tmp_path / "o", max_duration_s=10, preset="ultrafast")
    assert abs(info["duration_s"] - 3.0) < 0.1


def test_raw_streams_are_not_on_the_container_list(tmp_path: Path) -> None:
    src = generate(tmp_path / "raw.h264", seconds=1, size="160x120", audio=False, extra=["-f", "h264"])
    with pytest.raises(video.UnsupportedVideo):
        video.compress_video(src, tmp_path / "o")


@pytest.mark.parametrize(("name", "content"), [
    ("noise.mp4", os.urandom(50_000)),
    ("playlist.mp4", b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://169.254.169.254/latest/x.ts\n#EXT-X-ENDLIST\n"),
    ("playlist.m3u8", b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"),
    ("list.txt", b"ffconcat version 1.0\nfile '/etc/passwd'\n"),
    ("empty.mp4", b""),
], ids=["noise", "hls-network", "hls-local-file", "concat", "empty"])
def test_undecodable_or_hostile_input_is_permanent(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(video.UnsupportedVideo) as err:
        video.compress_video(tmp_path / name, tmp_path / "o")
    assert not is_retryable(err.value)


def test_audio_only_and_truncated_files(clip: Path, tmp_path: Path) -> None:
    audio = tmp_path / "a.m4a"
    subprocess.run([FF, "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac",
                    str(audio)], check=True, timeout=60)
    with pytest.raises(video.UnsupportedVideo, match="no video"):
        video.compress_video(audio, tmp_path / "o")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])  # the index (moov) is at the end
    with pytest.raises(PermanentError):
        video.compress_video(cut, tmp_path / "o")


# --- process control -------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers signal 0; it is dead for our purpose
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(") ")[1][0] != "Z"


@pytest.fixture()
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen]:  # type: ignore[type-arg]
    procs: list[subprocess.Popen] = []  # type: ignore[type-arg]
    real = subprocess.Popen

    class Recording(real):  # type: ignore[misc,valid-type]
        def __init__(self, *a, **kw):  # type: ignore[no-untyped-def]
            super().__init__(*a, **kw)
            procs.append(self)

    monkeypatch.setattr(video.subprocess, "Popen", Recording)
    return procs


def test_cancel_kills_ffmpeg(tmp_path: Path, spawned: list) -> None:  # type: ignore[type-arg]
    src = generate(tmp_path / "long.mp4", seconds=20, size="1280x720", audio=False)
    calls = {"n": 0}

    def cancel_soon() -> bool:
        calls["n"] += 1
        return calls["n"] >= 3  # polled before probing, when ffmpeg starts, then every 0.5 s: cancel mid-encode

    with pytest.raises(Cancelled):
        video.compress_video(src, tmp_path / "o", preset="veryslow", should_cancel=cancel_soon)
    encoder = spawned[-1]
    assert encoder.returncode == -9 and not _alive(encoder.pid)
    assert calls["n"] == 3
    assert not (tmp_path / "o").exists()


def test_timeout_kills_ffmpeg(tmp_path: Path, spawned: list) -> None:  # type: ignore[type-arg]
    src = generate(tmp_path / "long.mp4", seconds=20, size="1280x720", audio=False)
    with pytest.raises(video.VideoTimeout) as err:
        video.compress_video(src, tmp_path / "o", codec="av1", preset="veryslow", timeout_s=1.5)
    assert not is_retryable(err.value)
    assert spawned[-1].returncode == -9 and not _alive(spawned[-1].pid)
    assert not (tmp_path / "o").exists()


FAKE_FFMPEG = textwrap.dedent("""
    import os, subprocess, sys, time
    open(sys.argv[1], "w").write(str(subprocess.Popen(["sleep", "300"]).pid))  # a child in our group
    for us in range(0, 10_000_000, 250_000):
        print(f"out_time_us={us}\\nprogress=continue", flush=True)
        time.sleep(0.05)
    time.sleep(300)
""")


def test_progress_is_parsed_throttled_and_the_group_killed(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    seen: list[tuple[float, int]] = []
    stop = threading.Event()

    def should_cancel() -> bool:
        return stop.is_set()

    def on_progress(pct: int) -> None:
        seen.append((time.monotonic(), pct))
        if pct >= 60:
            stop.set()

    with pytest.raises(Cancelled):
        video.run_ffmpeg([sys.executable, "-c", FAKE_FFMPEG, str(pidfile)], expected_s=10.0, timeout_s=60,
                         on_progress=on_progress, should_cancel=should_cancel)
    pcts = [p for _, p in seen]
    assert pcts == sorted(set(pcts)) and 60 <= pcts[-1] <= 99 and len(pcts) >= 3
    assert all(b - a >= video.REPORT_EVERY_S * 0.9 for (a, _), (b, _) in zip(seen, seen[1:], strict=False))
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)  # the grandchild is reaped by init after the group kill
    assert not _alive(child)


def test_exit_codes_map_to_outcomes(tmp_path: Path) -> None:
    def run(code: str) -> None:
        video.run_ffmpeg([sys.executable, "-c", code], expected_s=None, timeout_s=30,
                         on_progress=lambda p: None, should_cancel=lambda: False)

    with pytest.raises(video.VideoFailed, match="broken frame"):
        run("import sys; sys.stderr.write('x' * 5000 + 'broken frame'); sys.exit(1)")
    with pytest.raises(RetryableError, match="signal"):
        run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(RetryableError, match="disk"):
        run("import sys; sys.stderr.write('Error: No space left on device'); sys.exit(1)")
    with pytest.raises(RetryableError, match="not installed"):
        video.run_ffmpeg([str(tmp_path / "nope")], expected_s=None, timeout_s=5,
                         on_progress=lambda p: None, should_cancel=lambda: False)
    err = pytest.raises(video.VideoFailed, run, "import sys; sys.stderr.write('y' * 9000); sys.exit(1)").value
    assert len(err.message) < video.STDERR_TAIL + 100
