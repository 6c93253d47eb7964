VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test demo clean gpu-check gpu-check-quick

# torch 2.13.0 (CPU) is installed first only where no torch is present, so pip never pulls a CUDA build;
# youtokentome needs Cython already installed and no build isolation.
# Debian's chromium and chromedriver are installed where chromedriver is missing: tests/test_serve_browser.py drives
# serve.py's web page in a real browser.
# Rebuilt when setup.py or the C++ kernels change (pip install -e builds kernels._C in place).
$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install Cython setuptools wheel
	$(PY) -c "import youtokentome" 2>/dev/null || $(PIP) install --no-build-isolation youtokentome==1.0.6
	$(PIP) install --no-deps clip-anytorch
	$(PIP) install --no-build-isolation -e ".[test,deepspeed]"
	command -v chromedriver >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; }
	touch $@

install: $(VENV)/.installed

DEMO_PROMPTS := a large red circle on the middle left|a small blue square at the top left|the bottom right has a large yellow triangle|large green circle, top center

SEED ?= 0

# Trains a VAE and then a small DALL-E on the built-in shapes data, and a CLIP on the same data (about 8 minutes on 2
# CPU cores), then samples, best first by the CLIP, and scores the samples with and without CLIP reranking. SEED=N seeds
# the data, the models and the samples: the same SEED repeats the same figures.
demo: install
	$(PY) train.py --seed $(SEED) --dalle_output_file_name demo/dalle --epochs 2 --num_samples 30000 --batch_size 32 \
		--learning_rate 1e-3 --attn_dropout 0.1 --ff_dropout 0.1 --dim 128 --depth 4 --heads 4 --dim_head 32 \
		--text_seq_len 16 --attn_types full,axial_row,axial_col,conv_like --bpe_vocab_size 400 --sample_every_n_steps 200 \
		--num_workers 0 --no-shift_tokens
	$(PY) train_clip.py --seed $(SEED) --clip_output_file_name demo/clip --epochs 1 --num_samples 30000 \
		--batch_size 64 --learning_rate 1e-3 --dim_text 128 --dim_image 128 --dim_latent 128 --text_enc_depth 2 --visual_enc_depth 2 \
		--text_seq_len 16 --visual_image_size 32 --visual_patch_size 8 --bpe_vocab_size 400 --num_workers 0
	$(PY) generate.py --dalle_path demo/dalle.safetensors --clip_path demo/clip.safetensors --text '$(DEMO_PROMPTS)' \
		--num_images 8 --batch_size 8 --outputs_dir outputs --seed $(SEED)
	$(PY) -m engine.eval_demo --seed $(SEED) --dalle_path demo/dalle.safetensors --clip_path demo/clip.safetensors \
		--images_per_prompt 32 --json demo/eval.json --save_dir demo/eval

test: install
	DALLE_ENGINE_REQUIRE_BROWSER=1 $(PY) -m pytest -q tests

# On a GPU machine with torch and Triton preinstalled and no network (`python` from PATH, not the venv): build
# kernels._C in place, then bench/gpu_check.py: GPU correctness (tests/test_triton_gpu.py and the CUDA tests), the
# attention, sampling and training benchmarks and, time permitting, the static report; each part in child processes
# with its own time budget, so one failing or hanging part never stops the others. Under 8 minutes on one H100; the
# README lists each part's estimate. Writes bench/gpu-check.json and bench/gpu-check-logs/, appends a dated section
# to bench/RESULTS.md and prints the summary table last. The exit status is the first failure's (the build's
# included). gpu-check-quick (under 4 minutes) needs no build: its parts run only GPU code.
# `python bench/gpu_check.py --dry-run` runs the same on a CPU (tests/test_gpu_check.py).
gpu-check:
	status=0; python setup.py build_ext --inplace || status=$$?; \
	python bench/gpu_check.py || { rc=$$?; [ $$status -ne 0 ] || status=$$rc; }; \
	exit $$status

gpu-check-quick:
	python bench/gpu_check.py --quick

clean:
	rm -rf $(VENV) build *.egg-info demo outputs kernels/_C*.so
