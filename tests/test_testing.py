"""prodsample.testing, the public fixtures: they need the hf extra and nothing of the benchmark harness."""

import json
import subprocess
import sys

import pytest

# What only the `bench` extra or the harness brings; a library user with the hf extra has none of them.
BENCHMARK_ONLY = ["prodsample.benchmarks", "rich", "matplotlib", "reasoning_gym", "gguf"]

BUILD_AND_LIST_MODULES = """
import json, sys
from prodsample.testing import save_tiny, tiny_model, tiny_tokenizer
tokenizer = tiny_tokenizer()
tiny_model(tokenizer, arch="qwen2")
save_tiny(sys.argv[1])
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.slow  # a fresh process imports torch and transformers
def test_the_fixtures_import_nothing_of_the_benchmark_harness(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", BUILD_AND_LIST_MODULES, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert [m for m in loaded if any(m == name or m.startswith(name + ".") for name in BENCHMARK_ONLY)] == []
    assert (tmp_path / "config.json").exists() and (tmp_path / "tokenizer.json").exists()
