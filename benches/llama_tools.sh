#!/usr/bin/env bash
# Build llama.cpp's command-line tools for the export checks (`llama-tokenize`,
# `llama-perplexity`, `llama-quantize`, `llama-completion`) into DEST/bin (default: ./llama-tools).
#
#     benches/llama_tools.sh "$PWD/llama-tools"     # about 20 minutes on 2 cores
#
# The source is the llama.cpp tree that the `llama-cpp-python` source distribution vendors,
# fetched from PyPI with pip (the only registry this needs); cmake comes from Debian when absent.
# The version is pinned so that the `llama_cpp_*` tests in stages/tests/export.rs compare with
# the same llama.cpp every time.
set -euo pipefail
version=0.3.36
dest=$(realpath -m "${1:-llama-tools}")
mkdir -p "$dest/src"
cd "$dest/src"
if ! ls llama_cpp_python-"$version".tar.gz >/dev/null 2>&1; then
    pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d .
fi
tar xzf llama_cpp_python-"$version".tar.gz
src="$dest/src/llama_cpp_python-$version/vendor/llama.cpp"
if ! command -v cmake >/dev/null; then
    apt-get update -qq && apt-get install -y -qq cmake
fi
cmake -S "$src" -B "$dest/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON >/dev/null
cmake --build "$dest/build" -j"$(nproc)" \
    --target llama-tokenize llama-perplexity llama-quantize llama-completion >/dev/null
mkdir -p "$dest/bin"
cp -a "$dest/build/bin/"* "$dest/bin/"
find "$dest/build" -name '*.so*' -exec cp -a {} "$dest/bin/" \;
echo "built: $dest/bin"
