"""Hugging Face transformers integration: a drop-in logits processor, a batched guided generator, and
teacher-forced scoring. All three compute q with the core (`prodsample.sampling`); this module only runs
the model and keeps the two contexts' caches in step.

- `ProductLogitsProcessor`: one processor in `model.generate(..., logits_processor=[proc])`.
- `guided_generate`: the fast path; both contexts as rows of one batched forward per step.
- `score`: teacher-forced log q, log π(o | prompt) and log π(o | prompt ⊕ hint) for given completions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from .mixing import mix_logprobs
from .prompts import DEFAULT_HINT_TEMPLATE, add_hint, check_prompts_and_answers, render_prompt
from .rollout import GuidedRollout
from .sampling import product_logprobs, product_sample
from .settings import SamplingSettings

__all__ = ["ProductLogitsProcessor", "guided_generate", "score", "build_contexts"]


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


def _check_tokenizer_matches(model, tokenizer) -> None:
    """A tokenizer with more ids than the model's output layer would index past the vocabulary."""
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


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad


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


class ProductLogitsProcessor(LogitsProcessor):
    r"""Turns `model.generate` on the plain prompts into sampling from the product with the hinted prompts.

    At every step the processor runs `model` on the answer-augmented prompts (its own KV cache, one forward
    over the token just generated), and returns the normalised log-probs of π_plain^λ · π_guide^(1−λ), where
    π_plain is the softmax of the scores it receives (after any processor that runs before it). `generate`
    then applies its own temperature / top-k / top-p / min-p to that mixture and samples, which is exactly
    q of `prodsample.product_sample`; log q of what was sampled is read from the processed scores
    (`output_scores=True`). Call `rollout(outputs)` after `generate` for the records a trainer needs.

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
        self.temperature = self.settings.temperature
        self._reset()

    def _reset(self) -> None:
        self._cache = None
        self._rows_lam = None
        self._prompt_width = None
        self._expected_width = None
        self._last_mixed = None
        self._pending = None  # plain/guide log-probs at T of the last step, awaiting its token
        self._recorded: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _start(self, input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
        """First call: expand the guide prompts to generate's rows and prefill them."""
        rows, prompts = input_ids.shape[0], self.guide_input_ids.shape[0]
        if rows % prompts:
            raise ValueError(
                f"guide_input_ids has {prompts} rows but generate runs {rows}: pass one guide prompt per plain prompt"
            )
        repeats = rows // prompts
        self._rows_lam = self.settings.lam_per_rollout(prompts, repeats).to(input_ids.device)
        self._prompt_width = input_ids.shape[1]
        guide_ids = self.guide_input_ids.to(input_ids.device).repeat_interleave(repeats, dim=0)
        self._guide_mask = self.guide_attention_mask.to(input_ids.device).repeat_interleave(repeats, dim=0)
        if _model_vocab_size(self.model) != vocab:
            raise ValueError(f"vocabulary mismatch: generate's scores have {vocab} tokens, the model {_model_vocab_size(self.model)}")
        out = self.model(
            input_ids=guide_ids, attention_mask=self._guide_mask, position_ids=_positions(self._guide_mask),
            use_cache=True, logits_to_keep=1,
        )
        self._cache = out.past_key_values
        return out.logits[:, -1]

    def _advance(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Later calls: feed the token generate just chose to the guide context."""
        self._guide_mask = torch.cat([self._guide_mask, self._guide_mask.new_ones((self._guide_mask.shape[0], 1))], dim=1)
        out = self.model(
            input_ids=input_ids[:, -1:], attention_mask=self._guide_mask,
            position_ids=self._guide_mask.sum(dim=1, keepdim=True) - 1, past_key_values=self._cache, use_cache=True,
        )
        self._cache = out.past_key_values
        return out.logits[:, -1]

    def _tempered(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float() / (self.temperature or 1.0), dim=-1)

    def _settle(self, tokens: torch.Tensor) -> None:
        """Record the last step's plain and guide log-probs at the token that step produced."""
        plain, guide = self._pending
        chosen = tokens.unsqueeze(1)
        self._recorded.append((plain.gather(1, chosen).squeeze(1), guide.gather(1, chosen).squeeze(1)))

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] != self._expected_width:  # a new generate call
            self._reset()
            guide_logits = self._start(input_ids, scores.shape[1])
        else:
            self._settle(input_ids[:, -1])
            guide_logits = self._advance(input_ids)
        self._expected_width = input_ids.shape[1] + 1
        weights = torch.stack([self._rows_lam, 1.0 - self._rows_lam], dim=1)
        mixed = mix_logprobs([scores, guide_logits], weights)
        self._pending = (self._tempered(scores), self._tempered(guide_logits))
        self._last_mixed = mixed.clone()
        return mixed

    def rollout(
        self, outputs, prompt_attention_mask: torch.Tensor | None = None, eos_token_id: int | Sequence[int] | None = None
    ) -> GuidedRollout:
        """The records of the last `generate` call as a `GuidedRollout` (one rollout per generated row).

        Args:
            outputs: what `generate` returned with `output_scores=True, return_dict_in_generate=True`.
            prompt_attention_mask: the plain prompts' `[B, L]` attention mask given to `generate` (to strip
                left padding from `prompt_ids`); None means unpadded.
            eos_token_id: end-of-sequence id(s) (default: the model's generation config).
        """
        scores = getattr(outputs, "scores", None)
        if scores is None or self._pending is None:
            raise ValueError(
                "rollout needs generate(..., output_scores=True, return_dict_in_generate=True) run with this processor"
            )
        sequences = outputs.sequences
        rows = sequences.shape[0]
        completion_ids = sequences[:, self._prompt_width :]
        completion_mask = self._completion_mask(completion_ids, eos_token_id)
        step_scores = torch.stack([step.float() for step in scores], dim=1)  # [rows, steps, V]
        self._check_temperature(step_scores, completion_ids, completion_mask)
        self._settle(completion_ids[:, -1])
        plain, guide = (torch.stack(values, dim=1) for values in zip(*self._recorded))
        if self.temperature == 0:
            logprobs = torch.zeros_like(plain)
        else:
            logprobs = torch.log_softmax(step_scores, dim=-1).gather(2, completion_ids.unsqueeze(2)).squeeze(2)
        if prompt_attention_mask is None:
            prompt_mask = torch.ones_like(sequences[:, : self._prompt_width], dtype=torch.bool)
        else:
            prompt_mask = prompt_attention_mask.bool().to(sequences.device)
            prompt_mask = prompt_mask.repeat_interleave(rows // prompt_mask.shape[0], dim=0)
        prompts = self.guide_input_ids.shape[0]
        return GuidedRollout(
            prompt_ids=[row[mask].tolist() for row, mask in zip(sequences[:, : self._prompt_width], prompt_mask)],
            completion_ids=completion_ids.cpu(),
            completion_mask=completion_mask.cpu(),
            logprobs=(logprobs * completion_mask).cpu(),
            plain_logprobs=(plain * completion_mask).cpu(),
            guide_logprobs=(guide * completion_mask).cpu(),
            lam=self._rows_lam.cpu(),
            guided=(self._rows_lam < 1).cpu(),
            desynced=torch.zeros(rows, dtype=torch.bool),
            group_ids=torch.arange(prompts).repeat_interleave(rows // prompts),
        )

    def _completion_mask(self, completion_ids: torch.Tensor, eos_token_id) -> torch.Tensor:
        """Real tokens: everything up to and including the first EOS of each row."""
        if eos_token_id is None:
            eos_token_id = self.model.generation_config.eos_token_id
        eos = torch.as_tensor([] if eos_token_id is None else eos_token_id, device=completion_ids.device).flatten()
        is_eos = torch.isin(completion_ids, eos)
        return (is_eos.cumsum(dim=1) - is_eos.long()) == 0

    def _check_temperature(self, step_scores: torch.Tensor, completion_ids: torch.Tensor, real: torch.Tensor) -> None:
        """generate's warpers divide the mixture by its temperature, so the last scores reveal a mismatch;
        under temperature 0 every real token must be its step's argmax, else generate was sampling."""
        last = step_scores[:, -1]
        kept = torch.isfinite(last) & torch.isfinite(self._last_mixed)
        expected = self._last_mixed / (self.temperature or 1.0)
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


# ---------------------------------------------------------------------------------------------------------
# guided_generate: both contexts as rows of one batched forward
# ---------------------------------------------------------------------------------------------------------


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

    def row_tokens(self, rollout_tokens: torch.Tensor) -> torch.Tensor:
        """The next input token of every row: a rollout's token feeds its plain and its guide row."""
        return torch.cat([rollout_tokens, rollout_tokens[self.guided]])


def _shared_prefix_lengths(contexts: list[list[int]], context_prompt: list[int]) -> list[int]:
    """Per prompt, the token prefix all its contexts share, leaving each context at least one token."""
    lengths: dict[int, int] = {}
    firsts: dict[int, list[int]] = {}
    for context, prompt in zip(contexts, context_prompt):
        first = firsts.setdefault(prompt, context)
        shared = next((i for i, (a, b) in enumerate(zip(first, context)) if a != b), min(len(first), len(context)))
        lengths[prompt] = min(lengths.get(prompt, len(first) - 1), shared, len(context) - 1)
    return [lengths[prompt] for prompt in sorted(lengths)]


def _prefill(model, contexts: list[list[int]], context_prompt: list[int], row_context: torch.Tensor, pad_id: int):
    """Run the contexts once each (the prefix a prompt's plain and guide contexts share only once), then give
    every decode row a copy of its context's cache.

    Two forwards: the shared prefixes, one row per prompt; then each context's remaining tokens on a copy of
    its prompt's prefix cache (a row's padding then sits between its prefix and its suffix: the attention
    mask and the positions skip it). Returns the first-step logits `[rows, V]`, the cache and the attention
    mask of the rows.
    """
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


@torch.no_grad()
def guided_generate(
    model,
    tokenizer,
    prompts: Sequence,
    answers: Sequence[str],
    *,
    lam,
    num_generations: int = 1,
    max_new_tokens: int,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    seed: int | None = None,
    hint_template: str = DEFAULT_HINT_TEMPLATE,
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
        lam: float, one per prompt, or one per rollout (len(prompts) · num_generations).
        temperature, top_k, top_p, min_p: applied to q as in `prodsample.product_sample`; temperature 0 is greedy.
        seed: the noise key; None draws one from torch's global RNG (so `torch.manual_seed` reproduces it).

    Returns:
        `GuidedRollout` with R = len(prompts) · num_generations rollouts, prompt-major. For λ = 1 rollouts the
        guide context is never run and `guide_logprobs` repeats `plain_logprobs`.

    Example:
        >>> rollout = guided_generate(model, tokenizer, ["What is 2+3?"], ["5"], lam=0.5,  # doctest: +SKIP
        ...                           num_generations=4, max_new_tokens=32, seed=0)
        >>> rollout.completion_ids.shape, rollout.logprobs.shape  # doctest: +SKIP
        (torch.Size([4, L]), torch.Size([4, L]))
    """
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    settings = SamplingSettings(lam, temperature, top_k, top_p, min_p)
    _check_tokenizer_matches(model, tokenizer)
    plain_contexts, guide_contexts = build_contexts(tokenizer, prompts, answers, hint_template)
    num_prompts = len(prompts)
    lam_rows = settings.lam_per_rollout(num_prompts, num_generations)
    group_ids = torch.arange(num_prompts).repeat_interleave(num_generations)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    device = model.device

    guided = lam_rows < 1.0
    guided_prompts = sorted(set(group_ids[guided].tolist()))
    guide_context_index = {prompt: num_prompts + k for k, prompt in enumerate(guided_prompts)}
    contexts = plain_contexts + [guide_contexts[prompt] for prompt in guided_prompts]
    context_prompt = list(range(num_prompts)) + guided_prompts
    row_context = torch.cat(
        [group_ids, torch.tensor([guide_context_index[int(p)] for p in group_ids[guided]], dtype=torch.long)]
    )
    pad_id, eos_ids = _pad_id(tokenizer), _eos_ids(model, tokenizer)

    rollouts = num_prompts * num_generations
    record = {
        name: torch.zeros(rollouts, max_new_tokens, dtype=torch.float32)
        for name in ("logprobs", "plain_logprobs", "guide_logprobs")
    }
    completion_ids = torch.full((rollouts, max_new_tokens), pad_id, dtype=torch.long)
    lengths = torch.zeros(rollouts, dtype=torch.long)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    lam_device = lam_rows.to(device)

    with _EvalMode(model):
        logits, cache, attention_mask = _prefill(model, contexts, context_prompt, row_context, pad_id)
        batch = _DecodeBatch(cache, attention_mask, torch.arange(rollouts, device=device), guided.to(device))
        for position in range(max_new_tokens):
            plain_logits, guide_logits = batch.split_logits(logits)
            drawn = product_sample(
                plain_logits,
                guide_logits,
                lam_device[batch.rollouts],
                **settings.sampler_kwargs(),
                seed=seed,
                rollout_ids=batch.rollouts,
                positions=position,
            )
            rows = batch.rollouts.cpu()
            completion_ids[rows, position] = drawn.token_ids.cpu()
            for name in record:
                record[name][rows, position] = getattr(drawn, name).cpu()
            lengths[rows] = position + 1
            running = ~torch.isin(drawn.token_ids, eos)
            if position + 1 == max_new_tokens or not bool(running.any()):
                break
            batch.keep(running)
            next_tokens = batch.row_tokens(drawn.token_ids[running])
            batch.attention_mask = torch.cat(
                [batch.attention_mask, batch.attention_mask.new_ones((batch.attention_mask.shape[0], 1))], dim=1
            )
            positions = batch.attention_mask.sum(dim=1, keepdim=True) - 1
            out = model(
                input_ids=next_tokens.unsqueeze(1),
                attention_mask=batch.attention_mask,
                position_ids=positions,
                past_key_values=batch.cache,
                use_cache=True,
            )
            batch.cache = out.past_key_values
            logits = out.logits[:, -1]

    width = int(lengths.max())
    completion_mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    return GuidedRollout(
        prompt_ids=[list(plain_contexts[int(group)]) for group in group_ids],
        completion_ids=completion_ids[:, :width],
        completion_mask=completion_mask,
        **{name: values[:, :width] * completion_mask for name, values in record.items()},
        lam=lam_rows.clone(),
        guided=guided.clone(),
        desynced=torch.zeros(rollouts, dtype=torch.bool),
        group_ids=group_ids,
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


@torch.no_grad()
def score(
    model,
    tokenizer,
    prompts: Sequence,
    answers: Sequence[str],
    completions: Sequence[Sequence[int]],
    *,
    lam,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    hint_template: str = DEFAULT_HINT_TEMPLATE,
) -> GuidedRollout:
    """Teacher-forced log q, log π(o | prompt) and log π(o | prompt ⊕ hint) for given completions.

    One prompt, answer and completion (token ids) per rollout; two batched forwards (plain contexts, and
    guide contexts for rollouts with λ < 1). With the sampler's λ, temperature and filters it reproduces what
    `guided_generate` (or any backend) recorded: the oracle for every sampler, and the way a trainer
    recomputes log q when an engine cannot send its records back.

    Returns:
        `GuidedRollout` whose `completion_ids` are the given completions (right-padded) and whose log-prob
        fields are the teacher-forced values; `group_ids` index the given rows.
    """
    if len(completions) != len(prompts):
        raise ValueError(f"completions must have one entry per prompt ({len(prompts)}), got {len(completions)}")
    for i, completion in enumerate(completions):
        if len(completion) == 0:
            raise ValueError(f"completions[{i}] is empty; score needs at least one token per completion")
    settings = SamplingSettings(lam, temperature, top_k, top_p, min_p)
    _check_tokenizer_matches(model, tokenizer)
    plain_contexts, guide_contexts = build_contexts(tokenizer, prompts, answers, hint_template)
    rollouts = len(completions)
    lam_rows = settings.lam_per_rollout(rollouts, 1)
    guided = lam_rows < 1.0
    pad_id = _pad_id(tokenizer)
    completions = [list(map(int, completion)) for completion in completions]

    with _EvalMode(model):
        plain_logits = _completion_logits(model, plain_contexts, completions, pad_id)
        guided_rows = guided.nonzero().squeeze(1).tolist()
        guide_logits = list(plain_logits)
        if guided_rows:
            computed = _completion_logits(
                model, [guide_contexts[r] for r in guided_rows], [completions[r] for r in guided_rows], pad_id
            )
            for row, logits in zip(guided_rows, computed):
                guide_logits[row] = logits

    lengths = torch.tensor([len(completion) for completion in completions])
    token_lam = lam_rows.repeat_interleave(lengths)
    scored = product_logprobs(
        torch.cat(plain_logits),
        torch.cat(guide_logits),
        token_lam.to(model.device),
        torch.tensor([token for completion in completions for token in completion], device=model.device),
        **settings.sampler_kwargs(),
    )
    width = int(lengths.max())
    completion_mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)

    def padded(values: torch.Tensor, fill) -> torch.Tensor:
        out = torch.full((rollouts, width), fill, dtype=values.dtype)
        out[completion_mask] = values.cpu()
        return out

    return GuidedRollout(
        prompt_ids=[list(ids) for ids in plain_contexts],
        completion_ids=padded(scored.token_ids, pad_id),
        completion_mask=completion_mask,
        logprobs=padded(scored.logprobs, 0.0),
        plain_logprobs=padded(scored.plain_logprobs, 0.0),
        guide_logprobs=padded(scored.guide_logprobs, 0.0),
        lam=lam_rows.clone(),
        guided=guided,
        desynced=torch.zeros(rollouts, dtype=torch.bool),
        group_ids=torch.arange(rollouts),
    )
