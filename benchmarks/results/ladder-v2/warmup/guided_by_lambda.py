# Diagnostic, not a gate attempt: level C's guided reward (validation, G = 8, T = 1, the gate's seeds) at several
# λ per v3 warm-up checkpoint. Usage: python guided_by_lambda.py CHECKPOINT_DIR ...  (output: guided-by-lambda.json)
import json
import sys

import torch
from transformers import LlamaForCausalLM

from prodsample.benchmarks.claim.evaluate import evaluate
from prodsample.benchmarks.claim.task import LADDERS, build_tokenizer, ladder_sets

torch.set_num_threads(1)

out = {}
for checkpoint in sys.argv[1:]:
    model = LlamaForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = build_tokenizer()
    problems = ladder_sets(ladder=LADDERS["v3"])["validation"]["C"]
    out[checkpoint] = {lam: round(evaluate(model, tokenizer, problems, k=8, temperature=1.0, seed=0, guided_lam=lam)["guided_mean_at_k"], 4)
                       for lam in (0.5, 0.25, 0.0)}
    print(checkpoint, out[checkpoint], flush=True)
print(json.dumps(out))
