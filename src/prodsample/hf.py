"""Hugging Face transformers integration: a drop-in logits processor, a batched guided generator, and
teacher-forced scoring. All three compute q with the core (`prodsample.sampling`); this module only runs
the model and keeps the two contexts' caches in step.

- `ProductLogitsProcessor`: one processor in `model.generate(..., logits_processor=[proc])`.
- `guided_generate`: the fast path; both contexts as rows of one batched forward per step.
- `score`: teacher-forced log q, log π(o | prompt) and log π(o | prompt ⊕ hint) for given completions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from transformers import LogitsProcessor

from .fused import ProductSample
from .mixing import mix_logprobs
from .prompts import DEFAULT_HINT_TEMPLATE, add_hint, check_prompts_and_answers, pad_token_id, render_prompt
from .rollout import PER_TOKEN_RECORDS, GuidedRollout
from .sampling import product_logprobs, product_sample
from .settings import SamplingSettings, is_guided

__all__ = ["ProductLogitsProcessor", "guided_generate", "score", "build_contexts", "check_tokenizer_matches"]


# ---------------------------------------------------------------------------------------------------------
# Shared pieces: contexts, padding, model checks
# ---------------------------------------------------------------------------------------------------------


def build_contexts(
    tokenizer, prompts: Sequence, answers: Sequence[str], hint_template: str = DEFAULT_HINT_TEMPLATE
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the plain and the answer-augmented context of each prompt."""
    check_prompts_and_answers(prompts, answers)
    plain = [render_prompt(tokenizer, prompt) for prompt in prompts]
    guide = [render_prompt(tokenizer, add_hint(prompt, str(answer), hint_template)) for prompt, answer in zip(prompts, answers)]
    for i, ids in enumerate(plain):
        if not ids:
            raise ValueError(f"prompts[{i}] tokenizes to no tokens")
    return plain, guide


def _model_vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_tokenizer_matches(model, tokenizer) -> None:
    """Raise ValueError if `tokenizer` has more ids than `model`'s output layer (they would index past the
    vocabulary): the check every entry point runs before it renders prompts for a model."""
    model_vocab = _model_vocab_size(model)
    if len(tokenizer) > model_vocab:
        raise ValueError(
            f"tokenizer does not match the model: it has {len(tokenizer)} tokens but the model's output layer has "
            f"{model_vocab}"
        )


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`[N, L]` ids and attention mask, left-padded (what a decoder-only model continues from)."""
    width = max(len(ids) for ids in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            ids[row, width - len(sequence) :] = torch.as_tensor(list(sequence), dtype=torch.long)
            mask[row, width - len(sequence) :] = 1
    return ids.to(device), mask.to(device)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding (and any padding inside a row)."""
    return (attention_mask.cumsum(dim=-1) - 1).clamp_min(0)


def _decode_step(model, tokens: torch.Tensor, attention_mask: torch.Tensor, cache):
    """One forward of one new token per row `[N]` on a KV cache: (next logits `[N, V]`, the cache, the
    attention mask grown by the new token)."""
    attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=1)
    out = model(
        input_ids=tokens.unsqueeze(1), attention_mask=attention_mask,
        position_ids=attention_mask.sum(dim=1, keepdim=True) - 1, past_key_values=cache, use_cache=True,
    )
    return out.logits[:, -1], out.past_key_values, attention_mask


