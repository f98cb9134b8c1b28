"""Where `prodsample reward` draws its rollouts: transformers (`prodsample.hf.guided_generate`) or vLLM's engine
(`prodsample.vllm.GuidedLLM`). Both return the same `GuidedRollout` for the same `SamplingSettings`; the vLLM
engine batches every request of a call (two per guided rollout), runs each row only as long as its rollout,
and was the faster of the two on this CPU in the recorded benchmarks (docs/cli.md, "Which hint")."""

from __future__ import annotations

from dataclasses import dataclass

from prodsample import SamplingSettings
from prodsample.rollout import GuidedRollout

from . import harness
from .errors import UsageError

BACKENDS = ("hf", "vllm")


@dataclass
class RolloutSource:
    generate: object  # (prompts, answers, SamplingSettings) -> GuidedRollout
    tokenizer: object
    eos_ids: set[int]  # a completion ending in one of these finished; any other was cut off
    name: str
    source: str
    device: str


def open_backend(backend: str, args, seed: int) -> RolloutSource:
    """The rollout source `--backend` names, on `--model` / `--dtype` / `--device`."""
    if backend == "hf":
        return _hf(args, seed)
    if backend == "vllm":
        return _vllm(args, seed)
    raise UsageError(f"--backend must be one of {BACKENDS}, got {backend!r}")


def _hf(args, seed: int) -> RolloutSource:
    from prodsample.hf import guided_generate

    loaded = harness.load_model_from_args(args, seed=seed)

    def generate(prompts, answers, settings: SamplingSettings) -> GuidedRollout:
        return guided_generate(loaded.model, loaded.tokenizer, prompts, answers, settings)

    ids = loaded.model.generation_config.eos_token_id
    eos = set() if ids is None else {ids} if isinstance(ids, int) else set(ids)
    if loaded.tokenizer.eos_token_id is not None:
        eos.add(loaded.tokenizer.eos_token_id)
    return RolloutSource(generate, loaded.tokenizer, eos, loaded.name, loaded.source, str(loaded.model.device))


def _vllm(args, seed: int) -> RolloutSource:
    from prodsample.vllm import GuidedLLM

    from .vllm_generate import model_directory

    if args.device not in (None, "cpu"):
        raise UsageError(f"--backend vllm runs the installed vLLM engine's own device; drop --device {args.device}")
    path = model_directory(args.model) if args.model in ("smollm2", "tiny") else args.model
    guided = GuidedLLM(path, dtype=args.dtype, enforce_eager=True, seed=seed)  # the model's own context length
    eos = {guided.tokenizer.eos_token_id}
    return RolloutSource(guided.generate, guided.tokenizer, eos, args.model, str(path), "cpu (vLLM engine)")
