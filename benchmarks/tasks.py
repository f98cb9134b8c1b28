"""Verifiable tasks from reasoning-gym: prompts, answers (which become hints), and rewards.

A task is named as on the command line: a reasoning-gym dataset name, optionally with config overrides,
`NAME` or `NAME:key=value,key=value` (values are Python literals, e.g. `chain_sum:max_terms=3,max_digits=2`).
Problem i of a task is entry i of `reasoning_gym.create_dataset(NAME, size=..., seed=...)`, so a run can
be extended or resumed and the same problems come back.

The prompt is one user turn: the question, then `FORMAT_INSTRUCTION`. The hint is added to that turn by
`prodsample.prompts.add_hint`, after the instruction.

**Answer extraction** (`extract_answer`): the text after the last "Answer:" (case-insensitive) up to the end
of that line, with surrounding whitespace, markdown emphasis (`*`, `` ` ``) and one trailing period removed.
A completion with no "Answer:" followed by text is not format-valid and gets reward 0 without asking the
verifier. There is deliberately no fallback to "the last number": the format is part of the task.

**Reward**: the task's own verifier, `dataset.score_answer(extracted, entry)`, in [0, 1]. Some verifiers give
partial credit (reasoning-gym's default gives len(answer)/len(extracted) when the answer is a substring), so
"pass" below means reward 1 and "fail" reward 0.

**Hint leakage** (`hint_leaked`): the completion restates the hint, i.e. it mentions the word "hint" or repeats
the hint template's own wording around the answer (for the default template, "the correct final answer
is"). The answer itself on the "Answer:" line is what the format requires and is not leakage. Rollouts at
λ = 1 never see the hint, so their leakage rate is the detector's false-positive rate.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cached_property

from prodsample.prompts import DEFAULT_HINT_TEMPLATE

from .errors import UsageError

FORMAT_INSTRUCTION = 'Think step by step, then give your final answer on the last line as "Answer: <answer>".'
ANSWER_LINE = re.compile(r"answer\s*:[ \t]*(.*)", re.IGNORECASE)
HINT_WORD = re.compile(r"\bhint", re.IGNORECASE)


@dataclass(frozen=True)
class Problem:
    index: int  # position in the task's dataset
    question: str
    answer: str
    entry: dict  # what the task's verifier needs


@dataclass(frozen=True)
class Verdict:
    extracted: str | None  # None: no answer line (not format-valid)
    reward: float

    @property
    def format_valid(self) -> bool:
        return self.extracted is not None


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
        extracted = extract_answer(completion)
        reward = 0.0 if extracted is None else float(self.dataset.score_answer(extracted, problem.entry))
        return Verdict(extracted, reward)


def extract_answer(completion: str) -> str | None:
    """The final answer by the rule in the module docstring, or None."""
    matches = ANSWER_LINE.findall(completion)
    if not matches:
        return None
    answer = matches[-1].strip().strip("*`").strip()
    if answer.endswith("."):
        answer = answer[:-1].rstrip()
    return answer or None


class HintDetector:
    """Says whether a completion restates the hint (rule in the module docstring)."""

    def __init__(self, hint_template: str = DEFAULT_HINT_TEMPLATE):
        self.hint_template = hint_template

    @cached_property
    def _template_wording(self) -> re.Pattern | None:
        # The template's words between {prompt} and {answer}, without the word "hint" (matched on its own)
        # and surrounding punctuation: for the default, "the correct final answer is".
        before_answer = self.hint_template.split("{answer}")[0].split("{prompt}")[-1]
        words = re.findall(r"[A-Za-z']+", HINT_WORD.sub(" ", before_answer))
        return re.compile(r"\s+".join(map(re.escape, words)), re.IGNORECASE) if len(words) >= 2 else None

    def __call__(self, completion: str) -> bool:
        if HINT_WORD.search(completion):
            return True
        return bool(self._template_wording and self._template_wording.search(completion))
