"""The test's reward (`reward.custom_reward_function`): the tiny model's answers are noise, and an answer-match
reward would be 0 everywhere, leaving GRPO no advantage to learn from. This one varies with the response."""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    return sum(character in "aeiou" for character in solution_str) / max(len(solution_str), 1)
