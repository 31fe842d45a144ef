#!/usr/bin/env bash
# Measures the call latency end to end on this machine: builds omnicall, starts `omnicall serve` on
# loopback, makes spoken prompts (espeak-ng + sox), calls the server with `omnicall bench call`,
# and writes the CSV (one row per turn), the markdown summary, a PNG of the distribution per stage
# and a scrape of /metrics. Stops the server at the end.
#
#   scripts/latency.sh [options] [-- extra arguments of omnicall serve]
#
#   --model DIR|ID     model of the server (default models/tiny)
#   --random 3b|7b     full-size random weights of a published config instead of a checkpoint
#   --turns N          measured turns (default 5)
#   --warmup N         turns before them, left out of the figures (default 1)
#   --barge-in-at S    start the next prompt S seconds into each answer; measure how fast it stops
#   --set KIND         prompts from the spoken turn set (tests/fixtures/turn/set/KIND_*.wav: complete,
#                      pause) instead of scripts/make_prompts.sh; false cut-offs are counted per turn
#   --over KIND        with --barge-in-at: speak the set's KIND clips (backchannel, interruption) over
#                      the answers; the summary counts the answers resumed and cut, and the pause
#                      latency (onset to the server's pause) and the silence after the onset
#   --video FILE       also stream a Y4M or MP4 (H.264) file as the camera
#   --out DIR          where the results go (default target/latency)
#   --port P           server port on 127.0.0.1 (default 8089)
#   --release          build with the release profile (figures to publish; a first release build
#                      of the dependencies takes a while). Default: the dev profile, whose
#                      dependencies (candle, gemm, opus, ...) are built at opt-level 2 and only
#                      the omnicall crate is unoptimised (Cargo.toml [profile.dev.package."*"]).
#
# Environment: OMNICALL_BIN=path uses that binary and skips the build.
set -euo pipefail
cd "$(dirname "$0")/.."

model=(--model models/tiny)
turns=5
warmup=1
barge_in=()
video=()
out=target/latency
port=8089
profile=dev
serve_extra=()
set_kind=
over_kind=
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=(--model "${2:?--model needs a value}"); shift 2 ;;
    --random) model=(--model "${2:?--random needs 3b or 7b}" --random-weights); shift 2 ;;
    --turns) turns=${2:?}; shift 2 ;;
    --warmup) warmup=${2:?}; shift 2 ;;
    --barge-in-at) barge_in=(--barge-in-at "${2:?}"); shift 2 ;;
    --video) video=(--video "${2:?}"); shift 2 ;;
    --out) out=${2:?}; shift 2 ;;
    --port) port=${2:?}; shift 2 ;;
    --release) profile=release; shift ;;
    --) shift; serve_extra=("$@"); break ;;
    --set) set_kind=${2:?--set needs complete or pause}; shift 2 ;;
    --over) over_kind=${2:?--over needs backchannel or interruption}; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "latency: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

command -v curl >/dev/null || { echo "latency: curl is missing (apt-get install curl)" >&2; exit 1; }

if [ -n "${OMNICALL_BIN:-}" ]; then
  bin=$OMNICALL_BIN
elif [ "$profile" = release ]; then
  cargo build --release
  bin=target/release/omnicall
else
  cargo build
  bin=target/debug/omnicall
fi

mkdir -p "$out"
turn_set=tests/fixtures/turn/set
if [ -n "$set_kind" ]; then
  prompts=("$turn_set/$set_kind"_*.wav)
  [ -e "${prompts[0]}" ] || { echo "latency: no $turn_set/${set_kind}_*.wav" >&2; exit 1; }
else
  mapfile -t prompts < <(scripts/make_prompts.sh "$out/prompts")
fi
prompt_args=()
for p in "${prompts[@]}"; do prompt_args+=(--prompt "$p"); done
if [ -n "$over_kind" ]; then
  [ ${#barge_in[@]} -gt 0 ] || { echo "latency: --over needs --barge-in-at" >&2; exit 2; }
  over=("$turn_set/$over_kind"_*.wav)
  [ -e "${over[0]}" ] || { echo "latency: no $turn_set/${over_kind}_*.wav" >&2; exit 1; }
  for p in "${over[@]}"; do prompt_args+=(--over "$p"); done
fi

url="http://127.0.0.1:$port"
if curl -sf -o /dev/null "$url/v1/info"; then
  echo "latency: something already answers on $url; pick another --port" >&2
  exit 1
fi
echo "latency: starting $bin serve ${model[*]} on $url (log: $out/server.log)"
"$bin" serve --bind "127.0.0.1:$port" "${model[@]}" "${serve_extra[@]}" >"$out/server.log" 2>&1 &
server=$!
stop_server() {
  if kill -0 "$server" 2>/dev/null; then
    kill -INT "$server" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$server" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server" 2>/dev/null || true
  fi
  wait "$server" 2>/dev/null || true
}
trap stop_server EXIT

# a real checkpoint takes a while to load
for _ in $(seq 600); do
  curl -sf -o /dev/null "$url/v1/info" && break
  kill -0 "$server" 2>/dev/null || { echo "latency: the server stopped; see $out/server.log" >&2; tail -20 "$out/server.log" >&2; exit 1; }
  sleep 0.5
done
curl -sf -o /dev/null "$url/v1/info" || { echo "latency: the server did not come up in 5 minutes" >&2; exit 1; }

"$bin" bench call --url "$url" "${prompt_args[@]}" --turns "$turns" --warmup "$warmup" \
  "${barge_in[@]}" "${video[@]}" --udp 127.0.0.1:0 \
  --csv "$out/latency.csv" --markdown "$out/latency.md"
"$bin" bench plot --csv "$out/latency.csv" --png "$out/latency.png" \
  --title "omnicall call latency (${model[*]}, $profile build)"
curl -sf "$url/metrics" >"$out/metrics.txt" || echo "latency: no /metrics from the server" >&2
stop_server
trap - EXIT
echo "latency: results in $out: latency.csv latency.md latency.png metrics.txt server.log"
