#!/usr/bin/env bash
# Builds omnicall with candle's CUDA backend (`--features cuda`), release, stripped.
#
# On a machine with the CUDA toolkit (nvcc on PATH, or CUDA_PATH set) this is just
#   CUDA_COMPUTE_CAP=90 cargo build --release --features cuda
# On a machine without one (no GPU needed to build), it fetches NVIDIA's CUDA 13.0 toolchain
# from PyPI into .cuda/ and links against a stub libcuda.so.1: the real one comes with the
# NVIDIA driver on the machine that runs the binary, which also needs libcublas.so.13,
# libcurand.so.10 and libcudart.so.13 (CUDA 13.0 runtime; e.g. LD_LIBRARY_PATH=/usr/local/cuda/lib64).
#
# Environment: CUDA_COMPUTE_CAP (default 90: H100/H200), CARGO_TARGET_DIR (default target-cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target-cuda}"

if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_PATH:-}" ]; then
  wheels="$PWD/.cuda/wheels"
  if [ ! -x "$wheels/nvidia/cu13/bin/nvcc" ]; then
    echo "build-cuda: fetching the CUDA 13.0 toolchain from PyPI into .cuda/ (about 1.2 GB)"
    python3 -m pip install --no-cache-dir --quiet --target "$wheels" \
      nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
      nvidia-nvvm==13.0.88 nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-cccl==13.0.85 \
      "nvidia-curand<10.4.1" "nvidia-cublas>=13.0,<13.1"
  fi
  export CUDA_PATH="$wheels/nvidia/cu13"
  export PATH="$CUDA_PATH/bin:$PATH"
fi

# Link directory: the toolkit's libraries under their link names, and a stub libcuda.so.1
# (the driver library) when the machine has no NVIDIA driver.
link="$PWD/.cuda/link"
mkdir -p "$link"
for lib in cublas cublasLt curand cudart nvrtc; do
  found=$(ls "$CUDA_PATH"/lib*/lib$lib.so.* 2>/dev/null | grep -v alt | head -1 || true)
  [ -n "$found" ] && ln -sf "$found" "$link/lib$lib.so"
done
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda.so.1'; then
  cargo fetch --quiet
  sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys | head -1)
  grep -ohE 'pub unsafe fn cu[A-Za-z0-9_]+\(' "$sys"/*.rs | sed -E 's/pub unsafe fn (cu[A-Za-z0-9_]+)\(/\1/' \
    | sort -u | awk '{print "void "$1"(void){}"}' > "$link/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$link/cuda_stub.c"
fi
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$link"

cargo build --release --features cuda --bin omnicall
strip -o "$CARGO_TARGET_DIR/release/omnicall-cuda" "$CARGO_TARGET_DIR/release/omnicall"
ls -l "$CARGO_TARGET_DIR/release/omnicall-cuda"
