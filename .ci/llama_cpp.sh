# Sourced by .ci/run: llama-cpp-python for tests/test_llama_cpp.py, and llama.cpp's converters (LLAMA_CPP_SRC).
# PyPI has only its source package: the first run builds a wheel (~5 min on 2 cores) into a folder inside pip's
# cache, later runs install that wheel. Built without -march=native (GGML_NATIVE=OFF: AVX2, no AVX-512), so a
# cached wheel also runs on a machine with other CPU features.
LLAMA_CPP_VERSION=0.3.36
CI_CACHE="$(python -m pip cache dir 2>/dev/null || echo "$HOME/.cache/pip")/lora_inject-ci"
mkdir -p "$CI_CACHE/wheels"
if ! ls "$CI_CACHE"/wheels/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $LLAMA_CPP_VERSION (first run only)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    python -m pip wheel -q --no-deps "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$CI_CACHE/wheels"
fi
python -m pip install -q "$CI_CACHE"/wheels/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl
LLAMA_CPP_SRC="$CI_CACHE/llama.cpp-$LLAMA_CPP_VERSION"
if [ ! -f "$LLAMA_CPP_SRC/convert_hf_to_gguf.py" ]; then
  python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$CI_CACHE/sdist"
  python - "$CI_CACHE/sdist/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz" "$LLAMA_CPP_SRC" <<'PY'
import shutil, sys, tarfile, tempfile
from pathlib import Path

archive, destination = sys.argv[1], Path(sys.argv[2])
prefix = archive.rsplit("/", 1)[-1].removesuffix(".tar.gz") + "/vendor/llama.cpp/"
keep = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")
staging = Path(tempfile.mkdtemp(dir=destination.parent))
with tarfile.open(archive) as tar:
    members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix):].startswith(keep)]
    for m in members:
        m.name = m.name[len(prefix):]
    tar.extractall(staging, members=members, filter="data")
staging.chmod(0o755)  # mkdtemp makes it 0700
shutil.rmtree(destination, ignore_errors=True)
staging.rename(destination)
PY
fi
export LLAMA_CPP_SRC
