#!/usr/bin/env bash
# Debian libraries the serving tools load: perf_analyzer links libb64. Installed once, as root via apt.
set -euo pipefail
if ldconfig -p | grep -q 'libb64\.so\.0d'; then exit 0; fi
if ! command -v apt-get >/dev/null; then
  echo "perf_analyzer needs libb64 (Debian/Ubuntu package libb64-0d); install it with your package manager." >&2
  exit 0
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing libb64-0d (perf_analyzer needs it)"
$SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq libb64-0d >/dev/null