class _EvalMode:
    """Generation runs without dropout; the model's mode is restored afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


# ---------------------------------------------------------------------------------------------------------
# ProductLogitsProcessor: drop-in for model.generate
# ---------------------------------------------------------------------------------------------------------


def _completion_mask(completion_ids: torch.Tensor, eos_ids) -> torch.Tensor:
    """Real tokens: everything up to and including the first EOS of each row."""
    eos = torch.as_tensor([] if eos_ids is None else eos_ids, device=completion_ids.device).flatten()
    is_eos = torch.isin(completion_ids, eos)
    return (is_eos.cumsum(dim=1) - is_eos.long()) == 0


def _padding_of(completion_ids: torch.Tensor, real: torch.Tensor) -> int:
    """The id generate wrote after rows ended (any id if no row ended early: then there is no padding)."""
    padding = completion_ids[~real]
    return int(padding[0]) if padding.numel() else 0


class _FollowedCall:
    """The one `generate` call a processor follows: λ per row, the guide context's KV cache kept in step with
    generate's tokens, and per step the plain and guide log-probs (at the processor's temperature) of the
    token generate drew, known once the next step shows that token."""

    def __init__(self, model, guide_input_ids, guide_attention_mask, settings: SamplingSettings, input_ids, vocab):
        rows, prompts = input_ids.shape[0], guide_input_ids.shape[0]
        if rows % prompts:
            raise ValueError(
                f"guide_input_ids has {prompts} rows but generate runs {rows}: pass one guide prompt per plain prompt"
            )
        if _model_vocab_size(model) != vocab:
            raise ValueError(f"vocabulary mismatch: generate's scores have {vocab} tokens, the model {_model_vocab_size(model)}")
        repeats, device = rows // prompts, input_ids.device
        self.model = model
        self.temperature = settings.temperature
        self.lam_rows = settings.lam_per_rollout(prompts, repeats).to(device)
        self.group_ids = torch.arange(prompts).repeat_interleave(repeats)
        self.prompt_width = input_ids.shape[1]
        self.guide_ids = guide_input_ids.to(device).repeat_interleave(repeats, dim=0)
        self.guide_mask = guide_attention_mask.to(device).repeat_interleave(repeats, dim=0)
        self.guide_cache = None
        self.last_input_ids: torch.Tensor | None = None
        self.last_mixed: torch.Tensor | None = None  # what the last step returned, before generate's warpers
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # last step's `[B, V]`, awaiting its token
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []  # per settled step: `[B]` plain, guide

    def continued_by(self, input_ids: torch.Tensor) -> bool:
        """Whether `input_ids` are the last step's plus one token per row (the next step of this call)."""
        last = self.last_input_ids
        return input_ids.shape == (last.shape[0], last.shape[1] + 1) and torch.equal(input_ids[:, :-1], last)

    def step(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The mixture's log-probs `[B, V]` for the next token after `input_ids`, from generate's `scores`."""
        if self.last_input_ids is None:
            out = self.model(
                input_ids=self.guide_ids, attention_mask=self.guide_mask, position_ids=_positions(self.guide_mask),
                use_cache=True, logits_to_keep=1,
            )
            guide_logits, self.guide_cache = out.logits[:, -1], out.past_key_values
        else:
            self._settle(input_ids[:, -1])
            guide_logits, self.guide_cache, self.guide_mask = _decode_step(
                self.model, input_ids[:, -1], self.guide_mask, self.guide_cache
            )
        self.last_input_ids = input_ids
        mixed = mix_logprobs([scores, guide_logits], torch.stack([self.lam_rows, 1.0 - self.lam_rows], dim=1))
        self.pending = (self._tempered(scores), self._tempered(guide_logits))
        self.last_mixed = mixed.clone()
        return mixed

    def _tempered(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float() / (self.temperature or 1.0), dim=-1)

    def _settle(self, tokens: torch.Tensor) -> None:
        plain, guide = self.pending
        chosen = tokens.unsqueeze(1)
        self.recorded.append((plain.gather(1, chosen).squeeze(1), guide.gather(1, chosen).squeeze(1)))
        self.pending = None

    def rollout(self, sequences, scores, prompt_attention_mask, eos_ids) -> GuidedRollout:
        """The call's records as a `GuidedRollout`, from what generate returned (see the processor's `rollout`)."""
        steps = len(scores)
        if (
            steps != len(self.recorded) + 1
            or sequences.shape[1] != self.prompt_width + steps
            or not torch.equal(sequences[:, :-1], self.last_input_ids)
        ):
            raise ValueError(
                f"these are not the outputs of the generate call this processor followed ({len(self.recorded) + 1} "
                f"steps from {self.prompt_width}-token prompts); got {steps} steps' scores and sequences of "
                f"shape {tuple(sequences.shape)}"
            )
        completion_ids = sequences[:, self.prompt_width :]
        real = _completion_mask(completion_ids, eos_ids)
        step_scores = torch.stack([step.float() for step in scores], dim=1)  # [rows, steps, V]
        self._check_temperature(step_scores, completion_ids, real)
        self._settle(completion_ids[:, -1])
        plain, guide = (torch.stack(values, dim=1) for values in zip(*self.recorded))
        if self.temperature == 0:
            logprobs = torch.zeros_like(plain)
        else:
            logprobs = torch.log_softmax(step_scores, dim=-1).gather(2, completion_ids.unsqueeze(2)).squeeze(2)
        prompts = sequences[:, : self.prompt_width]
        prompt_mask = torch.ones_like(prompts, dtype=torch.bool)
        if prompt_attention_mask is not None:
            prompt_mask = prompt_attention_mask.bool().to(sequences.device)
            prompt_mask = prompt_mask.repeat_interleave(sequences.shape[0] // prompt_mask.shape[0], dim=0)
        lengths = real.sum(dim=1).tolist()
        per_token = {"completions": completion_ids, "logprobs": logprobs, "plain_logprobs": plain, "guide_logprobs": guide}
        return GuidedRollout.from_lists(
            prompt_ids=[row[mask].tolist() for row, mask in zip(prompts, prompt_mask)],
            **{name: [row[:n] for row, n in zip(values, lengths)] for name, values in per_token.items()},
            lam=self.lam_rows, group_ids=self.group_ids, pad_token_id=_padding_of(completion_ids, real),
        )

    def _check_temperature(self, step_scores: torch.Tensor, completion_ids: torch.Tensor, real: torch.Tensor) -> None:
        """generate's warpers divide the mixture by its temperature, so the last scores reveal a mismatch;
        under temperature 0 every real token must be its step's argmax, else generate was sampling."""
        last = step_scores[:, -1]
        kept = torch.isfinite(last) & torch.isfinite(self.last_mixed)
        expected = self.last_mixed / (self.temperature or 1.0)
        mismatch = not torch.allclose(last[kept], expected[kept], rtol=1e-4, atol=1e-4)
        if self.temperature == 0:
            chosen = step_scores.gather(2, completion_ids.unsqueeze(2)).squeeze(2)
            mismatch |= bool(((chosen < step_scores.amax(dim=-1)) & real).any())
        if mismatch:
            raise ValueError(
                f"the processor was built with temperature={self.temperature} but generate decoded differently "
                "(another temperature, sampling instead of greedy, or a processor after this one): pass generate's "
                "temperature to the processor (0 with do_sample=False)"
            )


