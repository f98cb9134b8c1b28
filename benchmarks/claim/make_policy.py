"""Train the claim experiment's tiny policy from scratch, seeded, and save the checkpoint every run starts from.

    python -m prodsample.benchmarks.claim.make_policy [--out benchmarks/claim/policy]

The warm-up is supervised next-token training on the completion (answer + EOS) of four kinds of rows:
easy problems (`EASY_DIFFICULTY`) in the plain and the hinted format, and problems of the RL difficulty
from their own seed (disjoint from the RL and held-out sets), always in the hinted format and, for a small
share (`--hard-plain-share`), in the plain format. The hinted rows teach the policy to use the answer;
the few plain hard rows leave it a partial skill on the RL distribution for RL to sharpen (with none, a
probe found nothing to sharpen: see PROTOCOL.md). At the end it records, on the held-out set, the plain
greedy pass@1, mean@k and pass@k at the training temperature, and the hinted greedy accuracy.

With `--ladder` it makes the difficulty ladder's checkpoint (issue 12) instead: easy rows as above, every
ladder level hinted (`--num-hinted` problems per level), and plain rows only for the levels and counts that
`--plain-rows` names (e.g. `A=1000 B=300`; level C gets none); it records the figures per level on the
ladder's held-out split and the gate of PROTOCOL-ladder.md.

    python -m prodsample.benchmarks.claim.make_policy --ladder --plain-rows A=1000 B=300 --out DIR

`--ladder-version v2` makes a checkpoint for the second ladder (PROTOCOL-ladder-v2.md): its levels and answer
format, and its gate, read on the validation split against the chance floor (`gate_v2`); the held-out figures
are recorded beside it.
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
    LADDERS,
    RL_DIFFICULTY,
    WARMUP_EASY_SEED,
    WARMUP_HARD_SEED,
    build_tokenizer,
    ladder_seed,
    ladder_sets,
    make_problems,
    policy_config,
    rl_and_held_out,
)

POLICY = Path(__file__).parent / "policy"  # the committed checkpoint every run starts from; shipped in the wheel
# Written relative to the working directory: the clone's copies when run from its root, never an installed package.
DEFAULT_OUT = Path("benchmarks") / "claim" / "policy"
DEFAULT_LADDER_OUT = Path("benchmarks") / "claim" / "ladder-policy"

# PROTOCOL-ladder.md's gate, on the ladder's held-out split: (low, high) bounds of plain pass@8 at T = 1 per level,
# and the hinted context's greedy accuracy at every level (the teacher must read the hint).
GATE_PASS_AT_K = {"A": (0.10, 0.35), "B": (0.02, 0.10), "C": (0.0, 0.01)}
GATE_HINTED_GREEDY = 0.95


def gate(figures: dict[str, dict]) -> dict:
    """Each criterion of the gate, met or not, from per-level evaluation figures."""
    checks = {}
    for level, (low, high) in GATE_PASS_AT_K.items():
        checks[f"{level}_pass_at_k_in_[{low},{high}]"] = low <= figures[level]["pass_at_k"] <= high
        checks[f"{level}_hinted_greedy_>=_{GATE_HINTED_GREEDY}"] = figures[level]["hinted_greedy"] >= GATE_HINTED_GREEDY
    return {"passed": all(checks.values()), "checks": checks}


# PROTOCOL-ladder-v2.md's gate, on the validation split: C zero-pass (greedy, and pass@8 within a point of the
# chance floor), A a signal for plain GRPO, B between them, the teacher reading the hint, guidance reaching C.
GATE_V2 = {"C_greedy_max": 0.01, "C_over_chance_max": 0.01, "A_pass_at_k_min": 0.10, "hinted_greedy_min": 0.95,
           "C_guided_reward_min": 0.30}


def gate_v2(figures: dict[str, dict]) -> dict:
    """Each criterion of the second ladder's gate, met or not, from per-level validation figures (level C's with
    `pass_at_k_chance` and `guided_mean_at_k`)."""
    a, c = figures["A"], figures["C"]
    b = figures.get("B", {"pass_at_k": c["pass_at_k"]})  # a ladder without B: nothing to lie between
    checks = {
        f"C_greedy_<=_{GATE_V2['C_greedy_max']}": c["greedy_pass1"] <= GATE_V2["C_greedy_max"],
        f"C_pass_at_k_<=_chance_+_{GATE_V2['C_over_chance_max']}":
            c["pass_at_k"] <= c["pass_at_k_chance"] + GATE_V2["C_over_chance_max"],
        f"A_pass_at_k_>=_{GATE_V2['A_pass_at_k_min']}": a["pass_at_k"] >= GATE_V2["A_pass_at_k_min"],
        "B_pass_at_k_between_C_and_A": c["pass_at_k"] <= b["pass_at_k"] <= a["pass_at_k"],  # (v3: C ≤ A)
        f"C_guided_reward_>=_{GATE_V2['C_guided_reward_min']}": c["guided_mean_at_k"] >= GATE_V2["C_guided_reward_min"],
    }
    for level, level_figures in figures.items():
        checks[f"{level}_hinted_greedy_>=_{GATE_V2['hinted_greedy_min']}"] = (
            level_figures["hinted_greedy"] >= GATE_V2["hinted_greedy_min"])
    return {"passed": all(checks.values()), "checks": checks}


def warmup_rows(num_easy: int, num_hard: int, hard_plain_share: float, exclude: set[str], seed: int):
    """(prompt, completion) text pairs of the warm-up, before shuffling."""
    easy = make_problems(EASY_DIFFICULTY, num_easy, WARMUP_EASY_SEED + seed, exclude)
    hard = make_problems(RL_DIFFICULTY, num_hard, WARMUP_HARD_SEED + seed, exclude)
    hinted = lambda p: HINT_TEMPLATE.format(prompt=p.prompt, answer=p.answer)  # noqa: E731
    rows = [(p.prompt, p.answer) for p in easy] + [(hinted(p), p.answer) for p in easy + hard]
    rows += [(p.prompt, p.answer) for p in hard[: round(hard_plain_share * len(hard))]]
    return rows


def ladder_warmup_rows(num_easy: int, num_hinted: int, plain_rows: dict[str, int], exclude: set[str], seed: int,
                       easy_plain_max_terms: int = EASY_DIFFICULTY.max_terms, ladder=LADDERS["v1"]):
    """Easy rows (hinted, and plain up to `easy_plain_max_terms` terms), every ladder level hinted, and
    `plain_rows[level]` plain rows per level.

    Plain easy rows of three terms teach a 3-term skill that transfers to level C (attempts 1-2 of the gate in
    PROTOCOL-ladder.md); `easy_plain_max_terms=2` keeps every 3-term problem hinted only.
    """
    unknown = set(plain_rows) - set(ladder.levels)
    if unknown:
        raise ValueError(f"plain_rows names unknown levels {sorted(unknown)}; levels are {list(ladder.levels)}")
    too_many = {level: n for level, n in plain_rows.items() if not 0 <= n <= num_hinted}
    if too_many:
        raise ValueError(f"plain_rows must lie in [0, num_hinted={num_hinted}] per level, got {too_many}")
    easy = make_problems(ladder.easy, num_easy, WARMUP_EASY_SEED + seed, exclude, ladder.answer_format)
    hinted = lambda p: HINT_TEMPLATE.format(prompt=p.prompt, answer=p.answer)  # noqa: E731
    rows = [(p.prompt, p.answer) for p in easy if p.expression.count(" ") // 2 + 1 <= easy_plain_max_terms]
    rows += [(hinted(p), p.answer) for p in easy]
    for level, difficulty in ladder.levels.items():
        problems = make_problems(difficulty, num_hinted, ladder_seed("warmup", level) + seed, exclude,
                                 ladder.answer_format)
        rows += [(hinted(p), p.answer) for p in problems]
        rows += [(p.prompt, p.answer) for p in problems[: plain_rows.get(level, 0)]]
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


def fit(model, tokenizer, rows, args) -> float:
    """Supervised warm-up on shuffled `rows`; returns the seconds it took."""
    shuffle = random.Random(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    # OneCycle ends at initial/final_div_factor with initial = max/25; by default (final_lr_fraction 4e-6) as
    # torch's default, near 0. A warm-up that ends higher leaves a minimum that RL's own rate does not leave at once.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05,
                                                   final_div_factor=1 / (25 * args.final_lr_fraction))
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
    return time.perf_counter() - start


def train(args) -> dict:
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(policy_config(tokenizer, hidden_size=args.hidden, layers=args.layers))
    evaluation = dict(k=args.k, temperature=args.temperature, seed=args.seed, hinted=True)
    if args.ladder:
        ladder = LADDERS[args.ladder_version]
        sets = ladder_sets(ladder=ladder)
        exclude = {p.expression for split in sets.values() for problems in split.values() for p in problems}
        rows = ladder_warmup_rows(args.num_easy, args.num_hinted, args.plain_rows, exclude, args.seed,
                                  args.easy_plain_max_terms, ladder)
        train_seconds = fit(model, tokenizer, rows, args)
        figures = ladder_figures(model, tokenizer, sets, args.ladder_version, evaluation)
    else:
        sets = rl_and_held_out(args.num_rl, args.num_held_out)
        exclude = {p.expression for p in sets.held_out + sets.rl}
        rows = warmup_rows(args.num_easy, args.num_hard, args.hard_plain_share, exclude, args.seed)
        train_seconds = fit(model, tokenizer, rows, args)
        figures = {
            "held_out": evaluate(model, tokenizer, sets.held_out, **evaluation),
            "rl_set_sample": evaluate(model, tokenizer, sets.rl[: args.num_held_out], **evaluation),
        }
    record = {
        "args": vars(args) | {"out": str(args.out)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "warmup_rows": len(rows),
        "train_seconds": round(train_seconds, 1),
        **figures,
    }
    print(json.dumps(record, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "warmup.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def ladder_figures(model, tokenizer, sets, version: str, evaluation: dict) -> dict:
    """The held-out figures per level and the gate: v1's on held-out; v2's on validation, with level C's chance
    floor and guided reward at λ = ½ (the schedule's start), the held-out split reported beside it."""
    held_out = {level: evaluate(model, tokenizer, problems, **evaluation) for level, problems in sets["held_out"].items()}
    if version == "v1":
        return {"held_out": held_out, "gate": gate(held_out)}
    validation = {level: evaluate(model, tokenizer, problems, **evaluation,
                                  **(dict(chance=True, guided_lam=0.5) if level == "C" else {}))
                  for level, problems in sets["validation"].items()}
    return {"validation": validation, "held_out": held_out, "gate": gate_v2(validation)}


def _level_counts(text: str) -> tuple[str, int]:
    level, _, count = text.partition("=")
    if not count.isdigit():
        raise argparse.ArgumentTypeError(f"--plain-rows entries are LEVEL=COUNT (e.g. A=1000), got {text!r}")
    return level, int(count)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default {DEFAULT_OUT} ({DEFAULT_LADDER_OUT} with --ladder), in the working directory")
    parser.add_argument("--ladder", action="store_true", help="make the difficulty ladder's checkpoint")
    parser.add_argument("--ladder-version", choices=sorted(LADDERS), default="v1",
                        help="--ladder: which ladder (PROTOCOL-ladder.md: v1, PROTOCOL-ladder-v2.md: v2)")
    parser.add_argument("--num-hinted", type=int, default=2000, help="--ladder: hinted warm-up problems per level")
    parser.add_argument("--easy-plain-max-terms", type=int, default=EASY_DIFFICULTY.max_terms,
                        help="--ladder: plain easy rows only up to this many terms (the rest hinted only)")
    parser.add_argument("--plain-rows", type=_level_counts, nargs="*", default=[], help="--ladder: LEVEL=COUNT ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--final-lr-fraction", type=float, default=4e-6,
                        help="the warm-up's last learning rate as a fraction of --lr (OneCycle's cosine end)")
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
    args.out = args.out or (DEFAULT_LADDER_OUT if args.ladder else DEFAULT_OUT)
    args.plain_rows = dict(args.plain_rows)
    torch.set_num_threads(args.threads)
    return args


if __name__ == "__main__":
    train(parse_args())
