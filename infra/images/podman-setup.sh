#!/usr/bin/env bash
# Make podman usable on a Debian host where no container engine works yet:
#   1. install podman and runc from Debian's archive (apt) if podman is missing;
#   2. if `podman info` still fails, write a containers.conf drop-in that uses runc
#      (crun refuses hosts with hybrid cgroup v1/v2 hierarchies), the cgroupfs manager
#      (no systemd as PID 1 in many VMs and CI runners), a file event logger (no
#      journald) and default ulimits within the host's hard limits.
# Idempotent; needs root (or sudo). Exits non-zero when podman still does not work.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "podman-setup: run as root or install sudo" >&2; exit 1; }
    SUDO="sudo"
fi

if ! command -v podman >/dev/null || ! command -v runc >/dev/null; then
    echo "podman-setup: installing podman and runc from Debian's archive" >&2
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends podman runc fuse-overlayfs uidmap >/dev/null
fi

# Already configured and answering: nothing to do.
if timeout 60 podman info >/dev/null 2>&1 && [ -f /etc/containers/containers.conf.d/50-taskforge.conf ]; then
    exit 0
fi

# The hard limits this host allows (a container cannot raise them).
nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
[ "$nofile" = unlimited ] && nofile=1048576
[ "$nproc" = unlimited ] && nproc=65536
[ "$nofile" -gt 1048576 ] && nofile=1048576
[ "$nproc" -gt 65536 ] && nproc=65536
# A generous but bounded default: asyncio servers (status-stream) hold many sockets.
[ "$nofile" -gt 20000 ] && nofile=20000
[ "$nproc" -gt 4096 ] && nproc=4096

conf_dir=/etc/containers/containers.conf.d
$SUDO mkdir -p "$conf_dir"
tmp=$(mktemp)
cat > "$tmp" <<CONF
# Written by TaskForge's infra/images/podman-setup.sh (make images).
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
$SUDO install -m 0644 "$tmp" "$conf_dir/50-taskforge.conf"
rm -f "$tmp"
echo "podman-setup: wrote $conf_dir/50-taskforge.conf (runc, cgroupfs, file events, nofile=$nofile nproc=$nproc)" >&2

if ! timeout 60 podman info >/dev/null; then
    echo "podman-setup: podman still does not work; see the error above" >&2
    exit 1
fi