class ProductLogitsProcessor(LogitsProcessor):
    r"""Turns `model.generate` on the plain prompts into sampling from the product with the hinted prompts.

    At every step the processor runs `model` on the answer-augmented prompts (its own KV cache, one forward
    over the token just generated), and returns the normalised log-probs `[B, V]` of π_plain^λ · π_guide^(1−λ),
    where π_plain is the softmax of the scores `[B, V]` it receives (after any processor that runs before it).
    `generate` then applies its own temperature / top-k / top-p / min-p to that mixture and samples, which is
    exactly q of `prodsample.product_sample`; log q of what was sampled is read from the processed scores
    (`output_scores=True`). Call `rollout(outputs)` after `generate` for the records a trainer needs.

    One processor follows one `generate` call: every call after the first must bring the previous call's
    `input_ids` plus one token per row, and anything else raises RuntimeError. Once `rollout` has read the
    records out, the processor refuses further steps; `reset()` readies it for another `generate` call.

    Safe with it: `do_sample`, `temperature` (pass the same value to the processor, which reports
    π at that temperature and checks it against the scores), `top_k`, `top_p`, `min_p`,
    `num_return_sequences`, `max_new_tokens`, EOS. Processors that change the plain scores (repetition
    penalty, bad words, …) act on the plain context only, so q is no longer the product of the model's two
    distributions and the recorded π differs from what a trainer computes: leave them off.

    Args:
        model: the same model `generate` runs.
        guide_input_ids: `[B, Lg]` answer-augmented prompts, left-padded; B = the number of prompts passed to
            `generate` (rows are repeated for `num_return_sequences`).
        guide_attention_mask: `[B, Lg]`, 1 for real tokens (default: all ones).
        lam: λ as a float or `[B]` (per prompt) or `[B · num_return_sequences]` (per row).
        temperature: the temperature `generate` samples with (0 for greedy decoding).

    Example:
        >>> proc = ProductLogitsProcessor(model, guide["input_ids"], guide["attention_mask"], lam=0.5)  # doctest: +SKIP
        >>> out = model.generate(**plain, logits_processor=[proc], do_sample=True, max_new_tokens=32,  # doctest: +SKIP
        ...                      output_scores=True, return_dict_in_generate=True)
        >>> rollout = proc.rollout(out)  # GuidedRollout: log q, log π(o|prompt), log π(o|prompt⊕hint)  # doctest: +SKIP
    """

    def __init__(self, model, guide_input_ids: torch.Tensor, guide_attention_mask: torch.Tensor | None = None, lam=0.5, temperature: float = 1.0):
        if guide_input_ids.dim() != 2:
            raise ValueError(f"guide_input_ids must have shape [batch, length], got {tuple(guide_input_ids.shape)}")
        if guide_attention_mask is None:
            guide_attention_mask = torch.ones_like(guide_input_ids)
        if guide_attention_mask.shape != guide_input_ids.shape:
            raise ValueError(
                f"guide_attention_mask must have the shape of guide_input_ids {tuple(guide_input_ids.shape)}, "
                f"got {tuple(guide_attention_mask.shape)}"
            )
        self.model = model
        self.guide_input_ids = guide_input_ids
        self.guide_attention_mask = guide_attention_mask
        self.settings = SamplingSettings(lam=lam, temperature=temperature)
        self.reset()

    def reset(self) -> None:
        """Drop the followed `generate` call and its records: the processor is ready for its next call."""
        self._call: _FollowedCall | None = None
        self._read_out = False

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._read_out:
            raise RuntimeError(
                "this ProductLogitsProcessor's records were read out by rollout(): call reset() before using it in "
                "another generate call"
            )
        if self._call is None:
            self._call = _FollowedCall(
                self.model, self.guide_input_ids, self.guide_attention_mask, self.settings, input_ids, scores.shape[1]
            )
        elif not self._call.continued_by(input_ids):
            raise RuntimeError(
                "a ProductLogitsProcessor serves one generate call: these input_ids are not the previous step's "
                "plus one token per row, so another generate call is running; build a new processor for it, or "
                "call reset() between calls"
            )
        return self._call.step(input_ids, scores)

    def rollout(
        self, outputs, prompt_attention_mask: torch.Tensor | None = None, eos_token_id: int | Sequence[int] | None = None
    ) -> GuidedRollout:
        """The records of the followed `generate` call as a `GuidedRollout` (one rollout per generated row); the
        processor is then read out (see the class docstring).

        Args:
            outputs: what that call returned with `output_scores=True, return_dict_in_generate=True`.
            prompt_attention_mask: the plain prompts' `[B, L]` attention mask given to `generate` (to strip
                left padding from `prompt_ids`); None means unpadded.
            eos_token_id: end-of-sequence id(s) (default: the model's generation config).
        """
        scores = getattr(outputs, "scores", None)
        if scores is None or self._call is None:
            raise ValueError(
                "rollout needs generate(..., output_scores=True, return_dict_in_generate=True) run with this processor"
            )
        if eos_token_id is None:
            eos_token_id = self.model.generation_config.eos_token_id
        rollout = self._call.rollout(outputs.sequences, scores, prompt_attention_mask, eos_token_id)
        self._call, self._read_out = None, True
        return rollout


