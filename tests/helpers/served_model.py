"""The tiny model the server tests serve, as module-scoped fixtures (import them into a test module): its
directory, and the same weights loaded separately in transformers, the oracle for the records."""

import pytest
import torch

from prodsample.testing import save_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # head_dim 32: vLLM's CPU attention has no kernel for the tiny model's default head_dim of 16
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=1, heads=2)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)
