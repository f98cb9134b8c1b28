"""Train the claim experiment's tiny policy from scratch, seeded, and save the checkpoint every run starts from.

    python -m prodsample.benchmarks.claim.make_policy [--out benchmarks/claim/policy]

The warm-up is supervised next-token training on the completion (answer + EOS) of four kinds of rows:
easy problems (`EASY_DIFFICULTY`) in the plain and the hinted format, and problems of the RL difficulty
from their own seed (disjoint from the RL and held-out sets), always in the hinted format and, for a small
share (`--hard-plain-share`), in the plain format. The hinted rows teach the policy to use the answer;
the few plain hard rows leave it a partial skill on the RL distribution for RL to sharpen (with none, a
probe found nothing to sharpen: see PROTOCOL.md). At the end it records, on the held-out set, the plain
greedy pass@1, mean@k and pass@k at the training temperature, and the hinted greedy accuracy.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from .evaluate import evaluate
from .task import (
    EASY_DIFFICULTY,
    HINT_TEMPLATE,
    RL_DIFFICULTY,
    WARMUP_EASY_SEED,
    WARMUP_HARD_SEED,
    build_tokenizer,
    make_problems,
    policy_config,
    rl_and_held_out,
)

POLICY = Path(__file__).parent / "policy"  # the committed checkpoint every run starts from; shipped in the wheel
# Relative to the working directory: the clone's committed copy when run from its root, never an installed package.
DEFAULT_OUT = Path("benchmarks") / "claim" / "policy"


def warmup_rows(num_easy: int, num_hard: int, hard_plain_share: float, exclude: set[str], seed: int):
    """(prompt, completion) text pairs of the warm-up, before shuffling."""
    easy = make_problems(EASY_DIFFICULTY, num_easy, WARMUP_EASY_SEED + seed, exclude)
    hard = make_problems(RL_DIFFICULTY, num_hard, WARMUP_HARD_SEED + seed, exclude)
    hinted = lambda p: HINT_TEMPLATE.format(prompt=p.prompt, answer=p.answer)  # noqa: E731
    rows = [(p.prompt, p.answer) for p in easy] + [(hinted(p), p.answer) for p in easy + hard]
    rows += [(p.prompt, p.answer) for p in hard[: round(hard_plain_share * len(hard))]]
    return rows


def encode_batch(tokenizer, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and labels that score only the completion and its EOS."""
    sequences, targets = [], []
    for prompt, completion in rows:
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append(prompt_ids + completion_ids)
        targets.append([-100] * len(prompt_ids) + completion_ids)
    width = max(map(len, sequences))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (sequence, target) in enumerate(zip(sequences, targets)):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, : len(target)] = torch.tensor(target)
        mask[row, : len(sequence)] = 1
    return ids, mask, labels


def train(args) -> dict:
    torch.manual_seed(args.seed)
    shuffle = random.Random(args.seed)
    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(policy_config(tokenizer, hidden_size=args.hidden, layers=args.layers))
    sets = rl_and_held_out(args.num_rl, args.num_held_out)
    exclude = {p.expression for p in sets.held_out + sets.rl}
    rows = warmup_rows(args.num_easy, args.num_hard, args.hard_plain_share, exclude, args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    start, order = time.perf_counter(), []
    model.train()
    for step in range(args.steps):
        if len(order) < args.batch_size:
            order += shuffle.sample(range(len(rows)), len(rows))
        batch, order = [rows[i] for i in order[: args.batch_size]], order[args.batch_size :]
        ids, mask, labels = encode_batch(tokenizer, batch)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} {time.perf_counter() - start:.0f}s", flush=True)
    train_seconds = time.perf_counter() - start
    figures = evaluate(model, tokenizer, sets.held_out, k=args.k, temperature=args.temperature, seed=args.seed,
                       hinted=True)
    rl_figures = evaluate(model, tokenizer, sets.rl[: args.num_held_out], k=args.k, temperature=args.temperature,
                          seed=args.seed, hinted=True)
    record = {
        "args": vars(args) | {"out": str(args.out)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "warmup_rows": len(rows),
        "train_seconds": round(train_seconds, 1),
        "held_out": figures,
        "rl_set_sample": rl_figures,
    }
    print(json.dumps(record, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "warmup.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory (default: %(default)s, in the working directory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--num-easy", type=int, default=1000)
    parser.add_argument("--num-hard", type=int, default=4000)
    parser.add_argument("--hard-plain-share", type=float, default=0.35)
    parser.add_argument("--num-rl", type=int, default=2000)
    parser.add_argument("--num-held-out", type=int, default=500)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


if __name__ == "__main__":
    train(parse_args())
