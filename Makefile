VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test demo clean

# torch 2.13.0 (CPU) is installed first only where no torch is present, so pip never pulls a CUDA build;
# youtokentome needs Cython already installed and no build isolation.
$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install Cython setuptools wheel
	$(PY) -c "import youtokentome" 2>/dev/null || $(PIP) install --no-build-isolation youtokentome==1.0.6
	$(PIP) install --no-deps clip-anytorch
	$(PIP) install --no-build-isolation -e ".[test,deepspeed]"
	touch $@

install: $(VENV)/.installed

DEMO_PROMPTS := a large red circle on the middle left|a small blue square at the top left|the bottom right has a large yellow triangle|large green circle, top center

# Trains a VAE and then a small DALL-E on the built-in shapes data (a few minutes on 2 CPU cores), then samples.
demo: install
	$(PY) train.py --dalle_output_file_name demo/dalle --epochs 1 --num_samples 30000 --batch_size 32 --learning_rate 1e-3 \
		--dim 128 --depth 4 --heads 4 --dim_head 32 --text_seq_len 16 --attn_types full,axial_row,axial_col,conv_like \
		--bpe_vocab_size 100 --sample_every_n_steps 200 --num_workers 0 --no-shift_tokens
	$(PY) generate.py --dalle_path demo/dalle.safetensors --text '$(DEMO_PROMPTS)' --num_images 8 --batch_size 8 \
		--outputs_dir outputs --seed 0
	$(PY) -m engine.eval_demo --dalle_path demo/dalle.safetensors --json demo/eval.json --save_dir demo/eval

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info demo outputs
