"""What tests/test_verl_ray.py reads back from verl's trainer on Ray: JSON lines in `$PRODSAMPLE_PROBE_DIR`, one
file per process, written by wrappers that only observe:

- `requests-*.jsonl`, from prodsample's vLLM server: every tagged request (replica, rollout, role, λ; the
  plain one's prompt), and for each rollout whose records came back, the engine's record (its tokens, plain
  log π, desync);
- `updates-*.jsonl`, from verl's trainer (V0 and V1 alike), where it compares the rollout's log-probs with its
  own (`calculate_debug_metrics`): each training batch's responses, the trainer's log-probs of them
  (`old_log_probs`, from the weights the engines should hold) and, where the batch carries them (V0), the
  guidance metrics of its prodsample columns.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from .cpu import after_import

PROBE_DIR = Path(os.environ["PRODSAMPLE_PROBE_DIR"])


def write(kind: str, row: dict) -> None:
    with open(PROBE_DIR / f"{kind}-{os.getpid()}.jsonl", "a") as file:
        file.write(json.dumps(row) + "\n")


def probe_server(module) -> None:
    from prodsample.vllm.pairing import RECORDS_KEY, GuidanceTag, RolloutRecord

    generate = module.GuidedVllmHttpServer.generate

    @functools.wraps(generate)
    async def observed(self, prompt_ids, sampling_params, request_id, **kwargs):
        tag = GuidanceTag.from_extra_args(sampling_params.get("extra_args"))
        output = await generate(self, prompt_ids, sampling_params, request_id, **kwargs)
        if tag is not None:
            row = {"replica": self.replica_rank, "rollout": tag.rollout, "role": tag.role.value, "lam": tag.settings.lam}
            if tag.role.value == "plain":
                row["prompt_ids"] = list(prompt_ids)
            if RECORDS_KEY in output.extra_fields:
                record = RolloutRecord(*output.extra_fields[RECORDS_KEY])
                row.update(tokens=record.tokens, plain_logprobs=record.plain_logprobs, cause=record.cause,
                           lost_at=record.lost_at)
            write("requests", row)
        return output

    module.GuidedVllmHttpServer.generate = observed


def probe_trainer(module) -> None:
    calculate_debug_metrics = module.calculate_debug_metrics

    @functools.wraps(calculate_debug_metrics)
    def observed(data, *args, **kwargs):
        from prodsample.verl import guidance_metrics_of

        mask = data.batch["response_mask"].bool()
        row = {
            "responses": [r[keep].tolist() for r, keep in zip(data.batch["responses"], mask)],
            "old_log_probs": [r[keep].tolist() for r, keep in zip(data.batch["old_log_probs"], mask)],
        }
        if "prodsample_lam" in data.non_tensor_batch:
            row["guidance"] = guidance_metrics_of(data)
        write("updates", row)
        return calculate_debug_metrics(data, *args, **kwargs)

    module.calculate_debug_metrics = observed


after_import("prodsample.verl.server", probe_server)
after_import("verl.utils.debug.metrics", probe_trainer)  # before either trainer imports it