# ---------------------------------------------------------------------------------------------------------
# guided_generate: both contexts as rows of one batched forward
# ---------------------------------------------------------------------------------------------------------


class _ContextPlan(NamedTuple):
    """The distinct contexts to prefill and which decode row continues which: every rollout's plain row, then
    a guide row for every rollout with λ < 1."""

    contexts: list[list[int]]  # the prompts' plain contexts, then the guide contexts of prompts with a guided rollout
    context_prompt: list[int]  # the prompt of each context
    row_context: torch.Tensor  # int64 [rows]: the context each decode row starts from


def _plan_contexts(plain_contexts, guide_contexts, group_ids: torch.Tensor, guided: torch.Tensor) -> _ContextPlan:
    num_prompts = len(plain_contexts)
    guided_prompts = sorted(set(group_ids[guided].tolist()))
    guide_context_index = {prompt: num_prompts + k for k, prompt in enumerate(guided_prompts)}
    guide_rows = torch.tensor([guide_context_index[int(p)] for p in group_ids[guided]], dtype=torch.long)
    return _ContextPlan(
        contexts=list(plain_contexts) + [guide_contexts[prompt] for prompt in guided_prompts],
        context_prompt=list(range(num_prompts)) + guided_prompts,
        row_context=torch.cat([group_ids, guide_rows]),
    )


