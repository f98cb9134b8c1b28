"""Test-wide settings. Triton's interpreter must be chosen before any @triton.jit function is defined: here,
before pytest imports a test module. With CUDA the Triton kernel runs natively; without it, interpreted on
CPU tensors. An explicit TRITON_INTERPRET in the environment wins either way."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
