"""The only module that reads or writes files: lowbit directories, and checks of foreign weight files."""

from .atomic import atomic_dir, atomic_file, check_destination, dir_size
from .check import check_gguf, check_safetensors, checked_shards
from .checkpoint import BlockCheckpoint
from .compressed_tensors import is_compressed_tensors_dir, load_compressed_tensors, write_compressed_tensors
from .gguf_read import import_gguf
from .gptq import is_gptq_dir, load_gptq, write_gptq
from .gguf_write import write_gguf
from .load import is_lowbit_dir, load, read_config
from .lock import output_lock
from .save import quantization_config, save, write_model_dir
from .shards import Shards

__all__ = ["BlockCheckpoint", "atomic_dir", "atomic_file", "check_destination", "dir_size", "check_gguf", "check_safetensors", "checked_shards", "import_gguf", "is_compressed_tensors_dir", "is_lowbit_dir",
           "load_compressed_tensors", "write_compressed_tensors", "is_gptq_dir", "load_gptq", "write_gptq",
           "load", "output_lock", "quantization_config", "read_config", "save", "Shards", "write_gguf", "write_model_dir"]
