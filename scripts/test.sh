#!/usr/bin/env bash
# Installs what is missing, then runs the whole test suite (unit, integration, parity, end to end).
set -euo pipefail
cd "$(dirname "$0")/.."
OMNICALL_WITH_BROWSER=1 scripts/setup.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo test --all-targets --no-fail-fast "$@"
# the hand-written kernels are a crate of their own: --all-targets does not reach its tests
cargo test -p omnicall-kernels --no-fail-fast
# The parity tests again through the device-generic products a GPU runs (the CPU's own bf16
# decode kernel switched off): only the bf16 runs take a different path.
OMNICALL_KERNELS=generic cargo test --test reference_parity --no-fail-fast bf16
