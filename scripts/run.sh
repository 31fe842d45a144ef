#!/usr/bin/env bash
# Installs what is missing, builds omnicall (release) and talks to the tiny test model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release
exec target/release/omnicall chat --model models/tiny "${@:-Hello! Who are you?}"
