#!/usr/bin/env bash
# The whole GPU check in one run of at most 8 minutes (so a failed run can be repeated once
# within a 15-minute lease), everything written under $OUT (at most 8 files):
#
#   env.txt         nvidia-smi, the binary's CUDA libraries, versions
#   check-f32.md    omnicall check on CUDA, f32 (parity tables against the Qwen2.5-Omni and the
#                   Qwen3-Omni fixtures)
#   check-bf16.md   the same in bf16 (with Qwen3-Omni's MoE decode paths measured, not gated)
#   bench-3b.md     omnicall bench model --config 3b --device cuda --dtype bf16, every stage,
#                   20 timed turns, KV growth over a 60 s call with a camera, the engine's CPU
#                   overhead over a 30 s call, peak GPU memory
#   reference-3b.json  scripts/reference_bench.py at the same shapes on the same GPU
#   bench-7b.md, reference-7b.json  the same at 7B (the reference only if time is left)
#   gpu-check.log   every command, its output and how long it took
#
# On the GPU machine (the device tool's `run`, carry [".gpu"]):
#   scripts/gpu-check.sh
# It unpacks the CUDA binary from .gpu/omnicall-cuda.xz, made here with
#   scripts/build-cuda.sh && mkdir -p .gpu &&
#   xz -T0 -9 -c target-cuda/release/omnicall-cuda > .gpu/omnicall-cuda.xz
# (or --binary PATH). The CUDA 13 runtime libraries (cuBLAS, cuRAND, cudart) come from the
# machine's PyTorch install: `python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))'`
# gives torch's folder; its lib/ and every nvidia/*/lib (and nvidia/cu13/lib) folder of the
# same site-packages go on LD_LIBRARY_PATH; the driver's libcuda.so.1 is the system's.
#
# Here, without a GPU: scripts/gpu-check.sh --cpu-dry-run [--binary target/debug/omnicall]
# runs the same steps on the CPU build at the tiny model's shapes (models/tiny), a short
# engine run, and the reference bench only where torch is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

dry_run=0
binary=""
budget=${GPU_CHECK_BUDGET:-450}
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) dry_run=1 ;;
    --binary) binary="$2"; shift ;;
    --budget) budget="$2"; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

out=${OUT:-$root/target/gpu-check}
mkdir -p "$out"
log="$out/gpu-check.log"
: >"$log"
start=$(date +%s)
failures=()
summary=()

say() { echo "gpu-check: $*" | tee -a "$log"; }
left() { echo $((budget - ($(date +%s) - start))); }

# step NAME SECONDS OUTFILE COMMAND...: runs COMMAND with at most SECONDS (and never past the
# budget), stdout to OUTFILE (or the log), stderr to the log; records how it went.
step() {
  local name=$1 limit=$2 dest=$3
  shift 3
  local remaining
  remaining=$(left)
  if [ "$remaining" -lt 10 ]; then
    say "$name: skipped, the budget of ${budget} s is spent"
    summary+=("$name: skipped (budget)")
    failures+=("$name")
    return 1
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  say "$name (at most ${limit} s): $*"
  local t0=$SECONDS rc
  if [ "$dest" = - ]; then
    timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  else
    timeout --kill-after=5 "$limit" "$@" >>"$dest" 2>>"$log"
  fi
  rc=$?
  local took=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then
    summary+=("$name: ok (${took} s)")
  else
    [ $rc -eq 124 ] && say "$name: timed out after ${limit} s"
    summary+=("$name: FAILED, exit $rc (${took} s)")
    failures+=("$name")
  fi
  say "$name: exit $rc after ${took} s"
  return $rc
}

# The GPU's used memory, sampled every 200 ms between start_sampler and stop_sampler, whose
# peak is appended to the file stop_sampler names.
sampler=""
samples=""
start_sampler() {
  [ $dry_run -eq 1 ] && return
  command -v nvidia-smi >/dev/null || return
  samples=$(mktemp)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$samples" 2>/dev/null &
  sampler=$!
}
stop_sampler() {
  [ -n "$sampler" ] || return 0
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  local peak
  peak=$(sort -n "$samples" | tail -1)
  printf '\npeak GPU memory in use while it ran (nvidia-smi, whole device): %s MiB\n' "${peak:-?}" >>"$1"
  rm -f "$samples"
  sampler=""
}

# --- the binary and the environment ------------------------------------------------------
if [ $dry_run -eq 1 ]; then
  device=cpu
  bench_dtype=f32
  configs=(models/tiny)
  turns=2
  call_seconds=10
  overhead_seconds=4
  [ -n "$binary" ] || binary=$root/target/debug/omnicall
