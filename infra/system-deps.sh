#!/usr/bin/env bash
# Install the Debian packages TaskForge's functions and tests use, if they are missing:
# wkhtmltopdf (PDF engine), chromium (second PDF engine, browser tests), poppler-utils
# (pdftotext in tests), prometheus (promtool for rule checks), prometheus-alertmanager
# (amtool, checks infra/alertmanager). With --bench also wrk, the load generator of the
# gateway's figures (bench/submit.py; without it a Python client shares the cores).
set -euo pipefail
need=()
[ "${1:-}" = "--bench" ] && { command -v wrk >/dev/null || need+=(wrk); }
command -v wkhtmltopdf >/dev/null || need+=(wkhtmltopdf)
command -v pdftotext >/dev/null || need+=(poppler-utils)
command -v chromium >/dev/null || need+=(chromium)
command -v promtool >/dev/null || need+=(prometheus)
command -v amtool >/dev/null || need+=(prometheus-alertmanager)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
  echo "system-deps: please install: ${need[*]}" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
