"""What every accuracy benchmark needs first: a header naming the run, the source model, the text."""

import platform
import subprocess

import torch

from lowbit.calib import load as load_text
from lowbit.models import load_source


def start(details: str = ""):
    """Print the run header; return (loaded source, held-out evaluation text)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# {platform.machine()}, torch threads {torch.get_num_threads()}, commit {commit}, "
          f"python {platform.python_version()}" + (f"; {details}" if details else ""))
    return load_source(), load_text("eval")
