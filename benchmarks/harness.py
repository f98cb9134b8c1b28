"""What every harness command shares: model and machine options, thread count, list parsing, terminal output."""

from __future__ import annotations

import argparse
import datetime
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .errors import UsageError
from .models import DTYPES, EMBEDDED_DEFAULT, LoadedModel, default_device, load_model

# Relative to the working directory: a clone's benchmarks/results/ when run from its root (as with-env.sh does).
RESULTS = Path("benchmarks") / "results"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and machine")
    group.add_argument(
        "--model", default=EMBEDDED_DEFAULT,
        help=f"'{EMBEDDED_DEFAULT}' (SmolLM2-135M-Instruct, embedded, offline), 'tiny' / 'tiny-qwen2' (random toy "
        "models), or any transformers hub id or local path (default: %(default)s)",
    )
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype (default: %(default)s)")
    group.add_argument(
        "--threads", default="auto",
        help="torch CPU threads; 'auto' = the cores not already busy (by the 1-minute load average), at least 1. "
        "On a shared CPU, more threads than free cores makes every step several times slower (default: %(default)s)",
    )


def add_output_argument(parser: argparse.ArgumentParser, default_name: str) -> None:
    parser.add_argument(
        "--out", type=Path, default=None,
        help=f"result directory; a rerun with the same settings continues it (default: {RESULTS}/{default_name}-<model>, "
        "in the working directory)",
    )


def output_dir(args, default_name: str) -> Path:
    return args.out if args.out is not None else RESULTS / f"{default_name}-{model_slug(args.model)}"


def model_slug(name: str) -> str:
    return Path(name.rstrip("/")).name.replace(" ", "_") or "model"


def set_threads(spec: str) -> int:
    """Apply --threads and return the thread count."""
    cores = os.cpu_count() or 1
    if spec == "auto":
        threads = max(1, min(cores, cores - round(os.getloadavg()[0])))
    else:
        threads = parse_int(spec, "--threads", minimum=1)
    torch.set_num_threads(threads)
    return threads


def load_model_from_args(args, seed: int = 0) -> LoadedModel:
    return load_model(args.model, device=args.device or default_device(), dtype=args.dtype, seed=seed)


def parse_int(text: str, name: str, minimum: int | None = None) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be an integer, got {text!r}") from None
    if minimum is not None and value < minimum:
        raise UsageError(f"{name} must be >= {minimum}, got {value}")
    return value


def parse_list(text: str, name: str, convert: Callable[[str], object]) -> list:
    """A comma-separated list, each item converted; errors name the argument."""
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise UsageError(f"{name} needs at least one value, got {text!r}")
    values = []
    for item in items:
        try:
            values.append(convert(item))
        except ValueError as error:
            raise UsageError(f"{name}: {item!r} is not valid ({error})") from None
    if len(set(values)) != len(values):
        raise UsageError(f"{name} lists a value twice: {text!r}")
    return values


def parse_lams(text: str, name: str = "--lams") -> list[float]:
    def lam(item: str) -> float:
        value = float(item)
        if not 0.0 <= value <= 1.0:
            raise UsageError("λ must lie in [0, 1]")
        return value

    return parse_list(text, name, lam)


def parse_batch_sizes(text: str, name: str = "--batch-sizes") -> list[int]:
    return parse_list(text, name, lambda item: parse_int(item, name, minimum=1))


def print_table(title: str, rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> None:
    """A terminal table; `columns` are (key, header, format spec)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*(_format(row.get(key), spec) for key, _, spec in columns))
    console = Console()
    if not console.is_terminal:  # logs and CI: no terminal width to respect, so never squeeze the columns
        console = Console(width=200)
    console.print(table)


def _format(value, spec: str) -> str:
    if value is None:
        return "—"
    return format(value, spec) if spec else str(value)


class ProgressReport:
    """Work done so far: a rich progress bar on a terminal; elsewhere (logs, CI, background runs, where rich
    would only draw the final state) one line per advance."""

    def __init__(self, total: int, unit: str):
        from rich.console import Console

        self.total, self.unit, self.done, self.description = total, unit, 0, ""
        self.started = time.monotonic()
        self.bar = None
        if Console().is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
            self.task = self.bar.add_task(unit, total=total)

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def describe(self, text: str) -> None:
        self.description = text
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def advance(self, amount: int = 1) -> None:
        self.done += amount
        if self.bar is not None:
            self.bar.advance(self.task, amount)
        else:
            elapsed = datetime.timedelta(seconds=round(time.monotonic() - self.started))
            print(f"  {self.description}: {self.done}/{self.total} {self.unit}, {elapsed} elapsed", flush=True)
