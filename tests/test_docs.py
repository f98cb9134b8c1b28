"""The README's Python examples run as written, and its set-up commands are the ones CI uses."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def examples():
    """Every block, those that build a vLLM engine (tens of seconds) marked slow."""
    for index, block in enumerate(python_blocks()):
        yield pytest.param(index, marks=[pytest.mark.slow] if "GuidedLLM(" in block else [])


@pytest.mark.parametrize("index", examples())
def test_python_examples_run(index):
    exec(compile(python_blocks()[index], f"README.md example {index}", "exec"), {})


def setup_commands() -> list[str]:
    """The commands of the README's set-up block: the indented lines under "## Set up", comments dropped."""
    section = README.read_text().split("\n## Set up\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"\n\n((?: {4}.*\n)+)", section).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines()]


def test_ci_runs_the_readme_test_command():
    """The README's set-up is two commands, the main job and the tests; CI runs the test command as written."""
    commands = setup_commands()
    assert len(commands) == 2 and commands[1].endswith("pytest"), commands
    ci_lines = [line.strip() for line in (README.parent / ".ci" / "run").read_text().splitlines()]
    assert commands[1] in ci_lines
