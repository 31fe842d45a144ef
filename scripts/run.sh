#!/usr/bin/env bash
# Installs what is missing, builds omnicall (release) and serves the browser video call on the
# tiny test model: open http://127.0.0.1:8080 and press Call. Arguments go to `omnicall serve`
# (e.g. --model /path/to/Qwen2.5-Omni-3B --dtype bf16 --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --release
args=("$@")
case " ${args[*]} " in
  *" --model "*) ;;
  *) args=(--model models/tiny "${args[@]}") ;;
esac
echo "omnicall: open http://127.0.0.1:8080 in Chromium or Firefox (Ctrl-C stops the server)"
exec target/release/omnicall serve "${args[@]}"
