#!/usr/bin/env bash
# Installs the optional peers that scripts/bench_peers.py compares sdcli with, under .bench/ (never a dependency of
# sdcli; `make bench-peers` runs this). Usage: scripts/setup_bench_peers.sh [openvino] [sdcpp]  (both by default).
#   openvino: its own venv .bench/openvino-venv with the pinned CPU torch, optimum-intel (OpenVINO) and diffusers.
#   sdcpp:    stable-diffusion.cpp's CLI, built from source (the copy vendored in the PyPI sdist of
#             stable-diffusion-cpp-python 0.4.7) with cmake, for this machine's CPU (GGML_NATIVE), into .bench/sdcpp.
# Each part writes a stamp when done, so a second run is instant. JOBS (default 2) sets the build's parallelism.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=.bench
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
JOBS=${JOBS:-2}
SDCPP_VERSION=0.4.7
OV_PACKAGES=${OV_PACKAGES:-"optimum-intel[openvino] diffusers transformers safetensors pillow"}
mkdir -p "$BENCH"

install_openvino() {
    local venv="$BENCH/openvino-venv" stamp="$BENCH/openvino-venv/.installed"
    [ -f "$stamp" ] && { echo "openvino: already installed ($venv)"; return; }
    test -x "$venv/bin/python" || "$PYTHON" -m venv "$venv"
    # torch first and pinned, so that optimum's dependencies do not pull another (CUDA) build.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $TORCH
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $OV_PACKAGES "$TORCH"
    # optimum-intel pulls torchvision, whose index build does not match the CPU torch ("operator torchvision::nms
    # does not exist" at import, and transformers then fails to import): the export and the pipeline never use it.
    "$venv/bin/python" -m pip uninstall --quiet --yes torchvision
    "$venv/bin/python" -c "import openvino, optimum.intel; print('openvino', openvino.__version__)"
    touch "$stamp"
}

install_sdcpp() {
    local dir="$BENCH/sdcpp" stamp="$BENCH/sdcpp/.installed"
    [ -f "$stamp" ] && { echo "sdcpp: already built ($dir/sd-cli)"; return; }
    mkdir -p "$dir"
    local sdist="$dir/stable_diffusion_cpp_python-$SDCPP_VERSION.tar.gz"
    test -f "$sdist" || "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-binary :all: --no-deps \
        "stable-diffusion-cpp-python==$SDCPP_VERSION" -d "$dir"
    local src="$dir/stable_diffusion_cpp_python-$SDCPP_VERSION/vendor/stable-diffusion.cpp"
    test -f "$src/CMakeLists.txt" || tar xzf "$sdist" -C "$dir"
    # GGML_NATIVE: the kernels for this CPU's instruction sets (AVX2/AVX512/AMX), as a user building it would get.
    cmake -S "$src" -B "$dir/build" -G "$(command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')" \
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DSD_WEBP=OFF -DSD_WEBM=OFF >/dev/null
    cmake --build "$dir/build" --target sd-cli -j "$JOBS"
    cp "$dir/build/bin/sd-cli" "$dir/sd-cli"
    "$dir/sd-cli" --version >/dev/null  # (--help prints an error line, though it exits 0)
    touch "$stamp"
}

parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(openvino sdcpp)
for part in "${parts[@]}"; do
    case "$part" in
        openvino) install_openvino ;;
        sdcpp) install_sdcpp ;;
        *) echo "unknown part '$part' (openvino, sdcpp)" >&2; exit 2 ;;
    esac
done
