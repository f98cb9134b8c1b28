"""The README's Python examples run as written, and its set-up commands are the ones CI uses."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_python_examples_run(index):
    exec(compile(python_blocks()[index], f"README.md example {index}", "exec"), {})


def test_ci_runs_the_readme_test_command():
    test_command = "bash scripts/with-env.sh python -m pytest"
    assert test_command in README.read_text()
    assert test_command in (README.parent / ".ci" / "run").read_text()
