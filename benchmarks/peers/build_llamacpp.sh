#!/usr/bin/env bash
# llama.cpp's own command-line tools, the peers of issues 18/19/20 (llama-server, llama-bench,
# llama-perplexity, llama-quantize, llama-cli, llama-completion), built from the llama.cpp that the
# llama-cpp-python sdist vendors (the same version as the scratch venv of benchmarks/vs_llamacpp.py),
# for this CPU (-DGGML_NATIVE=ON), statically linked so each binary stands alone, and installed into
# $LOWBIT_PEERS/llamacpp/bin (default ~/.cache/lowbit/peers/llamacpp/bin), never into lowbit.
# Idempotent: the sdist is downloaded once, the build directory is reused (make only rebuilds what
# changed), binaries already installed are kept. About 10-20 min on 2 cores the first time.
#
#     bash benchmarks/peers/build_llamacpp.sh        # prints the bin directory on its last line
set -euo pipefail

VERSION=0.3.36
PEERS=${LOWBIT_PEERS:-$HOME/.cache/lowbit/peers}
BIN=$PEERS/llamacpp/bin
SRC=$PEERS/src
TOOLS=(llama-perplexity llama-completion llama-quantize llama-bench llama-server llama-cli)
JOBS=${JOBS:-2}

missing=()
for t in "${TOOLS[@]}"; do [[ -x $BIN/$t ]] || missing+=("$t"); done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$SRC" "$BIN"
sdist=$SRC/llama_cpp_python-$VERSION.tar.gz
if [[ ! -f $sdist ]]; then
    python -m pip download "llama-cpp-python==$VERSION" --no-binary :all: --no-deps -d "$SRC"
fi
tree=$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp
if [[ ! -f $tree/CMakeLists.txt ]]; then
    tar -xzf "$sdist" -C "$SRC"
fi

build=$SRC/build-llamacpp-$VERSION
if [[ ! -f $build/CMakeCache.txt ]]; then
    # no network at run time and no extra system libraries: no curl, no OpenSSL, no downloaded web UI
    cmake -S "$tree" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
fi
for t in "${missing[@]}"; do  # one at a time, each installed when built: the server (the longest) last
    nice -n ${NICE:-10} cmake --build "$build" --config Release -j "$JOBS" --target "$t"
    install -m 755 "$build/bin/$t" "$BIN/$t"
done
for t in "${TOOLS[@]}"; do  # each starts and prints its usage (llama-quantize --help exits 1)
    out=$("$BIN/$t" --help 2>&1 || true)
    [[ $out == *usage* ]] || { echo "$BIN/$t does not run: ${out: -500}" >&2; exit 1; }
done
echo "$BIN"
