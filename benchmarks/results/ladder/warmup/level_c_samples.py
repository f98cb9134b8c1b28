"""What the warm-ups' plain policy gets right on level C: is the gate's C bound above chance for this model?

    bash scripts/with-env.sh python benchmarks/results/ladder/warmup/level_c_samples.py DIR [DIR ...]

DIR is a warm-up checkpoint (make_policy --ladder --out DIR). Samples 8 plain rollouts at T = 1 per held-out C
problem with the runs' evaluation seed (10000 + chunk start; the gate's own draw used seed 0, so this is an
independent second draw of pass@8) and prints the
correct samples, the distinct problems they solve, how many samples are within 10 of the answer, and how many
repeat the first two terms' result.
"""

import re
import sys

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from prodsample.benchmarks.claim.task import HINT_TEMPLATE, MAX_NEW_TOKENS, ladder_sets, reward
from prodsample.hf import guided_generate

K, CHUNK = 8, 32
torch.set_num_threads(1)
problems = ladder_sets()["held_out"]["C"]
for path in sys.argv[1:]:
    model, tokenizer = LlamaForCausalLM.from_pretrained(path).eval(), PreTrainedTokenizerFast.from_pretrained(path)
    solved, near, first_two = [], 0, 0
    with torch.no_grad():
        for start in range(0, len(problems), CHUNK):
            chunk = problems[start : start + CHUNK]
            rollout = guided_generate(model, tokenizer, [p.prompt for p in chunk], [p.answer for p in chunk], lam=1.0,
                                      num_generations=K, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0,
                                      seed=10_000 + start, hint_template=HINT_TEMPLATE)
            for row, text in enumerate(tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)):
                problem, text = chunk[row // K], text.strip()
                first_two += text == str(eval(" ".join(problem.expression.split()[:3])))
                near += re.fullmatch(r"-?\d+", text) is not None and abs(int(text) - int(problem.answer)) <= 10
                if reward(text, problem):
                    solved.append((problem.expression, problem.answer))
    samples = K * len(problems)
    print(f"{path}: {len(solved)}/{samples} correct samples on {len(set(solved))}/{len(problems)} problems; "
          f"within 10 of the answer {near / samples:.3f}; first two terms' result {first_two / samples:.3f}; "
          f"solved {sorted(set(solved))}")
