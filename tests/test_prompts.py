"""The two contexts' text: hints added to prompts, and the rule that says when a completion restates the hint."""

from prodsample.prompts import hint_leakage


def test_hint_leakage():
    completions = [
        "19",  # the answer alone: the format requires it
        "the answer is 19",  # natural wording, not the hint's
        "As the hint says, the correct final answer is 19",  # the hint's own wording
        "(HINT:   the correct final answer is 19.)",  # the hint itself, any case and spacing
        "The Correct Final Answer is nineteen",
    ]
    assert hint_leakage(completions, ["19"] * 5) == [False, False, True, True, True]
    # A template with no wording of its own leaks only when its rendering of the answer appears.
    assert hint_leakage(["19", "[19]", "so [ 19 ]", "my hint: 19"], ["19"] * 4, "{prompt}[{answer}]") == [False, True, False, False]
    # "hint" counts when the template says it; a custom template's own words count in runs of four.
    assert hint_leakage(["The hint says 12\nAnswer: 12", "2 + 10 = 12\nAnswer: 12"], ["12"] * 2) == [True, False]
    whisper = "{prompt}\nA teacher whispers that it is {answer}."
    assert hint_leakage(["a teacher whispers that it is 4", "it is 4"], ["4"] * 2, whisper) == [True, False]