class _DecodeBatch:
    """The rows of one batched decode: a plain row for every running rollout, then a guide row for every
    running rollout with λ < 1. One KV cache holds all rows; finished rollouts are dropped from it."""

    def __init__(self, cache, attention_mask: torch.Tensor, rollouts: torch.Tensor, guided: torch.Tensor):
        self.cache = cache
        self.attention_mask = attention_mask
        self.rollouts = rollouts  # [n] rollout index of each plain row
        self.guided = guided  # [n] bool: the rollout also has a guide row

    @property
    def num_plain(self) -> int:
        return self.rollouts.shape[0]

    def split_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain and guide logits `[n, V]` per running rollout; unguided rollouts repeat their plain logits
        as guide logits (λ = 1 gives them no weight)."""
        plain_logits = logits[: self.num_plain]
        guide_logits = plain_logits.clone()
        guide_logits[self.guided] = logits[self.num_plain :]
        return plain_logits, guide_logits

    def keep(self, running: torch.Tensor) -> None:
        """Drop the rollouts whose `running` flag is False (from the plain rows and the guide rows)."""
        if bool(running.all()):
            return
        plain_rows = running.nonzero().squeeze(1)
        guide_rows = self.num_plain + running[self.guided].nonzero().squeeze(1)
        rows = torch.cat([plain_rows, guide_rows])
        self.cache.batch_select_indices(rows)
        self.attention_mask = self.attention_mask[rows]
        self.rollouts = self.rollouts[running]
        self.guided = self.guided[running]

    def advance(self, model, rollout_tokens: torch.Tensor) -> torch.Tensor:
        """Feed each running rollout's token `[n]` to its plain and its guide row; the next logits `[rows, V]`."""
        tokens = torch.cat([rollout_tokens, rollout_tokens[self.guided]])
        logits, self.cache, self.attention_mask = _decode_step(model, tokens, self.attention_mask, self.cache)
        return logits


def _shared_prefix_lengths(contexts: list[list[int]], context_prompt: list[int]) -> list[int]:
    """Per prompt, the token prefix all its contexts share, leaving each context at least one token."""
    lengths: dict[int, int] = {}
    firsts: dict[int, list[int]] = {}
    for context, prompt in zip(contexts, context_prompt):
        first = firsts.setdefault(prompt, context)
        shared = next((i for i, (a, b) in enumerate(zip(first, context)) if a != b), min(len(first), len(context)))
        lengths[prompt] = min(lengths.get(prompt, len(first) - 1), shared, len(context) - 1)
    return [lengths[prompt] for prompt in sorted(lengths)]


