"""The two contexts' text: hints added to prompts, and the rule that says when a completion restates the hint."""

from prodsample.prompts import HINT_TEMPLATES, DEFAULT_HINT_TEMPLATE, answer_without_derivation, check_hint_template, hint_leakage


def test_hint_leakage():
    completions = [
        "19",  # the answer alone: the format requires it
        "the answer is 19",  # natural wording, not the hint's
        "As the hint says, the correct final answer is 19",  # the hint's own wording
        "(HINT:   the correct final answer is 19.)",  # the hint itself, any case and spacing
        "The Correct Final Answer is nineteen",
    ]
    answer = HINT_TEMPLATES["answer"]
    assert hint_leakage(completions, ["19"] * 5, answer) == [False, False, True, True, True]
    # A template with no wording of its own leaks only when its rendering of the answer appears.
    assert hint_leakage(["19", "[19]", "so [ 19 ]", "my hint: 19"], ["19"] * 4, "{prompt}[{answer}]") == [False, True, False, False]
    # "hint" counts when the template says it; a custom template's own words count in runs of four.
    assert hint_leakage(["The hint says 12\nAnswer: 12", "2 + 10 = 12\nAnswer: 12"], ["12"] * 2, answer) == [True, False]
    # A hint that is itself an answer line (the default, "Answer: 12") looks like the completion's own answer
    # line, so it never counts; nor does anything else, as the template has no wording of its own.
    assert DEFAULT_HINT_TEMPLATE == HINT_TEMPLATES["terse"]
    assert hint_leakage(["2 + 10 = 12\nAnswer: 12", "Answer: 12.", "The hint says 12"], ["12"] * 3) == [False, False, False]
    whisper = "{prompt}\nA teacher whispers that it is {answer}."
    assert hint_leakage(["a teacher whispers that it is 4", "it is 4"], ["4"] * 2, whisper) == [True, False]


def test_answer_without_derivation():
    completions = [
        "19",  # the answer and nothing else
        "The answer is 19 because 12 + 7 = 19.",  # answer first, derivation after: still stated before derived
        "12 plus 7: 12, 13, 14, 15, 16, 17, 18, 19. Answer: 19",  # 8+ words of working come first
        "one two three four five six seven 19",  # 7 words before: answer first
        "one two three four five six seven eight 19",  # 8 words before: derived
        "Answer: 190",  # a longer number is not the answer
        "",
    ]
    assert answer_without_derivation(completions, ["19"] * 7) == [True, True, False, True, False, False, False]
    # word answers match whole words, ignoring case; multi-word answers match as a run
    assert answer_without_derivation(["Mother, since ...", "grandmother", "It is the great aunt"], ["mother", "mother", "great aunt"]) == [True, False, True]


def test_hint_templates_are_valid_and_the_default_is_one_of_them():
    for template in HINT_TEMPLATES.values():
        check_hint_template(template)
    assert DEFAULT_HINT_TEMPLATE in HINT_TEMPLATES.values()
