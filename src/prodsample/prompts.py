"""The two contexts of a guided rollout: the plain prompt, and the prompt with the answer as a hint.

Prompts are plain strings (tokenised as they are, as TRL does for standard datasets) or chat message lists
(rendered with the tokenizer's chat template and a generation prompt). The default hint follows the
question inside the same user turn, so both contexts share the longest possible token prefix; any
template with `{prompt}` and `{answer}` fields can replace it.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

__all__ = [
    "DEFAULT_HINT_TEMPLATE",
    "HINT_TEMPLATES",
    "add_hint",
    "check_hint_template",
    "render_prompt",
    "pad_token_id",
    "check_prompts_and_answers",
    "hint_leakage",
    "answer_without_derivation",
]

# The forms compared by the hint study (benchmarks/results/hints-smollm2/, docs/cli.md "Which hint"). The
# names are what `prodsample reward --hint-template NAME` accepts.
HINT_TEMPLATES = {
    # the answer alone, as a parenthetical remark after the question
    "answer": "{prompt}\n\n(Hint: the correct final answer is {answer}.)",
    # the answer, and a request to justify it
    "explain": "{prompt}\n\n(Hint: the correct final answer is {answer}. Explain why it is correct, step by step.)",
    # the answer as the first words of a worked response
    "lead": '{prompt}\n\nStart your response with "The answer is {answer} because" and then show the steps.',
    # the answer in the very form the verifier reads, nothing else
    "terse": "{prompt}\n\nAnswer: {answer}",
}
# The study's pick (no template met its goal; `terse` rescued as many all-fail groups as any at λ = ½, within
# its tie margin, with the least leakage): docs/cli.md, "Which hint".
DEFAULT_HINT_TEMPLATE = HINT_TEMPLATES["terse"]

Prompt = str | list[dict]


def add_hint(prompt: Prompt, answer: str, template: str = DEFAULT_HINT_TEMPLATE) -> Prompt:
    """The answer-augmented prompt: `template` applied to a string, or to the last user message of a chat.

    Example:
        >>> add_hint("What is 2+3?", "5")
        'What is 2+3?\\n\\nAnswer: 5'
    """
    check_hint_template(template)
    if isinstance(prompt, str):
        return template.format(prompt=prompt, answer=answer)
    messages = [dict(message) for message in prompt]
    for message in reversed(messages):
        if message.get("role") == "user":
            message["content"] = template.format(prompt=message["content"], answer=answer)
            return messages
    raise ValueError("a chat prompt needs a user message to attach the hint to")


def check_hint_template(template: str) -> None:
    """ValueError unless `template` is a string with `{prompt}` and `{answer}` fields."""
    if not isinstance(template, str) or "{prompt}" not in template or "{answer}" not in template:
        raise ValueError(f"hint_template must contain '{{prompt}}' and '{{answer}}' fields, got {template!r}")


def render_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: chat lists through the chat template (with generation prompt), strings as-is."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def pad_token_id(tokenizer) -> int:
    """The id that pads completions: the tokenizer's pad token, else its EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def check_prompts_and_answers(prompts: Sequence[Prompt], answers: Sequence[str] | None) -> None:
    """One non-empty prompt per answer, no answer missing."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or chat message lists")
    if answers is None or isinstance(answers, str) or len(answers) != len(prompts):
        got = "None" if answers is None else f"{1 if isinstance(answers, str) else len(answers)}"
        raise ValueError(f"answers must be a list with one answer per prompt ({len(prompts)}), got {got}")
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        if not prompt or (isinstance(prompt, str) and not prompt.strip()):
            raise ValueError(f"prompts[{i}] is empty")
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise ValueError(f"answers[{i}] is missing: every guided prompt needs its answer as the hint")


_LEAK_NGRAM = 4
_HINT_WORD = re.compile(r"\bhint", re.IGNORECASE)


def _word_ngrams(text: str) -> set[tuple[str, ...]]:
    """Every run of `_LEAK_NGRAM` consecutive words of `text`, lower-cased."""
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + _LEAK_NGRAM]) for i in range(len(words) - _LEAK_NGRAM + 1)}


def hint_leakage(
    completions: Sequence[str], answers: Sequence[str], template: str = DEFAULT_HINT_TEMPLATE
) -> list[bool]:
    """Whether each completion restates the hint, beyond stating the answer (which the format requires).

    A completion leaks when, ignoring case and runs of whitespace, it contains the hint as the guide context
    shows it (`template` with an empty prompt and the answer, e.g. "(Hint: the correct final answer is 19.)"
    or "[19]"), any 4 consecutive words of the template's own wording ("the correct final answer" …), or,
    when the template itself says "hint", the word "hint". The answer on its own never counts, nor does a hint
    that is itself an answer line ("Answer: 19", the default template's): a completion's own answer line
    looks the same, so for such templates `answer_without_derivation` is the leakage to watch. Rollouts that
    never saw the hint give the rule's false-positive rate.

    Example:
        >>> template = HINT_TEMPLATES["answer"]
        >>> hint_leakage(["19", "As the hint says, 19", "the correct final answer is 19"], ["19"] * 3, template)
        [False, True, True]
    """
    literal = " ".join(text for text, _, _, _ in string.Formatter().parse(template))
    wording, names_hint = _word_ngrams(literal), bool(_HINT_WORD.search(literal))
    leaked = []
    for completion, answer in zip(completions, answers, strict=True):
        hint = " ".join(template.format(prompt="", answer=answer).lower().split())
        text = " ".join(completion.lower().split())
        answer_line = re.fullmatch(r"answer\s*:\s*" + re.escape(answer.lower().strip()) + r"\.?", hint)
        leaked.append(
            bool(hint and hint in text and not answer_line)
            or bool(_word_ngrams(completion) & wording)
            or (names_hint and bool(_HINT_WORD.search(completion)))
        )
    return leaked


_DERIVATION_WORDS = 8


def answer_without_derivation(completions: Sequence[str], answers: Sequence[str]) -> list[bool]:
    """Whether each completion states the answer before deriving it: the answer (as a whole word, ignoring
    case) occurs, and fewer than 8 words come before its first occurrence, so no derivation can precede it.

    This is the leakage a trainer pays for: rewarded text that states the answer it was shown rather than
    one it worked out. Plain rollouts (λ = 1) give the rate at which the policy answers first on its own.

    Example:
        >>> answer_without_derivation(["19. Because 12 + 7 = 19", "12 + 7: 12 13 14 15 16 17 18 19 so Answer: 19", "no idea"], ["19"] * 3)
        [True, False, False]
    """
    flags = []
    for completion, answer in zip(completions, answers, strict=True):
        words = re.findall(r"\w+", answer.lower())
        text = re.findall(r"\w+", completion.lower())
        first = next((i for i in range(len(text) - len(words) + 1) if words and text[i : i + len(words)] == words), None)
        flags.append(first is not None and first < _DERIVATION_WORDS)
    return flags
