"""The task, its disjoint problem sets, the character tokenizer and the tiny policy's architecture.

Family: reasoning-gym `chain_sum` (integer sums and differences), answered directly with no reasoning
trace, so a rollout is a handful of tokens and thousands of GRPO steps fit in a CPU budget. A problem is
shown as its bare expression, e.g. the plain prompt `"58 - 91 + 7="`; the hinted prompt appends the answer
(`HINT_TEMPLATE`), and the completion is the answer followed by EOS. The verifier is the dataset's own
`score_answer`.

Problem sets come from reasoning-gym with separate seeds and are made disjoint by string: the held-out set
is drawn first, then the RL set excludes its expressions, then the warm-up excludes both.

The difficulty ladder (`LADDERS`) uses the same family at three levels, each with three splits (held-out,
validation, training) drawn in that order from seeds of their own, each excluding the ones drawn before it;
the ladder's warm-up excludes all of them. Version "v1" (PROTOCOL-ladder.md) writes answers as usual;
"v2" (PROTOCOL-ladder-v2.md) levels by digits and writes every answer least-significant digit first
(`ANSWER_FORMATS`): the sign, then the digits of |answer| reversed, so -127 is "-721" and 120 is "021".
The hint shows the answer in the same form as the completion, and the verifier reads it back first.
"""

from __future__ import annotations

from dataclasses import dataclass

import re

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


def lsd_first(answer: str) -> str:
    """An integer written least-significant digit first, sign in front: "-127" → "-721", "120" → "021"."""
    sign, digits = ("-", answer[1:]) if answer.startswith("-") else ("", answer)
    return sign + digits[::-1]


def from_lsd_first(text: str) -> str | None:
    """The integer an LSD-first completion names, written as usual ("-721" → "-127"); None if it names none."""
    match = re.fullmatch(r"(-?)(\d+)", text)
    return None if match is None else str(int(match.group(1) + match.group(2)[::-1]))


# answer format → (how the hint and the completion write an answer, how the verifier reads a completion back)
ANSWER_FORMATS = {
    "msd": (lambda answer: answer, lambda text: text),
    "lsd": (lsd_first, from_lsd_first),
}


@dataclass(frozen=True)
class Problem:
    expression: str
    answer: str  # as the hint and the completion write it (the task's answer format)
    entry: dict  # the reasoning-gym entry, kept for its verifier
    answer_format: str = "msd"

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


def make_problems(difficulty: Difficulty, count: int, seed: int, exclude: set[str] = frozenset(),
                  answer_format: str = "msd") -> list[Problem]:
    """`count` distinct problems whose expressions are not in `exclude`, in reasoning-gym's seeded order."""
    write, _ = ANSWER_FORMATS[answer_format]
    dataset = _dataset(difficulty, size=4 * count + 64, seed=seed)
    problems, seen = [], set(exclude)
    for entry in dataset:
        expression = entry["metadata"]["expression"]
        if expression not in seen:
            seen.add(expression)
            problems.append(Problem(expression, write(entry["answer"]), entry, answer_format))
            if len(problems) == count:
                return problems
    raise ValueError(f"only {len(problems)} distinct problems of {difficulty} after exclusions; need {count}")


def _verifier():
    # One dataset object holds the verifier; score_answer reads only the entry it is given.
    return _dataset(RL_DIFFICULTY, size=1, seed=0)


_VERIFIER = None


def reward(completion: str, problem: Problem, entry: dict | None = None) -> float:
    """1.0 when the completion, read in the problem's answer format, is the right answer (reasoning-gym's
    `score_answer`, full credit only), else 0.0. `entry` scores it against another problem's answer instead
    (the chance floor of PROTOCOL-ladder-v2.md)."""
    global _VERIFIER
    if _VERIFIER is None:
        _VERIFIER = _verifier()
    _, read = ANSWER_FORMATS[problem.answer_format]
    answer = read(completion.strip())
    return 0.0 if answer is None else float(_VERIFIER.score_answer(answer, entry or problem.entry) >= 1.0)


@dataclass(frozen=True)
class ProblemSets:
    held_out: list[Problem]
    rl: list[Problem]


