#!/usr/bin/env bash
# The load benchmark: one `omnicall serve` on loopback (tiny model) and `omnicall bench load`
# against it. Extra arguments go to the server (e.g. --no-admission, --capacity-cores 1.5);
# BENCH_ARGS to the bench (default: --calls 1,4,8,16 --turns 2).
#   scripts/load.sh [--release] [serve flags..]
set -euo pipefail
cd "$(dirname "$0")/.."
profile=debug
build=()
if [[ "${1:-}" == "--release" ]]; then
  profile=release
  build=(--release)
  shift
fi
cargo build --quiet "${build[@]}" --bin omnicall
bin="target/$profile/omnicall"
port="${PORT:-8090}"
out="target/load"
mkdir -p "$out"
"$bin" serve --model "${MODEL:-models/tiny}" --bind "127.0.0.1:$port" --udp 127.0.0.1:0 \
  --max-calls "${MAX_CALLS:-16}" "$@" >"$out/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -fs "http://127.0.0.1:$port/v1/info" >/dev/null 2>&1 && break
  sleep 0.5
done
uptime
# shellcheck disable=SC2086
"$bin" bench load --url "http://127.0.0.1:$port" --prompt tests/media/hello16k.wav \
  --server-pid "$server" ${BENCH_ARGS:---calls 1,4,8,16 --turns 2} --markdown "$out/load.md"
uptime
