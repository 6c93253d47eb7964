VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test demo clean gpu-check

# torch 2.13.0 (CPU) is installed first only where no torch is present, so pip never pulls a CUDA build;
# youtokentome needs Cython already installed and no build isolation.
# Rebuilt when setup.py or the C++ kernels change (pip install -e builds kernels._C in place).
$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install Cython setuptools wheel
	$(PY) -c "import youtokentome" 2>/dev/null || $(PIP) install --no-build-isolation youtokentome==1.0.6
	$(PIP) install --no-deps clip-anytorch
	$(PIP) install --no-build-isolation -e ".[test,deepspeed]"
	touch $@

install: $(VENV)/.installed

DEMO_PROMPTS := a large red circle on the middle left|a small blue square at the top left|the bottom right has a large yellow triangle|large green circle, top center

# Trains a VAE and then a small DALL-E on the built-in shapes data, and a CLIP on the same data (about 12 minutes on 2
# CPU cores), then samples, best first by the CLIP, and scores the samples with and without CLIP reranking.
demo: install
	$(PY) train.py --dalle_output_file_name demo/dalle --epochs 1 --num_samples 30000 --batch_size 32 --learning_rate 1e-3 \
		--dim 128 --depth 4 --heads 4 --dim_head 32 --text_seq_len 16 --attn_types full,axial_row,axial_col,conv_like \
		--bpe_vocab_size 100 --sample_every_n_steps 200 --num_workers 0 --no-shift_tokens
	$(PY) train_clip.py --clip_output_file_name demo/clip --epochs 1 --num_samples 30000 --batch_size 64 \
		--learning_rate 1e-3 --dim_text 128 --dim_image 128 --dim_latent 128 --text_enc_depth 2 --visual_enc_depth 2 \
		--text_seq_len 16 --visual_image_size 32 --visual_patch_size 8 --bpe_vocab_size 100 --num_workers 0
	$(PY) generate.py --dalle_path demo/dalle.safetensors --clip_path demo/clip.safetensors --text '$(DEMO_PROMPTS)' \
		--num_images 8 --batch_size 8 --outputs_dir outputs --seed 0
	$(PY) -m engine.eval_demo --dalle_path demo/dalle.safetensors --clip_path demo/clip.safetensors \
		--images_per_prompt 32 --json demo/eval.json --save_dir demo/eval

test: install
	$(PY) -m pytest -q tests

# On a GPU machine with torch and Triton preinstalled and no network: build kernels._C in place, run the GPU tests
# (Triton's kernels, in its CPU interpreter and natively; the attention benchmark's tiny CUDA run; the CUDA-graph
# compiled decode step against the full forward pass), then benchmark sampling and attention on the GPU. Uses `python`
# from PATH, not the venv. --noconftest: tests/conftest.py imports the model, whose dependencies may be missing there
# (test_decode.py needs them). The benchmarks run even if a test fails; the exit status is the first failure's. The
# attention table is printed last (JSON: bench/generate-gpu.json, bench/attn-gpu.json).
gpu-check:
	python setup.py build_ext --inplace
	status=0; \
	if python -c "import pytest" 2>/dev/null; then \
		python -m pytest -q --noconftest tests/test_triton_attention.py tests/test_triton_decode.py \
			tests/test_bench_attn.py tests/test_dispatch.py -k "triton or cuda or gpu" || status=$$?; \
		python -m pytest -q tests/test_decode.py -k cuda || status=$$?; \
	else echo "pytest is not installed: GPU tests not run"; status=1; fi; \
	python bench/generate.py --device cuda --json bench/generate-gpu.json || { rc=$$?; [ $$status -ne 0 ] || status=$$rc; }; \
	python bench/attn.py --device cuda --json bench/attn-gpu.json || { rc=$$?; [ $$status -ne 0 ] || status=$$rc; }; \
	exit $$status

clean:
	rm -rf $(VENV) build *.egg-info demo outputs kernels/_C*.so
