#!/usr/bin/env bash
# CI: the package as a user installs it. Builds the wheel from the checkout's files (tracked and untracked,
# not ignored), checks that it holds every module and the claim experiment's checkpoint, installs it (not
# editable) into a fresh venv that sees the cached environment's packages, and runs the harness from an empty
# directory outside the source tree: `prodsample quick` and two steps of `prodsample train` on the tiny
# models. Fails if a run needs a file the wheel lacks or writes into the installed package.
#
#   bash scripts/check-wheel.sh        # about half a minute on an idle 2-core machine, environment cached
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/prodsample-wheel-XXXXXX")
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# A copy of the checkout, so that setuptools' build/ and egg-info never meet the clone (a stale build/lib
# could hide a file missing from the source).
mkdir "$work/source"
git -C "$root" ls-files -z --cached --others --exclude-standard \
    | (cd "$root" && tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null) | tar -C "$work/source" -xf -

bash "$root/scripts/with-env.sh" --thin-venv "$work/venv"
python="$work/venv/bin/python"
# pip warns once per package about this machine's empty local indexes (as in with-env.sh); real errors stay.
pip() { "$python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip wheel --no-deps --no-build-isolation "$work/source" -w "$work/dist"
wheel=$(ls "$work/dist"/prodsample-*.whl)
echo "[check-wheel] built $(basename "$wheel") (${SECONDS}s)"

# Every .py file of the three source folders and every file of the claim checkpoint, at its installed path;
# recorded results (benchmarks/results/, scripts included) are not part of the package.
"$python" - "$work/source" "$wheel" <<'EOF'
import sys, zipfile
from pathlib import Path

source, wheel = Path(sys.argv[1]), sys.argv[2]
folders = {"src/prodsample": "prodsample", "kernels": "prodsample/kernels", "benchmarks": "prodsample/benchmarks"}
expected = set()
for folder, installed in folders.items():
    for path in (source / folder).rglob("*"):
        relative = path.relative_to(source / folder)
        if installed == "prodsample/benchmarks" and relative.parts[0] == "results":
            continue
        if path.is_file() and (path.suffix == ".py" or relative.parts[:2] == ("claim", "policy")):
            expected.add(f"{installed}/{relative.as_posix()}")
missing = sorted(expected - set(zipfile.ZipFile(wheel).namelist()))
if missing:
    sys.exit(f"[check-wheel] the wheel lacks {len(missing)} file(s) of the source: {missing}")
print(f"[check-wheel] the wheel holds all {len(expected)} modules and checkpoint files")
EOF

pip install --no-deps "$wheel"
package=$("$python" -c "import prodsample, pathlib; print(pathlib.Path(prodsample.__file__).parent)")
case "$package" in
    "$work/venv/"*) ;;
    *) echo "[check-wheel] prodsample imports from $package, not from the installed wheel" >&2; exit 1 ;;
esac
installed_files() { (cd "$work/venv" && find . -type f -not -path "*/__pycache__/*" | sort); }
before=$(installed_files)

expect_output() { [ -s "$1" ] || { echo "[check-wheel] $1 is missing: the run wrote its results elsewhere" >&2; exit 1; }; }

mkdir "$work/run" && cd "$work/run"
export PATH="$work/venv/bin:$PATH"
prodsample quick --model tiny
echo "[check-wheel] quick done (${SECONDS}s)"
expect_output benchmarks/results/quick-tiny/reward/records.jsonl  # the documented default, in the working directory
expect_output benchmarks/results/quick-tiny/generate/records.jsonl
# Two steps of one arm from the shipped checkpoint (the --policy default), on toy set sizes.
prodsample train --arms plain --seeds 0 --out "$work/run/train" --steps 2 --num-rl 16 --num-held-out 8 \
    --prompts-per-step 2 --group-size 2 --eval-every 1 --eval-k 2
expect_output "$work/run/train/summary.json"

if [ "$(installed_files)" != "$before" ]; then
    echo "[check-wheel] the runs wrote into the venv that holds the installed package:" >&2
    diff <(echo "$before") <(installed_files) >&2 || true
    exit 1
fi
echo "[check-wheel] ok: the installed wheel ran quick and train from $work/run and wrote only there (${SECONDS}s)"