def _prefill(model, plan: _ContextPlan, pad_id: int):
    """Run the contexts once each (the prefix a prompt's plain and guide contexts share only once), then give
    every decode row a copy of its context's cache.

    Two forwards: the shared prefixes, one row per prompt; then each context's remaining tokens on a copy of
    its prompt's prefix cache (a row's padding then sits between its prefix and its suffix: the attention
    mask and the positions skip it). Returns the first-step logits `[rows, V]`, the cache and the attention
    mask of the rows.
    """
    contexts, context_prompt, row_context = plan
    device = model.device
    prefix_lengths = _shared_prefix_lengths(contexts, context_prompt)
    context_prompt_ids = torch.tensor(context_prompt, device=device)
    if min(prefix_lengths) > 0:
        first_context = {prompt: context for context, prompt in reversed(list(zip(contexts, context_prompt)))}
        prefixes = [first_context[prompt][:length] for prompt, length in enumerate(prefix_lengths)]
        prefix_ids, prefix_mask = _left_pad(prefixes, pad_id, device)
        cache = model(
            input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=_positions(prefix_mask), use_cache=True,
            logits_to_keep=1,
        ).past_key_values
        cache.batch_select_indices(context_prompt_ids)
        prefix_mask = prefix_mask[context_prompt_ids]
        suffixes = [context[prefix_lengths[prompt] :] for context, prompt in zip(contexts, context_prompt)]
    else:  # some prompt's contexts share nothing (a hint placed first): one forward over whole contexts
        cache, prefix_mask, suffixes = None, torch.zeros((len(contexts), 0), dtype=torch.long, device=device), contexts
    suffix_ids, suffix_mask = _left_pad(suffixes, pad_id, device)
    mask = torch.cat([prefix_mask, suffix_mask], dim=1)
    out = model(
        input_ids=suffix_ids, attention_mask=mask, position_ids=_positions(mask)[:, -suffix_ids.shape[1] :],
        past_key_values=cache, use_cache=True, logits_to_keep=1,
    )
    cache = out.past_key_values
    row_context = row_context.to(device)
    cache.batch_select_indices(row_context)
    return out.logits[:, -1][row_context], cache, mask[row_context]


class _Records:
    """What each rollout drew, per position: the token and its three log-probs (CPU, `[R, max_new_tokens]`)."""

    def __init__(self, rollouts: int, max_new_tokens: int, pad_id: int):
        self.token_ids = torch.full((rollouts, max_new_tokens), pad_id, dtype=torch.long)
        self.values = {name: torch.zeros(rollouts, max_new_tokens) for name in PER_TOKEN_RECORDS}
        self.lengths = torch.zeros(rollouts, dtype=torch.long)

    def add(self, rollouts: torch.Tensor, position: int, drawn: ProductSample) -> None:
        rows = rollouts.cpu()
        self.token_ids[rows, position] = drawn.token_ids.cpu()
        for name, values in self.values.items():
            values[rows, position] = getattr(drawn, name).cpu()
        self.lengths[rows] = position + 1

    def per_rollout(self) -> dict[str, list[torch.Tensor]]:
        """The tokens ("completions") and the records of each rollout, cut to its length."""
        lengths = self.lengths.tolist()
        return {
            name: [row[:length] for row, length in zip(values, lengths)]
            for name, values in {"completions": self.token_ids, **self.values}.items()
        }