def rl_and_held_out(num_rl: int, num_held_out: int) -> ProblemSets:
    held_out = make_problems(RL_DIFFICULTY, num_held_out, HELD_OUT_SEED)
    rl = make_problems(RL_DIFFICULTY, num_rl, RL_SEED, exclude={p.expression for p in held_out})
    return ProblemSets(held_out, rl)


@dataclass(frozen=True)
class Ladder:
    """A difficulty ladder: levels of one prompt format, the answer format, and the warm-up's easy problems."""

    levels: dict[str, Difficulty]
    answer_format: str = "msd"
    easy: Difficulty = EASY_DIFFICULTY


LADDERS = {
    # PROTOCOL-ladder.md: A is the claim experiment's RL difficulty; B widens the terms, C adds one.
    "v1": Ladder({
        "A": Difficulty(min_terms=2, max_terms=2, min_digits=2, max_digits=2),
        "B": Difficulty(min_terms=2, max_terms=2, min_digits=3, max_digits=3),
        "C": Difficulty(min_terms=3, max_terms=3, min_digits=2, max_digits=2),
    }),
    # PROTOCOL-ladder-v2.md: two terms throughout (3-term sums stall this policy), one more digit per level,
    # answers least-significant digit first; C's answers (-8999 to 19998) are too wide to guess.
    "v2": Ladder({
        "A": Difficulty(min_terms=2, max_terms=2, min_digits=2, max_digits=2),
        "B": Difficulty(min_terms=2, max_terms=2, min_digits=3, max_digits=3),
        "C": Difficulty(min_terms=2, max_terms=2, min_digits=4, max_digits=4),
    }, answer_format="lsd", easy=Difficulty(min_terms=2, max_terms=2, min_digits=1, max_digits=1)),
    # As v2 without B, C one digit beyond A: a warm-up that masters A leaves C a single step away.
    "v3": Ladder({
        "A": Difficulty(min_terms=2, max_terms=2, min_digits=2, max_digits=2),
        "C": Difficulty(min_terms=2, max_terms=2, min_digits=3, max_digits=3),
    }, answer_format="lsd", easy=Difficulty(min_terms=2, max_terms=2, min_digits=1, max_digits=1)),
}
LADDER = LADDERS["v1"].levels
LADDER_SPLITS = ("held_out", "validation", "train")  # drawn in this order, each excluding the ones before
LADDER_SEEDS = {"held_out": 11_000, "validation": 12_000, "train": 13_000, "warmup": 14_000}  # + 100·level index
LADDER_SIZES = {"held_out": 500, "validation": 500, "train": 2000}  # per level; the warm-up excludes these
TRAINING_SETS = {"mixed": None, "C": ("C",)}  # primary: every level of the ladder at once (None), no curriculum


def ladder_seed(split: str, level: str) -> int:
    return LADDER_SEEDS[split] + 100 * "ABC".index(level)


def ladder_sets(sizes: dict[str, int] = LADDER_SIZES, ladder: Ladder = LADDERS["v1"]) -> dict[str, dict[str, list[Problem]]]:
    """split → level → problems, disjoint by string across splits (levels cannot share an expression)."""
    sets: dict[str, dict[str, list[Problem]]] = {split: {} for split in LADDER_SPLITS}
    for level, difficulty in ladder.levels.items():
        drawn: set[str] = set()
        for split in LADDER_SPLITS:
            problems = make_problems(difficulty, sizes[split], ladder_seed(split, level), exclude=drawn,
                                     answer_format=ladder.answer_format)
            drawn |= {p.expression for p in problems}
            sets[split][level] = problems
    return sets


def training_problems(sets: dict[str, dict[str, list[Problem]]], training_set: str) -> list[Problem]:
    """The RL problems of one training set; level-major, which the runner's seeded shuffle mixes."""
    if training_set not in TRAINING_SETS:
        raise ValueError(f"training_set must be one of {sorted(TRAINING_SETS)}, got {training_set!r}")
    return [p for level in TRAINING_SETS[training_set] or sets["train"] for p in sets["train"][level]]


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
