"""The runnable examples in docstrings stay runnable."""

import doctest
import importlib

import pytest

MODULES = [
    "prodsample.mixing", "prodsample.sampling", "prodsample.prompts", "prodsample.importance", "prodsample.grpo",
    "prodsample.metrics", "prodsample.testing", "prodsample.settings", "prodsample.vllm.guided_call",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