def _decode(model, plan: _ContextPlan, lam_rows, settings: SamplingSettings, pad_id: int,
            eos_ids: list[int]) -> _Records:
    """Prefill, then per position: one product draw for every running rollout (keyed noise: seed, rollout,
    position), until each rollout has drawn an EOS or `max_new_tokens` tokens."""
    device = model.device
    records = _Records(len(lam_rows), settings.max_new_tokens, pad_id)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    lam_device = lam_rows.to(device)
    logits, cache, attention_mask = _prefill(model, plan, pad_id)
    batch = _DecodeBatch(cache, attention_mask, torch.arange(len(lam_rows), device=device), is_guided(lam_rows).to(device))
    for position in range(settings.max_new_tokens):
        plain_logits, guide_logits = batch.split_logits(logits)
        lam = settings.lam_at(lam_device[batch.rollouts], position)  # 0 in a guided rollout's prefix
        drawn = product_sample(
            plain_logits, guide_logits, lam, **settings.sampler_kwargs(),
            seed=settings.seed, rollout_ids=batch.rollouts, positions=position,
        )
        records.add(batch.rollouts, position, drawn)
        running = ~torch.isin(drawn.token_ids, eos)
        if position + 1 == settings.max_new_tokens or not bool(running.any()):
            break
        batch.keep(running)
        logits = batch.advance(model, drawn.token_ids[running])
    return records


@torch.no_grad()
def guided_generate(
    model,
    tokenizer,
    prompts: Sequence,
    answers: Sequence[str],
    settings: SamplingSettings | None = None,
    **changes,
) -> GuidedRollout:
    """Sample `num_generations` rollouts per prompt from q ∝ π(·|prompt)^λ · π(·|prompt ⊕ hint)^(1−λ).

    Each distinct context (a prompt's plain and hinted version) is prefilled once, the prefix the two share
    only once, and the KV cache is shared by the prompt's G rollouts; every decode step then runs one batched forward whose rows are the plain
    context of every running rollout plus the guide context of those with λ < 1 (λ = 1 rollouts cost no
    guide forward), and samples with the core sampler under keyed noise: (seed, rollout r = i·G + g,
    position t). A rollout ends at EOS (included) or after `max_new_tokens`.

    Args:
        model: a causal LM (`AutoModelForCausalLM`); tokenizer: its tokenizer.
        prompts: strings (tokenised as-is) or chat message lists (chat template + generation prompt).
        answers: one answer per prompt, inserted into `hint_template` to build the guide context.
        settings: the call's `prodsample.settings.SamplingSettings` (λ, G = `num_generations`,
            `max_new_tokens`, temperature and filters, seed, hint template).
        changes: fields of `SamplingSettings` that replace those of `settings`, or, without `settings`, build
            it (`lam=0.5, num_generations=4, ...`).

    Returns:
        `GuidedRollout` with R = len(prompts) · num_generations rollouts, prompt-major. For λ = 1 rollouts the
        guide context is never run and `guide_logprobs` repeats `plain_logprobs`.

    Example:
        >>> settings = SamplingSettings(lam=0.5, num_generations=4, max_new_tokens=32, seed=0)
        >>> rollout = guided_generate(model, tokenizer, ["What is 2+3?"], ["5"], settings)  # doctest: +SKIP
        >>> rollout.completion_ids.shape, rollout.logprobs.shape  # doctest: +SKIP
        (torch.Size([4, L]), torch.Size([4, L]))
    """
    settings = SamplingSettings.build(settings, **changes).with_seed()
    check_tokenizer_matches(model, tokenizer)
    plain_contexts, guide_contexts = build_contexts(tokenizer, prompts, answers, settings.hint_template)
    lam_rows = settings.lam_per_rollout(len(prompts))
    group_ids = torch.arange(len(prompts)).repeat_interleave(settings.num_generations)
    plan = _plan_contexts(plain_contexts, guide_contexts, group_ids, guided=is_guided(lam_rows))
    pad_id = pad_token_id(tokenizer)
    with _EvalMode(model):
        records = _decode(model, plan, lam_rows, settings, pad_id, _eos_ids(model, tokenizer))
    return GuidedRollout.from_lists(
        prompt_ids=[plain_contexts[group] for group in group_ids], **records.per_rollout(), lam=lam_rows,
        group_ids=group_ids, pad_token_id=pad_id,
    )


# ---------------------------------------------------------------------------------------------------------
# score: teacher-forced log-probs of given completions
# ---------------------------------------------------------------------------------------------------------


