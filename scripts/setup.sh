#!/usr/bin/env bash
# One-time (and idempotent) setup of the CPU stack: Debian packages, .venv, pip, this project.
# Re-running is fast: each step is skipped when its stamp matches. Used by the README's two
# commands and by .ci/run.
#
#   bash scripts/setup.sh            # everything
#   FLASHCACHE_SKIP_APT=1 bash ...   # no apt-get (you installed the packages yourself)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FLASHCACHE_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

log() { printf '[setup] %s\n' "$*" >&2; }

# ffmpeg: test videos; redis-server: session store (also TLS and, with --sentinel, Sentinel in
# the HA tests); openssl: the TLS test's certificates; GStreamer RTSP server: RTSP tests.
apt_packages=(ffmpeg redis-server openssl python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp
              gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
              gstreamer1.0-plugins-ugly gstreamer1.0-libav)

install_apt() {
    [ "${FLASHCACHE_SKIP_APT:-0}" = 1 ] && { log "apt: skipped (FLASHCACHE_SKIP_APT=1)"; return; }
    local missing=()
    for pkg in "${apt_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && { log "apt: all ${#apt_packages[@]} packages present"; return; }
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    log "apt: installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

quiet_pip() {
    # pip warns once per package about index folders this machine does not have; keep errors.
    "$venv/bin/pip" "$@" 2>&1 | grep -v "^WARNING: Location 'file://" || return "${PIPESTATUS[0]}"
}

install_python() {
    [ -x "$venv/bin/python" ] || { log "venv: creating $venv"; "$python" -m venv "$venv"; }
    local stamp="$venv/.flashcache-stack" want
    want="$(cat "$root/requirements/cpu-stack.txt" "$root/requirements/no-deps.txt" | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        log "pip: stack up to date"
    else
        log "pip: installing the CPU stack (about 2 minutes on a fresh machine)"
        quiet_pip install -q --upgrade pip
        quiet_pip install -q -r "$root/requirements/cpu-stack.txt"
        # sglang's declared deps are the CUDA stack; its pure-python needs are in cpu-stack.txt.
        quiet_pip install -q --no-deps -r "$root/requirements/no-deps.txt"
        echo "$want" > "$stamp"
    fi
    # Checked from / so the checkout's own folder on sys.path cannot stand in for the install,
    # and against this checkout so a venv installed from another clone is re-pointed.
    if ! (cd / && "$venv/bin/python" -c "
import sys, flashcache_sglang, flashcache_sglang.kernels, flashcache_sglang.streaming
sys.exit(not flashcache_sglang.__file__.startswith(sys.argv[1] + '/'))" "$root") 2>/dev/null; then
        log "pip: installing flashcache-sglang (editable)"
        quiet_pip install -q --no-deps -e "$root"
    fi
}

install_apt
install_python
log "done: $venv"
