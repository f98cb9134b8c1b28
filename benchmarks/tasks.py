"""Verifiable tasks from reasoning-gym: prompts, answers (which become hints), and rewards.

A task is named as on the command line: a reasoning-gym dataset name, optionally with config overrides,
`NAME` or `NAME:key=value,key=value` (values are Python literals, e.g. `chain_sum:max_terms=3,max_digits=2`).
Problem i of a task is entry i of `reasoning_gym.create_dataset(NAME, size=..., seed=...)`, so a run can
be extended or resumed and the same problems come back.

The prompt is one user turn: the question, then `FORMAT_INSTRUCTION`. The hint is added to that turn by
`prodsample.prompts.add_hint`, after the instruction.

**Answer extraction** (`extract_answer`), in two steps like lm-evaluation-harness's "strict" and "flexible"
matches:

1. strict: the text after the last "Answer:" (case-insensitive) up to the end of that line, with surrounding
   whitespace, markdown emphasis (`*`, `` ` ``, `$`) and one trailing period removed. A completion with such
   a line is **format-valid**.
2. flexible, only when there is no answer line: the last number in the completion (`-12`, `3.5`, `1,024`
   → `1024`). SmolLM2-135M states most answers in prose ("so the answer is 4.") and rarely in the requested
   format; the reward measures whether the answer is right, and the format-valid rate is reported apart.

A completion with neither gets reward 0 without asking the verifier.

**Reward**: the task's own verifier, `dataset.score_answer(extracted, entry)`, in [0, 1]. Some verifiers give
partial credit (reasoning-gym's default gives len(answer)/len(extracted) when the answer is a substring), so
"pass" below means reward 1 and "fail" reward 0.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from .errors import UsageError

# Brief on purpose: with "Think step by step" SmolLM2-135M ran past 64 new tokens in 73-81% of rollouts, so
# reward tables measured truncation as much as guidance (docs/cli.md, "Which hint").
FORMAT_INSTRUCTION = 'Explain briefly, then give your final answer on the last line as "Answer: <answer>".'
ANSWER_LINE = re.compile(r"answer\s*:[ \t]*(.*)", re.IGNORECASE)
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


@dataclass(frozen=True)
class Problem:
    index: int  # position in the task's dataset
    question: str
    answer: str
    entry: dict  # what the task's verifier needs


@dataclass(frozen=True)
class Verdict:
    extracted: str | None  # what the verifier scored; None: nothing to score
    format_valid: bool  # the completion has an "Answer:" line
    reward: float


def parse_task_spec(spec: str) -> tuple[str, dict]:
    """`NAME` or `NAME:key=value,...` → (name, config overrides)."""
    name, _, overrides = spec.partition(":")
    config = {}
    for item in filter(None, overrides.split(",")):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise UsageError(f"--task {spec!r}: config overrides must look like key=value, got {item!r}")
        try:
            config[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            config[key.strip()] = value.strip()
    return name.strip(), config


class Task:
    """One reasoning-gym dataset, generated deterministically from (spec, seed); problems are drawn lazily."""

    def __init__(self, spec: str, seed: int = 0, size: int = 100_000):
        import reasoning_gym
        from reasoning_gym.factory import DATASETS

        self.spec = spec
        self.name, self.config = parse_task_spec(spec)
        if self.name not in DATASETS:
            raise UsageError(f"--task {spec!r}: unknown reasoning-gym task {self.name!r}; choose from {sorted(DATASETS)}")
        try:
            self.dataset = reasoning_gym.create_dataset(self.name, size=size, seed=seed, **self.config)
        except (TypeError, ValueError, AssertionError) as error:
            raise UsageError(f"--task {spec!r}: reasoning-gym rejected the config {self.config}: {error}") from error

    def problem(self, index: int) -> Problem:
        entry = self.dataset[index]
        return Problem(index, entry["question"], str(entry["answer"]), entry)

    def prompt(self, problem: Problem) -> list[dict]:
        """The plain prompt as a chat (the hint is added to this user turn)."""
        return [{"role": "user", "content": f"{problem.question.strip()}\n\n{FORMAT_INSTRUCTION}"}]

    def verify(self, problem: Problem, completion: str) -> Verdict:
        strict = answer_line(completion)
        extracted = strict if strict is not None else last_number(completion)
        reward = 0.0 if extracted is None else float(self.dataset.score_answer(extracted, problem.entry))
        return Verdict(extracted, strict is not None, reward)


def extract_answer(completion: str) -> str | None:
    """The final answer by the rule in the module docstring (answer line, else last number), or None."""
    strict = answer_line(completion)
    return strict if strict is not None else last_number(completion)


def answer_line(completion: str) -> str | None:
    """The strict match: what follows the last "Answer:" on its line, cleaned; None if there is none."""
    matches = ANSWER_LINE.findall(completion)
    if not matches:
        return None
    answer = matches[-1].strip().strip("*`$").strip()
    if answer.endswith("."):
        answer = answer[:-1].rstrip()
    return answer or None


def last_number(completion: str) -> str | None:
    """The flexible match: the last number in the completion, thousands separators removed."""
    numbers = NUMBER.findall(completion)
    return numbers[-1].replace(",", "") if numbers else None


