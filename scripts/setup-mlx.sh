#!/usr/bin/env bash
# Idempotent: make `cargo build` / `cargo test` of mlx-rs 0.33
# (mlx-sys 0.7.0) work on Linux x86_64 with MLX's CPU backend. Everything it
# generates lands in .mlx/ (gitignored); Cargo.toml patches mlx-sys to .mlx/mlx-sys.
#   MLX_WHEEL=mlx-cpu (default). An mlx-cuda-* wheel's MLXConfig.cmake also wants CMake to
#   find a CUDA toolkit + cuDNN (untested); for CUDA, build with mlx-cpu and put that
#   wheel's libmlx.so first on LD_LIBRARY_PATH at run time (same headers and symbols).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
GEN=$ROOT/.mlx
MLX_SYS_VERSION=0.7.0
MLX_VERSION=0.32.2        # must equal the MLX tag that mlx-c pins inside mlx-sys 0.7.0
MLX_WHEEL=${MLX_WHEEL:-mlx-cpu}
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo

# 1. Build tools: CMake (mlx-c) and libclang + clang's builtin headers (bindgen).
if ! command -v cmake >/dev/null || ! ls /usr/lib/llvm-*/lib/libclang.so.* /usr/lib/llvm-*/lib/clang/*/include/stddef.h >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  pkgs="cmake libclang-dev"                      # generic (pulls ~240 MB libclang-14-dev)
  if apt-cache show libclang1-14 >/dev/null 2>&1; then
    pkgs="cmake libclang1-14 libclang-common-14-dev"   # Debian 12: all bindgen needs
  fi
  $SUDO apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi

# 2. MLX itself (libmlx.so, headers, MLXConfig.cmake) from its PyPI wheel.
if [ ! -f "$GEN/mlx-wheel/.ok-$MLX_WHEEL-$MLX_VERSION" ]; then
  rm -rf "$GEN/mlx-wheel"
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
    --no-deps --only-binary=:all: --target "$GEN/mlx-wheel" "$MLX_WHEEL==$MLX_VERSION"
  touch "$GEN/mlx-wheel/.ok-$MLX_WHEEL-$MLX_VERSION"
fi

# 3. mlx-sys source from crates.io (through cargo), patched for Linux.
PATCH=$ROOT/scripts/mlx-sys-$MLX_SYS_VERSION-linux.patch
STAMP=.ok-$MLX_SYS_VERSION-$(sha256sum "$PATCH" | cut -c1-16)
if [ ! -f "$GEN/mlx-sys/$STAMP" ]; then
  tmp=$(mktemp -d)
  mkdir -p "$tmp/src" && : > "$tmp/src/lib.rs"
  cat > "$tmp/Cargo.toml" <<TOML
[package]
name = "mlx-sys-fetch"
version = "0.0.0"
edition = "2021"
[dependencies]
mlx-sys = { version = "=$MLX_SYS_VERSION", default-features = false }
[workspace]
TOML
  # run in $tmp so that the project's own cargo config/[patch] does not apply
  src=$(cd "$tmp" && cargo metadata -q --format-version 1 |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="mlx-sys"))')
  rm -rf "$GEN/mlx-sys" "$tmp"
  mkdir -p "$GEN"
  cp -r "$(dirname "$src")" "$GEN/mlx-sys"
  patch -s -p1 -d "$GEN/mlx-sys" < "$PATCH"
  touch "$GEN/mlx-sys/$STAMP"
fi
echo "mlx setup done: $MLX_WHEEL==$MLX_VERSION in .mlx/mlx-wheel, patched mlx-sys in .mlx/mlx-sys"
