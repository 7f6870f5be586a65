# One command each, on a fresh machine: `make demo`, `make test`.
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: install demo demo-real test test-fast bench clean

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
SMOLLM2 := models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
demo-real: outputs/smollm2/prior/lmcoh.json
	.venv/bin/accelerate launch --num_processes 1 --cpu recipes/self_train.py --config recipes/configs/smollm2_cpu.yaml

outputs/smollm2/prior/lmcoh.json: | install smollm2
	$(PY) -m lmcoh pretrain mountain_race --base $(SMOLLM2) --format natural --out outputs/smollm2/prior

# Two worker processes (the tests are single-threaded); models several tests need are built once
# and shared between them (tests/conftest.py, shared_model).
test: install
	$(PY) -m pytest -q -n 2 --maxschedchunk 1

test-fast: install
	$(PY) -m pytest -q -n 2 --maxschedchunk 1 -m "not slow"

bench: install
	$(PY) -m lmcoh.bench

clean:
	rm -rf .venv outputs build *.egg-info
