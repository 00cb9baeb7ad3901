# Fresh machine: `make demo` or `make test` install everything they need into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel on machines like the CI one; on a CUDA machine pass e.g. TORCH_SPEC="torch==2.13.0" with your index.
TORCH_SPEC ?= torch==2.13.0
MODEL_DIR := models/SmolLM2-135M-Instruct
MODEL_GGUF := models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: install demo test test-slow test-fuzz test-gpu bench fetch data clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,export]"
	touch $@

# The float model and the Q4_1 GGUF it comes from (quantization.quant_type: gguf trains on the file as it is).
fetch: install $(MODEL_DIR)/config.json $(MODEL_GGUF)

$(MODEL_DIR)/config.json $(MODEL_GGUF):
	$(PY) scripts/fetch_model.py --out $(MODEL_DIR) --gguf-out $(MODEL_GGUF)

data: install
	$(PY) scripts/make_quickstart_data.py

# Fetch the embedded default model, fine-tune it on the generated task, compare before/after.
demo: fetch
	$(VENV)/bin/finetune train recipes/quickstart.yaml --overwrite
	$(VENV)/bin/finetune eval recipes/quickstart.yaml --adapter runs/quickstart/checkpoint-final \
		--compare --generate 8 --max-new-tokens 40 --json runs/quickstart/eval.json
	printf "Extract the person's name, age and city as JSON.\n\nLena, 29, teacher, Oslo." | \
		$(VENV)/bin/finetune chat runs/quickstart/checkpoint-final --max-new-tokens 40
	$(VENV)/bin/finetune export runs/quickstart/checkpoint-final --out runs/quickstart/quickstart-q8_0.gguf \
		--type q8_0 --overwrite
	@echo "llama.cpp: llama-cli -m runs/quickstart/quickstart-q8_0.gguf -cnv"
	@echo "Ollama:    cd runs/quickstart && echo 'FROM ./quickstart-q8_0.gguf' > Modelfile && ollama create quickstart -f Modelfile && ollama run quickstart"
	@echo "Serve:     $(VENV)/bin/finetune serve runs/quickstart/checkpoint-final   # OpenAI API at http://127.0.0.1:8000/v1, model \"quickstart\""

# finetune vs TRL's SFTTrainer on the same job (ratio table; ~1 h on 2 CPU cores). Not part of `make test`.
bench: fetch
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) scripts/bench.py $(BENCH_ARGS)

# One worker per core, each test file on one worker (its module fixtures built once): 1.3-1.5x on 2 cores.
test: install
	$(PY) -m pytest -q -n auto --dist loadfile

# The long fuzzing profile and the fault-injection tests (kill, disk full, memory limit): FUZZ_EXAMPLES per property.
FUZZ_EXAMPLES ?= 3000
test-fuzz: install
	FINETUNE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s -m slow tests/test_fuzz.py tests/test_hostile.py tests/test_faults.py

test-slow: fetch
	$(PY) -m pytest -q -m slow

# The CUDA path on a GPU machine: every test prints its numbers (GPU ... lines; runs/gpu-report.json).
test-gpu: fetch
	rm -f runs/gpu-report.json
	$(PY) -m pytest -q -m gpu -s -rA tests/test_gpu.py tests/test_serve.py
	@cat runs/gpu-report.json 2>/dev/null || true

clean:
	rm -rf runs merged .pytest_cache
