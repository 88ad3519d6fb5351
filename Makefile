# sdcli: `make demo MODEL=...` renders an image, `make test` runs the suite. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
# PyPI's build by default (for Linux x86-64 the CUDA one, which also runs on a CPU); pick another with e.g. `make install TORCH="torch==2.13.0 --index-url ..."`.
TORCH  ?= torch==2.13.0
MODEL  ?= stable-diffusion-v1-5/stable-diffusion-v1-5
PROMPT ?= a photo of a cat, highly detailed
OUT    ?= demo.png
PY     := $(VENV)/bin/python
# Two levels: what rendering needs (torch and sdcli's runtime dependencies: `make demo`), and the test and
# benchmark oracles on top (diffusers, transformers, opencv, pytest...: `make test`, `make bench`).
RUNTIME_STAMP := $(VENV)/.sdcli-runtime-installed
STAMP  := $(VENV)/.sdcli-installed

RAY_STAMP := $(VENV)/.sdcli-ray-installed
SERVE_STAMP := $(VENV)/.sdcli-serve-installed
GGUF_STAMP := $(VENV)/.sdcli-gguf-installed

.PHONY: install install-runtime install-ray install-gguf install-spandrel install-serve browser demo demo-tiny test \
	bench bench-quick bench-taesd bench-controlnet bench-sdxl bench-memory bench-gguf bench-dequant bench-avx2 bench-upscale bench-tome \
	bench-serve bench-dit bench-peers bench-peers-install bench-attention clean

