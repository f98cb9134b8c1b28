"""Test fixtures: a tiny causal LM and a character-level tokenizer, built locally with no hub and no download.

For tests, examples and toy runs that need a real transformers model offline (prodsample's own tests, its
README examples, `prodsample <command> --model tiny`). The tokenizer has one token per printable ASCII
character plus chat and special tokens, and a chat template, so both string and chat prompts work; the model
is a randomly initialised Llama or Qwen2 of a few hundred thousand parameters whose outputs mean nothing.
`save_tiny` writes a directory that transformers and vLLM load like any checkpoint.

Needs the `hf` extra (transformers, tokenizers), imported when a fixture is built, not on import.

Example:
    >>> from prodsample.testing import tiny_model, tiny_tokenizer
    >>> tokenizer = tiny_tokenizer()
    >>> model = tiny_model(tokenizer, arch="llama", seed=0)
    >>> model.config.vocab_size == len(tokenizer)
    True
    >>> tokenizer.decode(tokenizer("12+7=")["input_ids"], skip_special_tokens=True)
    '12+7='
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

__all__ = ["tiny_tokenizer", "tiny_config", "tiny_model", "save_tiny"]

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer():
    """A character-level `PreTrainedTokenizerFast` (pad/bos/eos set, chat template included)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + characters)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_config(tokenizer, arch: str = "llama", hidden_size: int = 64, layers: int = 2, heads: int = 4):
    """A small Llama or Qwen2 config over `tokenizer`'s vocabulary."""
    from transformers import LlamaConfig, Qwen2Config

    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if arch not in configs:
        raise ValueError(f"arch must be one of {sorted(configs)}, got {arch!r}")
    return configs[arch](
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def tiny_model(tokenizer, arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised tiny causal LM (seeded), in eval mode. Logits are scaled up so that
    its next-token distributions are far from uniform, as a trained model's are."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(tokenizer, arch, **config_kwargs), dtype=dtype)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def save_tiny(directory: str | Path, arch: str = "llama", seed: int = 0, **config_kwargs) -> Path:
    """Write a tiny model and its tokenizer to `directory` (loadable by transformers and vLLM)."""
    directory = Path(directory)
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer, arch, seed, **config_kwargs).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
