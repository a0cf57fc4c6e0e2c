#!/usr/bin/env bash
# Build a stand-in for the official python:3.11-slim-bookworm image from Debian's own
# archive, for hosts that cannot pull from a container registry, and tag it with the
# same name so the Dockerfile builds unchanged:
#
#   bash infra/images/base.sh <engine> <tag>      # e.g. podman python:3.11-slim-bookworm
#
# debootstrap's minbase variant of bookworm, plus Debian's Python 3.11 and pip. Like the
# official image it has `python` and `pip` on PATH in /usr/local/bin, lets pip install
# into the system interpreter (a container has no other Python to protect), LANG=C.UTF-8,
# and apt sources for bookworm, bookworm-updates and the security archive. Takes about a
# minute; needs root (debootstrap) and network access to the Debian mirror.
# DEBIAN_MIRROR overrides the mirror (default: deb.debian.org).
set -euo pipefail
engine=${1:?usage: base.sh <podman|docker> <tag>}
tag=${2:?usage: base.sh <podman|docker> <tag>}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! command -v debootstrap >/dev/null; then
    echo "base: installing debootstrap from Debian's archive" >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends debootstrap >/dev/null \
        || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
             $SUDO apt-get install -y -qq --no-install-recommends debootstrap >/dev/null; }
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/taskforge-base.XXXXXX")
cleanup() {
    for m in proc sys dev; do $SUDO umount -l "$work/rootfs/$m" 2>/dev/null || true; done
    $SUDO rm -rf "$work"
}
trap cleanup EXIT
root="$work/rootfs"

echo "base: debootstrap --variant=minbase bookworm from $mirror" >&2
$SUDO debootstrap --variant=minbase --include=ca-certificates,python3,python3-pip \
    bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }

$SUDO tee "$root/etc/apt/sources.list" >/dev/null <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
SOURCES

# What the official image looks like from the inside: python/pip on PATH, pip allowed
# to install into the interpreter, no caches or docs.
$SUDO rm -f "$root"/usr/lib/python3.11/EXTERNALLY-MANAGED
$SUDO ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
$SUDO ln -sf /usr/bin/python3 "$root/usr/local/bin/python3"
$SUDO ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
$SUDO ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip3"
# Slim like the official image: no documentation, man pages, locales or apt caches.
# dpkg keeps them out of later apt installs too.
$SUDO tee "$root/etc/dpkg/dpkg.cfg.d/docker-slim" >/dev/null <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
DPKG
# Like the official Debian images: dpkg skips fsync while unpacking (a build step either
# completes or is thrown away), which speeds up the PDF image's apt step.
echo force-unsafe-io | $SUDO tee "$root/etc/dpkg/dpkg.cfg.d/docker-apt-speedup" >/dev/null
$SUDO find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
$SUDO rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
    "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/log/* "$root"/tmp/*
# The standard library byte-compiled, as in the official image: function containers run
# with a read-only root, so whatever is not compiled here is compiled on every start.
$SUDO chroot "$root" /usr/bin/python3 -m compileall -q -j 0 /usr/lib/python3.11 >/dev/null 2>&1 || true

echo "base: importing as $tag" >&2
$SUDO tar -C "$root" --numeric-owner -c . | "$engine" import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$tag" >/dev/null
echo "base: $tag ready" >&2