$(RUNTIME_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	# open_clip's tokenizer is our tokenizer oracle; its package pulls torchvision, which we do not need.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps open-clip-torch==3.3.0
	# spandrel is the upscalers' oracle; its torchvision (no CPU build for this torch) is never needed by the
	# architectures we compare (tests/test_upscale.py stubs the import), so it comes without its dependencies.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps spandrel==0.4.2 einops
	touch $(STAMP)

install: $(STAMP) browser

install-runtime: $(RUNTIME_STAMP)

# The optional Ray extra (`--ray`, ~80 MB); `make test` installs it too, since the Ray tests are in the suite.
$(RAY_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[ray]"
	touch $(RAY_STAMP)

install-ray: $(RAY_STAMP)

# The optional server extra (`sdcli serve`: Starlette + uvicorn, 4.4 MB); `make test` installs it for tests/test_serve.py.
$(SERVE_STAMP): $(RUNTIME_STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[serve]"
	touch $(SERVE_STAMP)

install-serve: $(SERVE_STAMP)

# The optional gguf extra: writing GGUF files (`sdcli convert --quantize`); reading needs nothing more. The dev extra
# has it too (the dequantizers' oracle), so `make test` gets it either way.
$(GGUF_STAMP): $(RUNTIME_STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[gguf]"
	touch $(GGUF_STAMP)

install-gguf: $(GGUF_STAMP)

# The optional spandrel extra: upscaler architectures sdcli does not run itself (SwinIR, HAT, DAT, ...). It pulls
# torchvision, which must match the installed torch (pass the same index as TORCH).
install-spandrel: $(RUNTIME_STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[spandrel]"

# tests/test_report.py opens the verify report in a real headless browser. Best effort: Debian's chromium when no
# browser is on PATH and we are root with apt-get; never fails the install (the test then says it was skipped).
BROWSERS := chromium chromium-browser google-chrome google-chrome-stable
browser:
	@for b in $(BROWSERS); do command -v $$b >/dev/null 2>&1 && exit 0; done; \
	[ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || exit 0; \
	echo "installing chromium for the browser test (apt-get, best effort)"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -q chromium >/dev/null 2>&1 || \
	{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } || \
	echo "could not install chromium; the browser test will be skipped"; exit 0

# Needs a Stable Diffusion 1.x/2.x checkpoint: MODEL=path/to/model.safetensors works offline;
# a hub id (the default) is downloaded once into the Hugging Face cache.
demo: $(RUNTIME_STAMP)
	$(VENV)/bin/sdcli generate "$(PROMPT)" --model "$(MODEL)" --seed 42 -o "$(OUT)" --overwrite

# Offline smoke render with a tiny random-weight checkpoint (the image is noise; the path is real).
demo-tiny: $(RUNTIME_STAMP)
	$(PY) scripts/make_checkpoint.py .bench/tiny-sd1.safetensors --family sd1 --size tiny --seed 0
	$(VENV)/bin/sdcli generate "$(PROMPT)" --model .bench/tiny-sd1.safetensors --steps 4 -W 64 -H 64 \
		--seed 42 -o tiny-demo.png --overwrite

test: $(STAMP) $(RAY_STAMP) $(GGUF_STAMP) $(SERVE_STAMP) browser
	$(PY) -m pytest

# sdcli vs diffusers on a full-size random SD1.5 checkpoint; writes docs/benchmarks.md. Slow on a CPU (~20 min).
bench: $(STAMP)
	$(PY) scripts/bench.py

bench-quick: $(STAMP)
	$(PY) scripts/bench.py --quick

# Only the TAESD table: a TAESD decode against the full VAE decode at 512 and 1024 (a minute or two on a CPU).
bench-taesd: $(STAMP)
	$(PY) scripts/bench.py --taesd

# one SD1.5-shaped ControlNet unit per CFG step at 512px, sdcli vs diffusers, same run
bench-controlnet: $(STAMP)
	$(PY) scripts/bench.py --controlnet

# SDXL base at 1024x1024 (and Turbo at 512) vs diffusers on a random full-size checkpoint (~7 GB in .bench/, made
# once); ~14 min on a 2-core bf16 CPU with STEPS=1, ~20 min with the default 4, ~50 with STEPS=20. Rehearsal: scripts/bench_sdxl.py --tiny --size 64 --steps 2
STEPS ?= 4
bench-sdxl: $(STAMP)
	$(PY) scripts/bench_sdxl.py --steps $(STEPS)

# peak RSS and wall of cold renders under each residency policy (keep, lean, --offload), SD1.5 512 and SDXL 1024
bench-memory: $(STAMP)
	$(PY) scripts/bench_memory.py

# GGUF Q8_0 / Q4_0 (convolutions quantized too) against bf16 on an SD1.5-shaped random checkpoint: size, peak RSS,
# load and step time, PSNR, per-type layer error (`scripts/bench_gguf.py --help` for a real file, SDXL, Q4_K).
bench-gguf: $(STAMP)
	$(PY) scripts/bench_gguf.py --convs

# what dequantizing GGUF weights adds to a FLUX.1 / SD3.5 Medium block at 512 and 1024 px (Q8_0, Q4_K vs dense
# float32; the block's peak memory too), and each type's dequantization speed (~5 min quiet on 2 cores)
bench-dequant: $(STAMP)
	$(PY) scripts/bench_dequant.py

# SD3.5 Medium at 1024 (load, one CFG step, a DIT_STEPS-step image, peak RSS) and a FLUX.1 step at full width
# (whole network if it fits in memory, else per block x depth) vs diffusers, into docs/benchmarks.md. DIT_STEPS=0
# DIT_ROUNDS=1 keeps it near 10 min on 2 cores (fp32); rehearsal: scripts/bench_dit.py --rehearse
DIT_STEPS ?= 4
DIT_ROUNDS ?= 2
bench-dit: $(STAMP)
	$(PY) scripts/bench_dit.py --steps $(DIT_STEPS) --rounds $(DIT_ROUNDS) --write

# fp32 UNet step and VAE decode vs diffusers with the kernels capped at AVX2 (what an AVX2-only CPU runs)
bench-avx2: $(STAMP)
	$(PY) scripts/bench.py --avx2

# --tome-ratio speed per ratio on the SD1.5 UNet step at 512 (interleaved, fastest of two), with its error vs ratio 0
bench-tome: $(STAMP)
	$(PY) scripts/bench_tome.py

# ESRGAN x4 (23 blocks, 64 features) 512 -> 2048 untiled and tiled vs spandrel; the table into docs/benchmarks.md
bench-upscale: $(STAMP)
	$(PY) scripts/bench_upscale.py --write

# A shell loop of 20 prompts three ways (cold generate each, --server, one prompts file) and the server's own
# overhead per request; tiny model by default, SERVE_MODEL=path/to/sd15.safetensors for a full-size one.
SERVE_MODEL ?=
bench-serve: $(SERVE_STAMP)
	$(PY) scripts/bench_serve.py $(if $(SERVE_MODEL),--model $(SERVE_MODEL)) --write

# sdcli against the CPU peers a user would pick instead: OpenVINO (optimum-intel, static shape) and
# stable-diffusion.cpp's sd-cli, same random SD1.5 weights, noise and sigmas; per CFG step, whole image, peak RSS, and
# how far each image is from sdcli's fp32 image. Each peer lives in its own environment under .bench/, installed on
# demand (a venv with the pinned CPU torch + optimum-intel; sd-cli built from source with cmake, minutes on 2 cores):
# never a dependency of sdcli. Steps, runs, threads, peers: `$(PY) scripts/bench_peers.py --help`.
PEERS_ARGS ?=
bench-peers-install:
	PYTHON="$(PYTHON)" TORCH="$(TORCH)" scripts/setup_bench_peers.sh

bench-peers: $(STAMP) bench-peers-install
	$(PY) scripts/bench_peers.py --write $(PEERS_ARGS)

# attention at SD1.5's head dims (40, 80) on the CPU: sdcli's path, each SDPA backend, padding, GEMM formulations,
# torch.compile(flex_attention), against a plain GEMM of the same FLOPs (printed, not written)
bench-attention: $(STAMP)
	$(PY) scripts/bench_attention.py

clean:
	rm -rf $(VENV) .pytest_cache .bench
