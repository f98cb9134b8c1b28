"""The vLLM adapters against vLLM's own interface classes, with fabricated batches (no engine).

The V1 adapter also runs on the real CPU engine (test_vllm.py); Model Runner V2 is GPU-only, so these
fabricated inputs are all the V2 adapter is tested with here.
"""

import json
from importlib.metadata import entry_points
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (CI installs the CPU engine)")

from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor  # noqa: E402
from vllm.v1.sample.logits_processor import validate_logits_processors_parameters  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import (  # noqa: E402
    LogitsContext,
    LogitsProcRequestState,
    build_custom_logits_processors_params_validator,
)
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor  # noqa: E402

from prodsample.vllm.pairing import EXTRA_ARGS_KEY, GuidanceTag, Role  # noqa: E402
from prodsample.sampling import product_sample  # noqa: E402
from prodsample.settings import SamplingSettings  # noqa: E402
from prodsample.vllm.processor import (  # noqa: E402
    ProductLogitsProcessor,
    ProductLogitsProcessorV1,
    ProductLogitsProcessorV2,
    take_records,
)

VOCAB = 13
SEED = 99
EOS = 2
ENTRY_POINT = "prodsample.vllm.processor:ProductLogitsProcessor"


def params(role: Role, *, rollout="r0", index=0, lam=0.5, **overrides) -> SamplingParams:
    tag = GuidanceTag(rollout=rollout, role=role, rollout_index=index, seed=SEED, release_token=EOS,
                      settings=SamplingSettings(lam=lam))
    return SamplingParams(temperature=0.0, max_tokens=8, extra_args=tag.to_extra_args(), **overrides)


def config(name: str):
    model = SimpleNamespace(get_vocab_size=lambda: VOCAB)
    return SimpleNamespace(instance_id=name, additional_config={}, model_config=model)


def forced_token(row: torch.Tensor) -> int:
    assert int(torch.isfinite(row).sum()) == 1, "a forced row keeps exactly one finite logit"
    return int(row.argmax())


def test_the_entry_point_is_both_interfaces_and_builds_each_runners_adapter():
    (entry,) = [e for e in entry_points(group="vllm.logits_processors") if e.name == "prodsample"]
    assert entry.value == ENTRY_POINT and entry.load() is ProductLogitsProcessor
    assert issubclass(ProductLogitsProcessor, V1LogitsProcessor)
    assert issubclass(ProductLogitsProcessor, V2LogitsProcessor)
    v1 = ProductLogitsProcessor(config("entry-v1"), torch.device("cpu"), False)
    assert type(v1) is ProductLogitsProcessorV1 and not v1.is_argmax_invariant()
    v2 = ProductLogitsProcessor(config("entry-v2"), fake_request_state(4))
    assert type(v2) is ProductLogitsProcessorV2


@pytest.mark.parametrize(
    "validator",
    [
        lambda p: validate_logits_processors_parameters([ENTRY_POINT], p),
        lambda p: build_custom_logits_processors_params_validator([ENTRY_POINT])(p),
    ],
    ids=["v1", "v2"],
)
def test_both_runners_reject_tagged_requests_with_interfering_settings(validator):
    validator(params(Role.PLAIN))
    validator(SamplingParams(repetition_penalty=1.3))  # untagged: not ours to judge
    with pytest.raises(VLLMValidationError, match="repetition_penalty"):
        validator(params(Role.PLAIN, repetition_penalty=1.3))
    with pytest.raises(VLLMValidationError, match="logit_bias"):
        validator(params(Role.GUIDE, logit_bias={3: 1.0}))
    with pytest.raises(VLLMValidationError, match="lam must lie in"):
        bad = params(Role.PLAIN)
        bad.extra_args[f"{EXTRA_ARGS_KEY}.lam"] = 2.0
        validator(bad)


def test_a_tag_crosses_the_http_server_as_vllm_xargs():
    """vLLM's OpenAI server validates `vllm_xargs` (str / int / float / list values) and hands them on as
    `SamplingParams.extra_args`: the flat tag passes and arrives whole; a nested mapping would be refused."""
    from pydantic import ValidationError
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    tag = GuidanceTag(rollout="r0", role=Role.GUIDE, rollout_index=3, seed=SEED, release_token=EOS,
                      settings=SamplingSettings(lam=0.25, temperature=0.7, top_k=5, top_p=0.9))
    request = CompletionRequest.model_validate_json(json.dumps({"prompt": "x", "vllm_xargs": tag.to_extra_args()}))
    assert GuidanceTag.from_extra_args(request.to_sampling_params(max_tokens=4).extra_args) == tag
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": "x", "vllm_xargs": {EXTRA_ARGS_KEY: {"rollout": "r0"}}})


