# One command each, on a fresh machine: `make demo`, `make test`.
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: install demo test test-fast bench clean

install: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $@

demo: install
	.venv/bin/accelerate launch --num_processes 1 --cpu recipes/self_train.py --config recipes/configs/mountain_race.yaml

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
