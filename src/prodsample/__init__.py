"""prodsample: answer-guided product-distribution sampling for RL rollouts.

Each token is drawn from q_t(v) ∝ π(v | prompt, o<t)^λ · π(v | prompt ⊕ hint, o<t)^(1−λ), and every
rollout carries the exact per-token log q and log π(o | prompt) a trainer needs for off-policy correction.
The core (`mixing`, `fused`, `sampling`, `settings`, `noise`, `importance`, `schedules`) imports neither
transformers nor vllm; `prodsample.hf`, `prodsample.vllm` and `prodsample.trl` adapt it to one framework each.
"""

from .fused import ProductSample
from .mixing import mix_logprobs
from .rollout import GuidedRollout
from .sampling import product_logprobs, product_sample
from .settings import SamplingSettings

__version__ = "0.1.0"
__all__ = [
    "mix_logprobs",
    "product_sample",
    "product_logprobs",
    "ProductSample",
    "SamplingSettings",
    "GuidedRollout",
    "__version__",
]
