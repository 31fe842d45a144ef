#!/usr/bin/env bash
# Installs what omnicall needs on a fresh Debian machine (only what is missing).
# Build: pkg-config, cmake (bundled libopus), nasm (OpenH264 SIMD), libvpx-dev (VP8),
#        libasound2-dev (cpal/ALSA), libopus-dev.
# Tests: espeak-ng + sox (spoken prompts), ffmpeg (test media).
set -euo pipefail

packages=(pkg-config cmake nasm libvpx-dev libasound2-dev libopus-dev espeak-ng sox ffmpeg)
if [ "${OMNICALL_WITH_BROWSER:-0}" = 1 ]; then
  packages+=(chromium)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
sudo_cmd=""
[ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; installing Rust with rustup (https://rustup.rs)"
  command -v curl >/dev/null 2>&1 || {
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends curl ca-certificates
  }
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy ||
    { echo "setup: could not install Rust; install it with rustup and re-run" >&2; exit 1; }
  . "$HOME/.cargo/env"
fi
