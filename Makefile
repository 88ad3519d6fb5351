# sdcli: `make demo MODEL=...` renders an image, `make test` runs the suite. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
# The CPU wheel by default; pick another build with e.g. `make install TORCH="torch==2.13.0 --index-url ..."`.
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

.PHONY: install install-runtime install-ray browser demo demo-tiny test bench bench-quick bench-taesd bench-controlnet bench-sdxl bench-memory bench-avx2 clean

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

test: $(STAMP) $(RAY_STAMP) browser
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

# fp32 UNet step and VAE decode vs diffusers with the kernels capped at AVX2 (what an AVX2-only CPU runs)
bench-avx2: $(STAMP)
	$(PY) scripts/bench.py --avx2

clean:
	rm -rf $(VENV) .pytest_cache .bench