def _completion_logits(model, contexts: list[list[int]], completions: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    """For each (context, completion), the logits `[len(completion), V]` that predict the completion tokens."""
    sequences = [list(context) + list(completion) for context, completion in zip(contexts, completions)]
    ids, mask = _left_pad(sequences, pad_id, model.device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
    width = ids.shape[1]
    return [
        logits[row, width - len(completion) - 1 : width - 1]
        for row, completion in enumerate(completions)
    ]


def _teacher_forced_logits(model, plain_contexts, guide_contexts, completions, guided: torch.Tensor, pad_id: int):
    """Per rollout, the plain and the guide logits `[len(completion), V]` that predict its completion; an
    unguided rollout (λ = 1) repeats its plain logits as guide logits and runs no guide forward."""
    plain_logits = _completion_logits(model, plain_contexts, completions, pad_id)
    guide_logits = list(plain_logits)
    guided_rows = guided.nonzero().squeeze(1).tolist()
    if guided_rows:
        computed = _completion_logits(
            model, [guide_contexts[r] for r in guided_rows], [completions[r] for r in guided_rows], pad_id
        )
        for row, logits in zip(guided_rows, computed):
            guide_logits[row] = logits
    return torch.cat(plain_logits), torch.cat(guide_logits)


@torch.no_grad()
def score(
    model,
    tokenizer,
    prompts: Sequence,
    answers: Sequence[str],
    completions: Sequence[Sequence[int]],
    settings: SamplingSettings | None = None,
    **changes,
) -> GuidedRollout:
    """Teacher-forced log q, log π(o | prompt) and log π(o | prompt ⊕ hint) for given completions.

    One prompt, answer and completion (token ids) per rollout; two batched forwards (plain contexts, and
    guide contexts for rollouts with λ < 1). With the sampler's λ, temperature and filters it reproduces what
    `guided_generate` (or any backend) recorded: the oracle for every sampler, and the way a trainer
    recomputes log q when an engine cannot send its records back. `settings` and `changes` as in
    `guided_generate`; λ is one value or one per completion, and G, the length and the seed play no part.

    Returns:
        `GuidedRollout` whose `completion_ids` are the given completions (right-padded) and whose log-prob
        fields are the teacher-forced values; `group_ids` index the given rows.
    """
    if len(completions) != len(prompts):
        raise ValueError(f"completions must have one entry per prompt ({len(prompts)}), got {len(completions)}")
    for i, completion in enumerate(completions):
        if len(completion) == 0:
            raise ValueError(f"completions[{i}] is empty; score needs at least one token per completion")
    settings = SamplingSettings.build(settings, **changes)
    check_tokenizer_matches(model, tokenizer)
    plain_contexts, guide_contexts = build_contexts(tokenizer, prompts, answers, settings.hint_template)
    lam_rows = settings.lam_per_rollout(len(completions), 1)
    completions = [list(map(int, completion)) for completion in completions]
    pad_id = pad_token_id(tokenizer)
    with _EvalMode(model):
        plain_logits, guide_logits = _teacher_forced_logits(
            model, plain_contexts, guide_contexts, completions, is_guided(lam_rows), pad_id
        )
    lengths = [len(completion) for completion in completions]
    scored = product_logprobs(
        plain_logits,
        guide_logits,
        settings.lam_at(
            lam_rows.repeat_interleave(torch.tensor(lengths)), torch.cat([torch.arange(n) for n in lengths])
        ).to(model.device),
        torch.tensor([token for completion in completions for token in completion], device=model.device),
        **settings.sampler_kwargs(),
    )
    per_rollout = {name: getattr(scored, name).cpu().split(lengths) for name in PER_TOKEN_RECORDS}
    return GuidedRollout.from_lists(
        prompt_ids=plain_contexts, completions=completions, **per_rollout, lam=lam_rows,
        group_ids=torch.arange(len(completions)), pad_token_id=pad_id,
    )
