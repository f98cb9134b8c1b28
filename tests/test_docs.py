"""The documentation holds: every Python example of README.md and docs/*.md runs as written, every relative
link points at a file that exists, and the README's set-up commands are the ones CI uses.

An example's fence says when it runs: ```python in the developer loop, ```python slow only with the slow tests
(it builds a vLLM engine, starts a server or trains), ```python no-run never (a fragment with placeholders, or code that
needs a launcher, a GPU or a running server; the page says what it needs).
"""

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
PYTHON_FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", flags=re.M | re.S)
FENCE_KINDS = {"": [], " slow": [pytest.mark.slow]}  # and " no-run", which is not collected
# The optional dependency behind each module an example may import: without it the example is skipped.
OPTIONAL = {
    "vllm": "vllm", "prodsample.vllm": "vllm", "trl": "trl", "prodsample.trl": "trl", "datasets": "datasets",
    "prodsample.vllm.client": "httpx", "transformers": "transformers", "prodsample.hf": "transformers",
    "prodsample.testing": "transformers",
}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def fences(page: Path) -> list[tuple[str, str]]:
    """(info after "python", code) of each Python block of a page."""
    return PYTHON_FENCE.findall(page.read_text())


def examples() -> list:
    params = []
    for page in PAGES:
        for index, (kind, code) in enumerate(fences(page)):
            if kind in FENCE_KINDS:
                name = f"{page.relative_to(REPO)} example {index}"
                params.append(pytest.param(name, code, id=name.replace(" ", "-"), marks=FENCE_KINDS[kind]))
    return params


def missing_dependency(code: str) -> str | None:
    for module in re.findall(r"^(?:from|import) ([\w.]+)", code, flags=re.M):
        dependency = OPTIONAL.get(module)
        if dependency and importlib.util.find_spec(dependency) is None:
            return dependency
    return None


@pytest.mark.parametrize("name, code", examples())
def test_python_examples_run(name, code):
    if dependency := missing_dependency(code):
        pytest.skip(f"{name} needs {dependency}, which is not installed")
    exec(compile(code, name, "exec"), {"__name__": "__doc_example__"})


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_python_fences_say_when_they_run(page):
    """A mistyped fence (```python-slow, ```python norun) would silently never run."""
    kinds = {kind for kind, _ in fences(page)}
    assert kinds <= {*FENCE_KINDS, " no-run"}, kinds


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_relative_links_point_at_existing_files(page):
    targets = [link.split("#", 1)[0] for link in LINK.findall(page.read_text())]
    relative = [target for target in targets if target and "://" not in target and not target.startswith("mailto:")]
    missing = [target for target in relative if not (page.parent / target).exists()]
    assert not missing, f"{page.relative_to(REPO)} links to files that do not exist: {missing}"


def setup_commands() -> list[str]:
    """The commands of the README's set-up block: the indented lines under "## Set up", comments dropped."""
    section = README.read_text().split("\n## Set up\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"\n\n((?: {4}.*\n)+)", section).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines()]


def test_ci_runs_the_readme_test_command():
    """The README's set-up is two commands, the main job and the tests; CI runs the test command as written."""
    commands = setup_commands()
    assert len(commands) == 2 and commands[1].endswith("pytest"), commands
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert commands[1] in ci_lines
