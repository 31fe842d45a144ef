#!/usr/bin/env bash
# Spoken prompts for `omnicall bench call`: short questions read by espeak-ng, converted by sox to
# 16-bit mono WAV at 48 kHz (the rate WebRTC's Opus runs at).
#
#   scripts/make_prompts.sh OUT_DIR [VOICE]      # VOICE: an espeak-ng voice, default en-us
#
# Prints the paths of the prompts written, one per line.
set -euo pipefail

out=${1:?usage: scripts/make_prompts.sh OUT_DIR [VOICE]}
voice=${2:-en-us}
for tool in espeak-ng sox; do
  command -v "$tool" >/dev/null || { echo "make_prompts: $tool is missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
mkdir -p "$out"

prompts=(
  "Hello! Can you hear me?"
  "What do you see in front of the camera?"
  "Tell me something interesting about the moon."
  "What is the weather usually like in spring?"
  "Could you say that again, a little slower?"
)
raw=$(mktemp --suffix=.wav)
trap 'rm -f "$raw"' EXIT
for i in "${!prompts[@]}"; do
  wav="$out/prompt_$((i + 1)).wav"
  espeak-ng -v "$voice" -s 165 -w "$raw" "${prompts[$i]}"
  sox "$raw" -r 48000 -b 16 -c 1 "$wav"
  echo "$wav"
done