else
  device=cuda
  bench_dtype=bf16
  configs=(3b 7b)
  turns=20
  call_seconds=60
  overhead_seconds=30
  if [ -z "$binary" ]; then
    if [ -f .gpu/omnicall-cuda.xz ]; then
      binary=/tmp/omnicall-cuda
      xz -dc .gpu/omnicall-cuda.xz >"$binary" && chmod +x "$binary"
    else
      binary=$root/target-cuda/release/omnicall-cuda
    fi
  fi
  torch_dir=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))' 2>>"$log")
  if [ -n "$torch_dir" ]; then
    site=$(dirname "$torch_dir")
    libs="$torch_dir/lib"
    for d in "$site"/nvidia/*/lib "$site"/nvidia/cu13/lib; do
      [ -d "$d" ] && libs="$libs:$d"
    done
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  else
    say "no PyTorch found: the CUDA libraries must already be on LD_LIBRARY_PATH"
  fi
fi
if [ ! -x "$binary" ]; then
  say "no omnicall binary at $binary (build it, or pass --binary PATH)"
  exit 2
fi

{
  echo "# gpu-check environment ($(date -u +%FT%TZ))"
  echo "dry run: $dry_run; binary: $binary; budget: ${budget} s"
  if [ $dry_run -eq 0 ]; then
    nvidia-smi 2>&1
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    echo "## libraries the binary links"
    ldd "$binary" 2>&1
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)' 2>&1
  else
    echo "no GPU: CPU build, tiny shapes"
    nproc
  fi
  "$binary" --version 2>&1
} >"$out/env.txt"
if [ $dry_run -eq 0 ] && grep -q 'not found' "$out/env.txt"; then
  say "the binary misses libraries (env.txt): $(grep 'not found' "$out/env.txt" | tr -s ' \t' ' ' | tr '\n' ';')"
fi
summary+=("environment: env.txt")

# --- parity on the device ----------------------------------------------------------------
# Every fixture folder's table goes into the same check-DTYPE.md, one after the other; the
# family (and so the stages) comes from each folder's model/config.json.
fixture_dirs=(tests/fixtures/reference/a tests/fixtures/qwen3-omni)
# Qwen3-Omni's greedy MoE decode paths exceed the dense bf16 tolerances (docs/qwen3-omni.md,
# "bf16 and Qwen3-Omni's experts"): in bf16 they are measured, their failures not counted. The
# MoE forward passes are gated, a router's near tie allowed at a tenth of the positions.
qwen3_bf16_measured=qwen3_thinker_greedy,qwen3_talker_greedy
qwen3_bf16_gated=qwen3_rope_index_text,qwen3_rope_index_multimodal,qwen3_mel,qwen3_audio_encoder,qwen3_audio_encoder_streaming,qwen3_vision_encoder,qwen3_thinker_logits,qwen3_thinker_cache_truncation,qwen3_thinker_mm_logits,qwen3_talker_logits,qwen3_code_predictor,qwen3_code2wav,qwen3_code2wav_chunked,qwen3_code2wav_streaming
for dtype in f32 bf16; do
  : >"$out/check-$dtype.md"
  for fixtures in "${fixture_dirs[@]}"; do
    name=$(basename "$fixtures")
    stages=()
    if [ "$name" = qwen3-omni ] && [ "$dtype" = bf16 ]; then
      stages=(--stages "$qwen3_bf16_gated")
    fi
    step "check $fixtures $dtype" 60 "$out/check-$dtype.md" \
      "$binary" check --reference "$fixtures" --device "$device" --dtype "$dtype" "${stages[@]}"
    echo >>"$out/check-$dtype.md"
  done
done
{
  echo "## measured, not gated: Qwen3-Omni's MoE decode paths in bf16"
  timeout --kill-after=5 60 "$binary" check --reference tests/fixtures/qwen3-omni \
    --device "$device" --dtype bf16 \
    --stages "$qwen3_bf16_measured" 2>>"$log"
} >>"$out/check-bf16.md" || say "check qwen3-omni bf16 MoE decode paths: measured, some rows beyond the dense bf16 tolerances"

# --- speed: omnicall, then the reference at the same shapes -------------------------------
# Seconds each bench stage may take at most (at 3B/7B on an H200 each should take far less).
declare -A stage_limit=([thinker]=45 [audio]=20 [vision]=30 [speech]=45 [engine-input]=15 [engine]=120)
for config in "${configs[@]}"; do
  name=$(basename "$config")
  # One stage at a time, each appended as it ends: a stage that runs out of time costs only
  # its own rows.
  : >"$out/bench-$name.md"
  start_sampler
  for stage in thinker audio vision speech engine-input engine; do
    limit=${stage_limit[$stage]}
    step "bench $name $stage" "$limit" "$out/bench-$name.md" \
      "$binary" bench model --config "$config" --device "$device" --dtype "$bench_dtype" \
      --stages "$stage" --turns "$turns" --call-seconds "$call_seconds" \
      --overhead-seconds "$overhead_seconds"
  done
  stop_sampler "$out/bench-$name.md"

  if [ "$config" = models/tiny ]; then ref_config=models/tiny/config.json; else ref_config=models/$config/config.json; fi
  if ! python3 -c 'import torch, transformers' 2>/dev/null; then
    say "reference $name: skipped, python3 has no torch/transformers here"
    summary+=("reference $name: skipped (no torch)")
    [ $dry_run -eq 0 ] && failures+=("reference $name")
    continue
  fi
  # The 7B reference only when enough is left for it and the summary.
  if [ "$name" = 7b ] && [ "$(left)" -lt 100 ]; then
    say "reference 7b: skipped, $(left) s left"
    summary+=("reference 7b: skipped (time)")
    continue
  fi
  step "reference $name" 120 - env PYTHONUNBUFFERED=1 python3 scripts/reference_bench.py \
    --config "$ref_config" --device "$device" --dtype "$bench_dtype" --iters 3 \
    --out "$out/reference-$name.json"
done

# --- summary (the last lines of the output) -----------------------------------------------
say "done in $(($(date +%s) - start)) s; files under $out:"
ls -l "$out" | tee -a "$log"
for line in "${summary[@]}"; do say "  $line"; done
for f in "$out"/check-*.md; do
  [ -f "$f" ] && say "  $(basename "$f"): $(grep ' comparisons, ' "$f" | tr '\n' ';')"
done
if [ ${#failures[@]} -gt 0 ]; then
  say "FAILED: ${failures[*]}"
  exit 1
fi
say "all steps passed"