# -- V1 -----------------------------------------------------------------------------------------------


def test_v1_adapter_follows_batch_updates_and_forces_pairs_only():
    processor = ProductLogitsProcessor(config("v1-batch"), torch.device("cpu"), False)
    guide_out, plain_out, other_out = [], [], []
    processor.update_state(
        BatchUpdate(
            batch_size=3,
            removed=[],
            added=[(0, params(Role.GUIDE), [1, 5], guide_out), (1, params(Role.PLAIN), [1], plain_out),
                   (2, SamplingParams(), [1], other_out)],
            moved=[],
        )
    )
    generator = torch.Generator().manual_seed(0)
    seen = []
    for step in range(4):
        logits = torch.randn(3, VOCAB, generator=generator)
        rows = {0: guide_out, 1: plain_out, 2: other_out}
        if step == 2:  # the runner swaps the pair's rows and moves the untagged request
            processor.update_state(BatchUpdate(3, removed=[], added=[], moved=[(0, 1, MoveDirectionality.SWAP)]))
            rows = {0: plain_out, 1: guide_out, 2: other_out}
        plain_row = next(i for i, out in rows.items() if out is plain_out)
        guide_row = 1 - plain_row
        seen.append((logits[plain_row].clone(), logits[guide_row].clone()))
        processed = processor.apply(logits.clone())
        token = forced_token(processed[plain_row])
        assert forced_token(processed[guide_row]) == token
        assert torch.equal(processed[2], logits[2]), "the untagged row is untouched"
        plain_out.append(token)
        guide_out.append(token)
        other_out.append(int(logits[2].argmax()))
    processor.update_state(BatchUpdate(1, removed=[0, 1], added=[], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert processor.rows == {}
    record = take_records(None, "v1-batch", ["r0"])["r0"]
    assert record[0] == plain_out and record[4] is None  # tokens, lost_at
    for t, (plain, guide) in enumerate(seen):
        expected = product_sample(plain[None], guide[None], 0.5, seed=SEED, rollout_ids=0, positions=torch.tensor([t]))
        assert record[0][t] == int(expected.token_ids)
        assert record[1][t] == pytest.approx(float(expected.logprobs), abs=1e-6)


def test_v1_adapter_replaces_a_row_taken_over_by_another_request():
    processor = ProductLogitsProcessor(config("v1-replace"), torch.device("cpu"), False)
    processor.update_state(BatchUpdate(1, removed=[], added=[(0, params(Role.PLAIN, lam=1.0), [1], [])], moved=[]))
    processor.update_state(BatchUpdate(1, removed=[], added=[(0, SamplingParams(), [1], [])], moved=[]))
    logits = torch.randn(1, VOCAB)
    assert torch.equal(processor.apply(logits.clone()), logits)


# -- V2 -----------------------------------------------------------------------------------------------


def fake_request_state(slots: int) -> LogitsProcRequestState:
    """V2's request state; its UVA-backed buffers need a GPU, so host stand-ins carry the `.np` mirrors
    that the adapter reads."""
    host = lambda: SimpleNamespace(np=np.zeros(slots, dtype=np.int32))  # noqa: E731
    return LogitsProcRequestState(
        device=torch.device("cpu"), max_num_reqs=slots, vocab_size=VOCAB, all_token_ids=None,
        prompt_len=host(), prefill_len=host(), total_len=None,
    )


def context(row_slots: list[int], seq_lens: list[int], input_ids: list[int]) -> LogitsContext:
    mapping = torch.tensor(row_slots, dtype=torch.int32)
    return LogitsContext(
        expanded_idx_mapping=mapping, idx_mapping=mapping, idx_mapping_np=np.array(row_slots, dtype=np.int32),
        expanded_local_pos=torch.zeros(len(row_slots), dtype=torch.int32),
        input_ids=torch.tensor(input_ids, dtype=torch.int32),
        pos=torch.tensor(seq_lens, dtype=torch.int64) - 1,
        seq_lens_upper_bound_np=np.array(seq_lens, dtype=np.int32),
    )


def test_v2_adapter_maps_reordered_rows_to_slots_and_skips_rows_mid_prefill():
    state = fake_request_state(8)
    processor = ProductLogitsProcessor(config("v2-batch"), state)
    plain_slot, guide_slot, other_slot = 2, 5, 7
    assert processor.add_request(plain_slot, params(Role.PLAIN))
    assert processor.add_request(guide_slot, params(Role.GUIDE))
    assert not processor.add_request(other_slot, SamplingParams())
    state.prompt_len.np[[plain_slot, guide_slot, other_slot]] = [4, 9, 3]
    state.prefill_len.np[[plain_slot, guide_slot, other_slot]] = [4, 9, 3]
    generator = torch.Generator().manual_seed(1)
    plain_out, seen = [], []

    def seq_len(slot, kept):
        return state.prompt_len.np[slot] + kept

    # step 0: the guide slot is still prefilling (6 of 9 prompt tokens), rows in order plain, other, guide
    logits = torch.randn(3, VOCAB, generator=generator)
    processed = processor.apply(logits.clone(), context([plain_slot, other_slot, guide_slot], [4, 3, 6], [0, 0, 0]))
    assert torch.equal(processed[1], logits[1]) and torch.equal(processed[2], logits[2]), "other and mid-prefill rows untouched"
    solo = forced_token(processed[0])
    plain_out.append(solo)
    # steps 1-2: both ready, rows reordered; the guide row is now out of step (position 0 vs plain's 1)
    for order in ([guide_slot, plain_slot, other_slot], [other_slot, plain_slot, guide_slot]):
        kept = {plain_slot: len(plain_out), guide_slot: 0, other_slot: 0}
        logits = torch.randn(3, VOCAB, generator=generator)
        last = {plain_slot: plain_out[-1], guide_slot: 0, other_slot: 0}
        processed = processor.apply(
            logits.clone(), context(order, [seq_len(s, kept[s]) for s in order], [last[s] for s in order])
        )
        plain_row, guide_row = order.index(plain_slot), order.index(guide_slot)
        seen.append(logits[plain_row].clone())
        plain_out.append(forced_token(processed[plain_row]))
        assert forced_token(processed[guide_row]) == EOS, "the guide row that lost its partner is released"
        state.prefill_len.np[guide_slot] = 9
    record = take_records(None, "v2-batch", ["r0"])["r0"]
    tokens, logprobs, _plain, guide, lost_at, cause = record
    assert tokens == plain_out and (lost_at, cause) == (0, "partner_mid_prefill")
    assert all(np.isnan(guide))
    for t, plain in enumerate(seen, start=1):
        expected = product_sample(plain[None], plain[None], 1.0, seed=SEED, rollout_ids=0, positions=torch.tensor([t]))
        assert tokens[t] == int(expected.token_ids)
        assert logprobs[t] == pytest.approx(float(expected.logprobs), abs=1e-6)


def test_v2_adapter_draws_a_pair_in_step_jointly():
    state = fake_request_state(4)
    processor = ProductLogitsProcessor(config("v2-joint"), state)
    processor.add_request(3, params(Role.PLAIN, rollout="j", index=6, lam=0.2))
    processor.add_request(0, params(Role.GUIDE, rollout="j", index=6, lam=0.2))
    state.prompt_len.np[[3, 0]] = [5, 11]
    state.prefill_len.np[[3, 0]] = [5, 11]
    generator = torch.Generator().manual_seed(2)
    tokens, seen = [], []
    for step in range(3):
        order = [3, 0] if step % 2 == 0 else [0, 3]
        logits = torch.randn(2, VOCAB, generator=generator)
        last = tokens[-1] if tokens else 0
        processed = processor.apply(
            logits.clone(), context(order, [5 + step if s == 3 else 11 + step for s in order], [last, last])
        )
        plain_row = order.index(3)
        seen.append((logits[plain_row].clone(), logits[1 - plain_row].clone()))
        token = forced_token(processed[plain_row])
        assert forced_token(processed[1 - plain_row]) == token
        tokens.append(token)
    record = take_records(None, "v2-joint", ["j"])["j"]
    assert record[0] == tokens and record[4] is None
    for t, (plain, guide) in enumerate(seen):
        expected = product_sample(plain[None], guide[None], 0.2, seed=SEED, rollout_ids=6, positions=torch.tensor([t]))
        assert record[0][t] == int(expected.token_ids)
        assert record[3][t] == pytest.approx(float(expected.guide_logprobs), abs=1e-6)


def test_v2_adapter_refuses_speculative_decoding_rows():
    state = fake_request_state(2)
    processor = ProductLogitsProcessor(config("v2-spec"), state)
    processor.add_request(0, params(Role.PLAIN, lam=1.0))
    with pytest.raises(RuntimeError, match="speculative decoding"):
        processor.apply(torch.randn(3, VOCAB), context([0], [4], [0]))
