"""What fixes the run's arithmetic: the autocast precision, and seeding and determinism."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``optim.amp`` on ``device``; ``auto``: bf16 on GPUs that have it
    (no GradScaler, so none of its per-step host syncs), fp16 on other GPUs, none on the CPU."""
    if amp == "auto":
        amp = ("none" if device.type != "cuda" else
               "bf16" if torch.cuda.is_bf16_supported() else "fp16")
    return AMP_DTYPES[amp]


def amp_name(dtype: torch.dtype | None) -> str:
    return next(name for name, d in AMP_DTYPES.items() if d == dtype)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; ``deterministic``: deterministic kernels (warning where
    none exists), else cuDNN's autotuner."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True
