"""The task, its disjoint problem sets, the character tokenizer and the tiny policy's architecture.

Family: reasoning-gym `chain_sum` (integer sums and differences), answered directly with no reasoning
trace, so a rollout is a handful of tokens and thousands of GRPO steps fit in a CPU budget. A problem is
shown as its bare expression, e.g. the plain prompt `"58 - 91 + 7="`; the hinted prompt appends the answer
(`HINT_TEMPLATE`), and the completion is the answer followed by EOS. The verifier is the dataset's own
`score_answer`.

Problem sets come from reasoning-gym with separate seeds and are made disjoint by string: the held-out set
is drawn first, then the RL set excludes its expressions, then the warm-up excludes both.

The difficulty ladder (issue 12, `LADDER`) uses the same family at three levels, each with three splits
(held-out, validation, training) drawn in that order from seeds of their own, each excluding the ones
drawn before it; the ladder's warm-up excludes all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import reasoning_gym
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, PreTrainedTokenizerFast

HINT_TEMPLATE = "{prompt}[{answer}]"
VOCAB_CHARS = "0123456789+-= []"
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]
MAX_NEW_TOKENS = 6  # the longest answer ("-2997" at most for the sets below) plus EOS


@dataclass(frozen=True)
class Difficulty:
    """A `chain_sum` configuration: number of terms and digits per term (each drawn per problem)."""

    min_terms: int
    max_terms: int
    min_digits: int
    max_digits: int


@dataclass(frozen=True)
class Problem:
    expression: str
    answer: str
    entry: dict  # the reasoning-gym entry, kept for its verifier

    @property
    def prompt(self) -> str:
        return f"{self.expression}="


# The RL distribution and the held-out set share it; the warm-up mixes easier instances with a share of it.
RL_DIFFICULTY = Difficulty(min_terms=2, max_terms=2, min_digits=2, max_digits=2)
EASY_DIFFICULTY = Difficulty(min_terms=2, max_terms=3, min_digits=1, max_digits=1)

HELD_OUT_SEED, RL_SEED, WARMUP_EASY_SEED, WARMUP_HARD_SEED = 1_000, 2_000, 3_000, 4_000


def _dataset(difficulty: Difficulty, size: int, seed: int):
    return reasoning_gym.create_dataset(
        "chain_sum",
        min_terms=difficulty.min_terms,
        max_terms=difficulty.max_terms,
        min_digits=difficulty.min_digits,
        max_digits=difficulty.max_digits,
        size=size,
        seed=seed,
    )


def make_problems(difficulty: Difficulty, count: int, seed: int, exclude: set[str] = frozenset()) -> list[Problem]:
    """`count` distinct problems whose expressions are not in `exclude`, in reasoning-gym's seeded order."""
    dataset = _dataset(difficulty, size=4 * count + 64, seed=seed)
    problems, seen = [], set(exclude)
    for entry in dataset:
        expression = entry["metadata"]["expression"]
        if expression not in seen:
            seen.add(expression)
            problems.append(Problem(expression, entry["answer"], entry))
            if len(problems) == count:
                return problems
    raise ValueError(f"only {len(problems)} distinct problems of {difficulty} after exclusions; need {count}")


def _verifier():
    # One dataset object holds the verifier; score_answer reads only the entry it is given.
    return _dataset(RL_DIFFICULTY, size=1, seed=0)


_VERIFIER = None


def reward(completion: str, problem: Problem) -> float:
    """1.0 when the completion is the right answer (reasoning-gym's `score_answer`), else 0.0."""
    global _VERIFIER
    if _VERIFIER is None:
        _VERIFIER = _verifier()
    return float(_VERIFIER.score_answer(completion.strip(), problem.entry) >= 1.0)


@dataclass(frozen=True)
class ProblemSets:
    held_out: list[Problem]
    rl: list[Problem]


def rl_and_held_out(num_rl: int, num_held_out: int) -> ProblemSets:
    held_out = make_problems(RL_DIFFICULTY, num_held_out, HELD_OUT_SEED)
    rl = make_problems(RL_DIFFICULTY, num_rl, RL_SEED, exclude={p.expression for p in held_out})
    return ProblemSets(held_out, rl)


# The difficulty ladder of issue 12: A is the claim experiment's RL difficulty; B widens the terms, C adds one.
LADDER = {
    "A": Difficulty(min_terms=2, max_terms=2, min_digits=2, max_digits=2),
    "B": Difficulty(min_terms=2, max_terms=2, min_digits=3, max_digits=3),
    "C": Difficulty(min_terms=3, max_terms=3, min_digits=2, max_digits=2),
}
LADDER_SPLITS = ("held_out", "validation", "train")  # drawn in this order, each excluding the ones before
LADDER_SEEDS = {"held_out": 11_000, "validation": 12_000, "train": 13_000, "warmup": 14_000}  # + 100·level index
LADDER_SIZES = {"held_out": 500, "validation": 500, "train": 2000}  # per level; the warm-up excludes these
TRAINING_SETS = {"mixed": ("A", "B", "C"), "C": ("C",)}  # primary: every level at once, no curriculum


def ladder_seed(split: str, level: str) -> int:
    return LADDER_SEEDS[split] + 100 * list(LADDER).index(level)


def ladder_sets(sizes: dict[str, int] = LADDER_SIZES) -> dict[str, dict[str, list[Problem]]]:
    """split → level → problems, disjoint by string across splits (levels cannot share an expression)."""
    sets: dict[str, dict[str, list[Problem]]] = {split: {} for split in LADDER_SPLITS}
    for level, difficulty in LADDER.items():
        drawn: set[str] = set()
        for split in LADDER_SPLITS:
            problems = make_problems(difficulty, sizes[split], ladder_seed(split, level), exclude=drawn)
            drawn |= {p.expression for p in problems}
            sets[split][level] = problems
    return sets


def training_problems(sets: dict[str, dict[str, list[Problem]]], training_set: str) -> list[Problem]:
    """The RL problems of one training set; level-major, which the runner's seeded shuffle mixes."""
    if training_set not in TRAINING_SETS:
        raise ValueError(f"training_set must be one of {sorted(TRAINING_SETS)}, got {training_set!r}")
    return [p for level in TRAINING_SETS[training_set] for p in sets["train"][level]]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one token per character, BOS prepended, left padding for generation."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(VOCAB_CHARS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", padding_side="left"
    )


def policy_config(tokenizer, *, hidden_size: int = 128, layers: int = 4, heads: int = 4) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
