"""The fused pass as `torch.compile` of the eager reference: the fast CPU path (and a GPU baseline).

Inductor fuses `reference_fused_sample`'s dozen full-size ops (the noise hash, the mixed logits, five
log-sum-exps, two argmaxes) into row loops that keep a row in cache, so its outputs are the reference's
up to float rounding, with no second implementation to keep in step. One compiled graph serves every
call, so compile cost is paid once per process (and mostly served from Inductor's on-disk cache after):

- batch and vocabulary are dynamic (`dynamic=True`);
- a batch of one is padded to two rows, since a size-1 dimension would be specialised and recompiled;
- a vocabulary of at most 4096 tokens is padded with −inf logits to MIN_COMPILED_VOCAB, since Inductor
  guards its long-reduction code on V > 4096 (a padded token is never drawn and adds exp(−inf) = 0);
- the threshold is always a tensor (−inf = no filter, which keeps every token, −inf included), so
  filtered and unfiltered calls share the graph;
- logits are cast to float32 and the per-row settings made contiguous first, so the input dtype and
  broadcast (stride-0) settings add no graphs either.
"""

from __future__ import annotations

import functools
import math

import torch

from prodsample.fused import FusedInputs, ProductSample, reference_fused_sample

__all__ = ["compiled_fused_sample"]

MIN_COMPILED_VOCAB = 4097


@functools.cache
def _compiled_reference():
    return torch.compile(reference_fused_sample, dynamic=True)


def compiled_fused_sample(inputs: FusedInputs) -> ProductSample:
    """`reference_fused_sample` compiled once for all shapes; same inputs and `[B]` outputs (no autograd)."""
    rows, vocab = inputs.plain_logits.shape
    if rows == 0:  # an empty batch would need a graph of its own; eager answers it at once
        return reference_fused_sample(inputs)
    threshold = inputs.threshold
    if threshold is None:
        threshold = torch.full((rows,), -math.inf, device=inputs.plain_logits.device)
    row_settings = [x.float().contiguous() for x in (inputs.lam, inputs.temperature, threshold)]
    row_settings.append(inputs.keys.contiguous())
    logits = [inputs.plain_logits.float(), inputs.guide_logits.float()]
    if vocab < MIN_COMPILED_VOCAB:
        logits = [torch.nn.functional.pad(x, (0, MIN_COMPILED_VOCAB - vocab), value=-math.inf) for x in logits]
    if rows == 1:
        logits = [x.expand(2, -1).contiguous() for x in logits]
        row_settings = [x.expand(2).contiguous() for x in row_settings]
    with torch.no_grad():
        result = _compiled_reference()(FusedInputs(*logits, *row_settings))
    return ProductSample(*(x[:rows] for x in result))
