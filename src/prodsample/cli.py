"""The `prodsample` command: benchmarks of guided sampling, and the quick end-to-end run.

    prodsample quick                   # the README's main job on the embedded default (< 8 min on 2 CPU cores)
    prodsample reward  [options]       # reward, informative groups, KL, leakage ... as a function of λ
    prodsample generate [options]      # decoding cost of guided vs plain, same model and prompts
    prodsample report DIR [DIR ...]    # rebuild tables, CSV/JSON and plots from a result directory
    prodsample kernel [options]        # the fused sampling kernel benchmark
    prodsample vllm --out DIR [...]    # guided vs plain decoding on one vLLM engine, desync rate
    prodsample server --out DIR [...]  # the same through a vLLM server at 1/4/16 clients, with and without
                                       #   prodsample's scheduler
    prodsample train --out DIR [...]   # the claim experiment: GRPO arms with and without guidance

Each command's harness lives in `prodsample.benchmarks` (the repository's `benchmarks/`). The built-in ones
expose `add_arguments(parser)` and `main(args)`; a harness that keeps its own argument parser (`kernel`,
`vllm`, `server`, `train`) exposes `main(argv)` and receives the rest of the command line. `HARNESSES` is the
registry; a registered harness missing from an installation gets a subcommand that says which module is missing.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["main", "HARNESSES"]


@dataclass(frozen=True)
class Harness:
    module: str  # importable module providing the command
    help: str
    own_parser: bool = False  # main(argv) parses its own arguments


HARNESSES = {
    "quick": Harness("prodsample.benchmarks.quick", "the README's main job: a small reward sweep and decoding-cost "
                     "comparison on the embedded default"),
    "reward": Harness("prodsample.benchmarks.reward", "rewards, informative groups, KL(q‖π), hint leakage, format "
                      "validity and length as a function of λ on reasoning-gym tasks"),
    "generate": Harness("prodsample.benchmarks.generate", "tokens/s and time per step of guided vs plain decoding, "
                        "same model and prompts, ratios measured side by side"),
    "kernel": Harness("prodsample.benchmarks.kernel", "the fused sampling kernel against eager PyTorch and the "
                      "other fast paths", own_parser=True),
    "vllm": Harness("prodsample.benchmarks.vllm_generate", "guided vs plain and vs the 2B-plain floor, time per "
                    "token on one vLLM engine at B = 1, 4, 16, and the desync rate of GuidedLLM's defaults",
                    own_parser=True),
    "server": Harness("prodsample.benchmarks.vllm_server", "guided vs plain time per token through a vLLM server at "
                      "1, 4 and 16 concurrent clients, and the desync rate with and without prodsample's scheduler",
                      own_parser=True),
    "train": Harness("prodsample.benchmarks.claim.run", "the claim experiment: GRPO arms with and without guidance",
                     own_parser=True),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prodsample", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, harness in HARNESSES.items():
        sub = commands.add_parser(name, help=harness.help, description=harness.help, add_help=not harness.own_parser)
        if not harness.own_parser:
            _import(name).add_arguments(sub)
    report = commands.add_parser("report", help="rebuild tables, CSV/JSON and plots of result directories from their records")
    report.add_argument("directories", nargs="+", type=Path, metavar="DIR")
    return parser


def _import(name: str):
    harness = HARNESSES[name]
    try:
        return importlib.import_module(harness.module)
    except ModuleNotFoundError as error:
        if error.name is None or not harness.module.startswith(error.name):
            raise
        raise SystemExit(
            f"prodsample {name}: its harness {harness.module} is not in this installation; "
            "install a prodsample version that ships it"
        ) from None


def report(directories: list[Path]) -> None:
    """Dispatch each directory on the kind of run its records hold; a quick run holds one per part."""
    from prodsample.benchmarks import generate, reward
    from prodsample.benchmarks.errors import UsageError
    from prodsample.benchmarks.runs import RECORDS, RunDir

    reporters = {reward.KIND: reward.report, generate.KIND: generate.report}
    for directory in directories:
        runs = [directory] if (directory / RECORDS).exists() else sorted(p.parent for p in directory.glob(f"*/{RECORDS}"))
        if not runs:
            raise UsageError(f"{directory} holds no {RECORDS} (nor do its subdirectories)")
        for path in runs:
            run_dir = RunDir(path)
            reporters[run_dir.kind()](run_dir)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and argv[0] in HARNESSES and HARNESSES[argv[0]].own_parser:
        _import(argv[0]).main(argv[1:])  # these return their summary, not an exit status
        return 0
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["prodsample", *argv])  # what every result file records as its command
    from prodsample.benchmarks.errors import UsageError

    try:
        if args.command == "report":
            report(args.directories)
        else:
            _import(args.command).main(args)
    except UsageError as error:
        parser.exit(2, f"prodsample {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
