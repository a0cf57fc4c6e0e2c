#!/bin/sh
# compress-video's ffmpeg, built in the Dockerfile's ffmpeg stage from Debian's own
# source package (the ffmpeg bookworm ships, with its security fixes) with only what
# shared/media/video.py and its tests use, linked to Debian's codec libraries:
#   - encoders: libx264 (h264), libvpx-vp9 (vp9), libsvtav1 (av1), aac, libopus;
#   - the input side: the container demuxers of video.py's DEMUXERS (plus those its
#     whitelist has to refuse: hls, concat, raw h264), the common video and audio
#     decoders, dav1d for AV1 input; the file and pipe protocols only;
#   - muxers mp4/webm (and what the tests write their clips as), the scale filter, and
#     lavfi's test sources and the null output (the tests make and check their clips
#     with this ffmpeg).
# Debian's full ffmpeg with its libraries, or imageio-ffmpeg's static build, is ~170 MB;
# this binary and the five runtime libraries (APT_PACKAGES of compress-video) ~22 MB.
# About 2½ minutes on 2 cores.
#
#   sh ffmpeg.sh PREFIX          # installs PREFIX/bin/ffmpeg
set -eu
prefix=${1:?usage: ffmpeg.sh PREFIX}
ca=""
[ -f /run/secrets/ca-bundle ] && ca="-o Acquire::https::CAInfo=/run/secrets/ca-bundle"
sed -n 's/^deb /deb-src /p' /etc/apt/sources.list > /etc/apt/sources.list.d/src.list
apt-get update $ca
DEBIAN_FRONTEND=noninteractive apt-get install $ca -y --no-install-recommends \
    build-essential nasm pkg-config dpkg-dev \
    libx264-dev libvpx-dev libopus-dev libsvtav1enc-dev libdav1d-dev zlib1g-dev
work=$(mktemp -d)
cd "$work"
apt-get source $ca --download-only ffmpeg
dpkg-source --no-check -x ffmpeg_*.dsc src
cd src
./configure --prefix="$prefix" --disable-everything --disable-doc --disable-debug --disable-ffplay \
    --disable-ffprobe --disable-network --disable-autodetect --enable-gpl --enable-zlib \
    --enable-libx264 --enable-libvpx --enable-libopus --enable-libsvtav1 --enable-libdav1d \
    --enable-protocol=file,pipe \
    --enable-demuxer=mov,matroska,avi,flv,mpegts,mpegps,ogg,asf,ivf,gif,hls,concat,h264,aac,mp3,wav \
    --enable-muxer=mp4,ipod,mov,webm,matroska,h264,null \
    --enable-decoder=rawvideo,wrapped_avframe,h264,hevc,vp8,vp9,libdav1d,mpeg4,mpeg2video,mpeg1video,mjpeg,msmpeg4v3,wmv2,wmv3,vc1,flv,theora,gif,png,aac,mp3,mp2,opus,vorbis,ac3,eac3,flac,alac,wmav2,pcm_s16le,pcm_s24le,pcm_s32le,pcm_f32le,pcm_f64le \
    --enable-encoder=libx264,libvpx_vp9,libsvtav1,aac,libopus,wrapped_avframe,pcm_s16le \
    --enable-parser=h264,hevc,vp8,vp9,av1,mpeg4video,mpegvideo,mpegaudio,aac,ac3,opus,vorbis,flac \
    --enable-bsf=h264_mp4toannexb,aac_adtstoasc,vp9_superframe,av1_frame_merge \
    --enable-filter=scale,format,aformat,aresample,null,anull,setsar,fps,testsrc,sine \
    --enable-indev=lavfi --enable-avdevice --enable-avfilter --enable-swscale --enable-swresample
make -j"$(nproc)"
make install
strip "$prefix/bin/ffmpeg"
cd / && rm -rf "$work" /var/lib/apt/lists/*
"$prefix/bin/ffmpeg" -hide_banner -encoders | grep -q libx264
