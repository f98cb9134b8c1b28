"""Kernel benchmark: the fused product-sampling pass, eager PyTorch against the fast paths.

    python -m prodsample.benchmarks.kernel                 # CPU grid; the GPU section too when CUDA is present
    python -m prodsample.benchmarks.kernel --quick         # toy sizes (CI): one compile, then seconds
    python -m prodsample.benchmarks.kernel --gpu-only      # on a GPU machine, skip the CPU grid

CPU: the eager reference (`reference_fused_sample`) against the compiled path (`prodsample.kernels.compiled`)
over B × V, measured side by side in one process (alternating calls, median of the repeats); the speed-up
is eager time / compiled time. Every timed pair also compares the outputs (same tokens; max |Δ| of the four
float outputs). Also measured: compile time with a cold and a warm Inductor cache (each in a fresh
process), and a run whose batch size changes every step (a recompile would show as seconds, and is counted).

GPU: the Triton kernel against eager PyTorch, `torch.compile` and FlashInfer's `sampling_from_logits` where
installed (one logits tensor and no log-probs: a floor for a sampling kernel, not a like-for-like), with
achieved bandwidth = bytes read (2·B·V·itemsize) / time, as a fraction of the device's peak; plus a small
sweep of the kernel's block size and warps to tune its defaults on the first GPU it meets.

Writes <out>/results.csv (one row per measurement) and <out>/run.json (the command, git revision,
versions, machine, load average, summary and the same rows).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from prodsample import noise
from prodsample.kernels.compiled import compiled_fused_sample
from prodsample.fused import FusedInputs, ProductSample, reference_fused_sample

BATCHES = (1, 8, 64, 256)
VOCABS = (32000, 49152, 151936, 262144)
QUICK_BATCHES = (1, 8)
QUICK_VOCABS = (8192, 32000)
VARYING_BATCHES = (1, 7, 64, 3, 256, 33, 2, 128, 9, 64)
QUICK_VARYING_BATCHES = (1, 5, 8, 3, 2)
HEADLINE = (64, 151936)  # the CPU target: compiled ≥ 3× eager here
LAM, TEMPERATURE = 0.6, 0.9
# Peak HBM bandwidth (bytes/s) by device name, when the driver does not report clock and bus width.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12,
                  "A100 80GB PCIe": 1.935e12, "A100": 1.555e12, "L40S": 0.864e12}


@dataclasses.dataclass
class Row:
    """One measurement (a CSV row). Times in milliseconds; `speedup` = eager time / this method's time."""

    section: str
    device: str
    dtype: str
    batch: int
    vocab: int
    method: str
    median_ms: float
    speedup: float | None = None
    tokens_equal: float | None = None  # fraction of rows drawing the eager reference's token
    max_abs_diff: float | None = None  # over log q, plain/guide log-probs and log-normaliser, finite entries
    gbps: float | None = None
    peak_fraction: float | None = None
    note: str = ""


def sampling_inputs(rows: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> FusedInputs:
    """Gaussian logits (σ = 4), the guide's correlated with
    the plain ones (one policy under two contexts), λ = LAM, T = TEMPERATURE, no filter."""
    generator = torch.Generator(device=device).manual_seed(seed)
    plain = 4 * torch.randn(rows, vocab, generator=generator, device=device)
    guide = plain + 2 * torch.randn(rows, vocab, generator=generator, device=device)  # one policy, two contexts
    keys = noise.row_keys(torch.full((rows,), seed), torch.arange(rows), torch.full((rows,), 17)).to(device)
    lam = torch.full((rows,), LAM, device=device)
    temperature = torch.full((rows,), TEMPERATURE, device=device)
    return FusedInputs(plain.to(dtype), guide.to(dtype), lam, temperature, None, keys)


def compare(got: ProductSample, want: ProductSample) -> tuple[float, float]:
    """(fraction of equal tokens, max |Δ| over the float outputs where both are finite)."""
    equal = float((got.token_ids == want.token_ids).double().mean())
    diffs = [(g - w)[torch.isfinite(g) & torch.isfinite(w)].abs() for g, w in zip(got[1:], want[1:])]
    return equal, max(float(d.max()) if d.numel() else 0.0 for d in diffs)


def time_cpu_side_by_side(methods: dict[str, Callable[[], ProductSample]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each method, calling them in turn `repeats` times (after one warm-up each)."""
    for method in methods.values():
        method()
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, method in methods.items():
            start = time.perf_counter()
            method()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def cpu_grid(batches, vocabs) -> list[Row]:
    rows = []
    for vocab in vocabs:
        for batch in batches:
            inputs = sampling_inputs(batch, vocab, torch.float32, torch.device("cpu"))
            eager, compiled = reference_fused_sample(inputs), compiled_fused_sample(inputs)
            tokens_equal, max_diff = compare(compiled, eager)
            repeats = 5 if batch * vocab <= 2**24 else 3
            times = time_cpu_side_by_side(
                {"eager": lambda: reference_fused_sample(inputs), "compiled": lambda: compiled_fused_sample(inputs)},
                repeats,
            )
            rows.append(Row("cpu_grid", "cpu", "fp32", batch, vocab, "eager", 1e3 * times["eager"], 1.0, 1.0, 0.0))
            rows.append(
                Row("cpu_grid", "cpu", "fp32", batch, vocab, "compiled", 1e3 * times["compiled"],
                    times["eager"] / times["compiled"], tokens_equal, max_diff)
            )
            print(f"cpu B={batch:>4} V={vocab:>6}: eager {1e3 * times['eager']:9.1f} ms, compiled "
                  f"{1e3 * times['compiled']:8.1f} ms, x{times['eager'] / times['compiled']:5.1f}, tokens equal "
                  f"{tokens_equal:.3f}, max|d| {max_diff:.1e}", flush=True)
    return rows


def measure_compile(vocab: int) -> dict[str, float]:
    """In this (fresh) process: seconds of the first compiled call, then of the first call at another shape."""
    first = sampling_inputs(4, vocab, torch.float32, torch.device("cpu"))
    start = time.perf_counter()
    compiled_fused_sample(first)
    first_call = time.perf_counter() - start
    other = sampling_inputs(13, vocab + 1000, torch.float32, torch.device("cpu"), seed=1)
    start = time.perf_counter()
    compiled_fused_sample(other)
    return {"first_call_s": first_call, "new_shape_call_s": time.perf_counter() - start}


def compile_times(vocab: int) -> dict[str, dict[str, float]]:
    """Compile cost in fresh processes: an empty Inductor cache (cold), then the cache it left (warm)."""
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for label in ("cold_cache", "warm_cache"):
            output = subprocess.run(
                [sys.executable, "-m", "prodsample.benchmarks.kernel", "--measure-compile", str(vocab)],
                env=environment, capture_output=True, text=True, check=True,
            ).stdout
            results[label] = json.loads(output.strip().splitlines()[-1])
            print(f"compile ({label}): {results[label]}", flush=True)
    return results


def varying_batch(vocab: int, batches) -> tuple[list[Row], dict]:
    """One call per step with a new batch size each time, eager then compiled; counts Inductor graphs built."""
    import torch._dynamo.utils as dynamo_utils

    graphs_before = dynamo_utils.counters["stats"]["unique_graphs"]
    rows, totals = [], {"eager": 0.0, "compiled": 0.0}
    for step, batch in enumerate(batches):
        inputs = sampling_inputs(batch, vocab, torch.float32, torch.device("cpu"), seed=step)
        for name, method in (("eager", reference_fused_sample), ("compiled", compiled_fused_sample)):
            start = time.perf_counter()
            method(inputs)
            elapsed = time.perf_counter() - start
            totals[name] += elapsed
            rows.append(Row("cpu_varying_batch", "cpu", "fp32", batch, vocab, name, 1e3 * elapsed, note=f"step {step}"))
    summary = {
        "batches": list(batches),
        "vocab": vocab,
        "total_s": totals,
        "speedup": totals["eager"] / totals["compiled"],
        "graphs_compiled_during_run": dynamo_utils.counters["stats"]["unique_graphs"] - graphs_before,
    }
    print(f"varying batch: {summary}", flush=True)
    return rows, summary


# --- GPU ----------------------------------------------------------------------------------------------


def peak_bandwidth(device: torch.device) -> tuple[float | None, str]:
    """The device's peak memory bandwidth in bytes/s, and where the figure comes from."""
    properties = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(properties, "memory_clock_rate", 0), getattr(properties, "memory_bus_width", 0)
    reported = 2 * clock_khz * 1e3 * bus_bits / 8
    if 1e11 <= reported <= 1e14:  # a plausible HBM/GDDR figure (guards against a unit change in the fields)
        return reported, "2 x memory clock x bus width (driver)"
    for name, peak in PEAK_BANDWIDTH.items():
        if name in properties.name:
            return peak, f"datasheet figure for {name}"
    return None, "unknown device: no peak"


def copy_bandwidth(device: torch.device) -> float:
    """Achievable bandwidth of a 1 GiB device-to-device copy (bytes read + written per second)."""
    import triton.testing

    source = torch.empty(2**28, device=device)
    target = torch.empty_like(source)
    milliseconds = triton.testing.do_bench(lambda: target.copy_(source), return_mode="median")
    return 2 * source.numel() * source.element_size() / (milliseconds * 1e-3)


def flashinfer_sampler() -> tuple[Callable | None, str]:
    try:
        from flashinfer.sampling import sampling_from_logits
    except ImportError:
        return None, "not installed"
    return sampling_from_logits, "flashinfer.sampling.sampling_from_logits on the plain logits"


def gpu_section(batches, vocabs, dtypes, sweep: bool) -> tuple[list[Row], dict]:
    import triton.testing

    from prodsample import dispatch
    from prodsample.kernels.product_sample import launch_config, triton_fused_sample

    device = torch.device("cuda")
    peak, peak_source = peak_bandwidth(device)
    info = {
        "device": torch.cuda.get_device_name(device),
        "peak_bandwidth_bytes_per_s": peak,
        "peak_source": peak_source,
        "copy_bandwidth_bytes_per_s": copy_bandwidth(device),
        "first_use_check": dispatch._disagreement_with_reference(triton_fused_sample, device) or "agrees",
    }
    flashinfer, info["flashinfer"] = flashinfer_sampler()
    print(f"gpu: {info}", flush=True)

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    def bench_graph(fn) -> float:  # device time alone: one CUDA graph replay, no Python launch overhead
        return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")

    rows = []
    for dtype in dtypes:
        dtype_name = str(dtype).removeprefix("torch.")
        for vocab in vocabs:
            for batch in batches:
                inputs = sampling_inputs(batch, vocab, dtype, device)
                bytes_read = 2 * batch * vocab * inputs.plain_logits.element_size()
                eager = reference_fused_sample(inputs)
                methods = {
                    "eager": (bench, lambda: reference_fused_sample(inputs)),
                    "compiled": (bench, lambda: compiled_fused_sample(inputs)),
                    "triton": (bench, lambda: triton_fused_sample(inputs)),
                    "triton_cudagraph": (bench_graph, lambda: triton_fused_sample(inputs)),
                }
                if (batch, vocab) == HEADLINE:  # per-shape compile: fair to torch.compile, too slow for every size
                    static = torch.compile(reference_fused_sample, dynamic=False)
                    methods["compiled_static"] = (bench, lambda: static(inputs))
                if flashinfer is not None:
                    methods["flashinfer_plain_only"] = (bench, lambda: flashinfer(inputs.plain_logits))
                times, failures = {}, {}
                for name, (timer, fn) in methods.items():
                    try:
                        times[name] = timer(fn)
                    except Exception as error:  # noqa: BLE001 - a baseline that cannot run is recorded, not fatal
                        failures[name] = f"{type(error).__name__}: {error}"[:300]
                _, splits, _ = launch_config(batch, vocab, device)
                for name, milliseconds in times.items():
                    tokens_equal = max_diff = None
                    if name in ("compiled", "compiled_static", "triton"):
                        tokens_equal, max_diff = compare(methods[name][1](), eager)
                    method_bytes = bytes_read // 2 if name == "flashinfer_plain_only" else bytes_read
                    gbps = method_bytes / (milliseconds * 1e-3) / 1e9
                    note = {"triton": f"splits={splits}", "triton_cudagraph": f"splits={splits}, CUDA graph replay",
                            "flashinfer_plain_only": "reads one tensor, no log-probs"}.get(name, "")
                    rows.append(
                        Row("gpu", info["device"], dtype_name, batch, vocab, name, milliseconds,
                            times["eager"] / milliseconds, tokens_equal, max_diff, gbps,
                            gbps * 1e9 / peak if peak else None, note)
                    )
                for name, failure in failures.items():
                    rows.append(Row("gpu", info["device"], dtype_name, batch, vocab, name, float("nan"), note=failure))
                print(f"gpu {dtype_name} B={batch:>4} V={vocab:>6}: "
                      + ", ".join(f"{name} {ms:.3f} ms" for name, ms in times.items())
                      + "".join(f", {name} FAILED" for name in failures), flush=True)
    info["targets"] = gpu_targets(rows)
    print(f"gpu targets: {info['targets']}", flush=True)
    if sweep:
        rows += kernel_sweep(device, peak, bench)
    return rows, info


def gpu_targets(rows: list[Row]) -> dict:
    """The GPU targets at B ≥ 64, per dtype: the kernel's worst fraction of peak bandwidth (launched
    from Python, and as a CUDA graph), and its worst speed-up over eager and over torch.compile."""
    targets = {}
    for dtype in sorted({row.dtype for row in rows}):
        timed = {(r.batch, r.vocab, r.method): r.median_ms for r in rows if r.dtype == dtype and r.batch >= 64}
        fractions = {r.method: [] for r in rows}
        for r in rows:
            if r.dtype == dtype and r.batch >= 64 and r.peak_fraction is not None:
                fractions[r.method].append(r.peak_fraction)
        sizes = {(batch, vocab) for batch, vocab, _ in timed}

        def worst_ratio(baseline: str) -> float | None:
            ratios = [timed[(*size, baseline)] / timed[(*size, "triton")] for size in sizes
                      if (*size, baseline) in timed and (*size, "triton") in timed]
            return min(ratios) if ratios else None

        targets[dtype] = {
            "min_peak_fraction_triton": min(fractions["triton"], default=None),
            "min_peak_fraction_triton_cudagraph": min(fractions.get("triton_cudagraph", []), default=None),
            "min_speedup_vs_eager (target 5)": worst_ratio("eager"),
            "min_speedup_vs_compiled (target 2)": worst_ratio("compiled"),
            "speedup_vs_compiled_static_at_headline": worst_ratio("compiled_static"),
        }
    return targets


def kernel_sweep(device, peak, bench) -> list[Row]:
    """Block size × warps for the kernel at the target sizes, to set DEFAULT_BLOCK_SIZE and num_warps."""
    from prodsample.kernels.product_sample import triton_fused_sample

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for batch in (64, 256):
            inputs = sampling_inputs(batch, 151936, dtype, device)
            bytes_read = 2 * batch * 151936 * inputs.plain_logits.element_size()
            for block in (1024, 2048, 4096, 8192):
                for warps in (4, 8, 16):
                    milliseconds = bench(lambda: triton_fused_sample(inputs, block_size=block, num_warps=warps))
                    gbps = bytes_read / (milliseconds * 1e-3) / 1e9
                    rows.append(Row("gpu_sweep", torch.cuda.get_device_name(device), str(dtype).removeprefix("torch."), batch,
                                    151936, "triton", milliseconds, gbps=gbps, peak_fraction=gbps * 1e9 / peak if peak else None,
                                    note=f"block={block} warps={warps}"))
    return rows


# --- records ------------------------------------------------------------------------------------------


def metadata(argv: list[str]) -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("triton", "numpy", "flashinfer", "prodsample"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    cpu_model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
        platform.processor(),
    ) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {
        "command": "python -m prodsample.benchmarks.kernel " + " ".join(argv),
        "git_revision": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions,
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_model,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average_at_start": os.getloadavg(),
        },
    }


def write_results(out: Path, rows: list[Row], record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = [field.name for field in dataclasses.fields(Row)]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(dataclasses.asdict(row) for row in rows)
    record["rows"] = [dataclasses.asdict(row) for row in rows]
    (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out / 'results.csv'} and {out / 'run.json'}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m prodsample.benchmarks.kernel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: one compile, then seconds (CI)")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU sections")
    parser.add_argument("--no-sweep", action="store_true", help="skip the GPU block/warps sweep")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="results root: writes kernel-cpu/ and kernel-gpu/ (with --quick: kernel-*-quick/) under it "
                        "(default: %(default)s, in the working directory)")
    parser.add_argument("--measure-compile", type=int, metavar="V", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def cpu_sections(quick: bool) -> tuple[list[Row], dict]:
    batches, vocabs = (QUICK_BATCHES, QUICK_VOCABS) if quick else (BATCHES, VOCABS)
    if quick:  # in this process, with the Inductor cache as found
        summary = {"compile": {"this_process": measure_compile(vocabs[0])}}
    else:
        summary = {"compile": compile_times(HEADLINE[1])}
    rows = cpu_grid(batches, vocabs)
    varying_rows, summary["varying_batch"] = varying_batch(
        vocabs[-1] if quick else HEADLINE[1], QUICK_VARYING_BATCHES if quick else VARYING_BATCHES
    )
    headline = [r for r in rows if r.method == "compiled" and (r.batch, r.vocab) == HEADLINE]
    if headline:
        summary["cpu_headline"] = {"batch": HEADLINE[0], "vocab": HEADLINE[1], "speedup": headline[0].speedup,
                                   "tokens_equal": headline[0].tokens_equal, "max_abs_diff": headline[0].max_abs_diff}
    return rows + varying_rows, summary


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_compile:
        print(json.dumps(measure_compile(args.measure_compile)))
        return
    suffix = "-quick" if args.quick else ""
    sections = []
    if not args.gpu_only:
        sections.append((f"kernel-cpu{suffix}", lambda: cpu_sections(args.quick)))
    if torch.cuda.is_available():
        sizes = (QUICK_BATCHES, QUICK_VOCABS, (torch.float32,)) if args.quick else (
            BATCHES, VOCABS, (torch.float32, torch.bfloat16))
        sections.append((f"kernel-gpu{suffix}", lambda: gpu_section(*sizes, sweep=not (args.quick or args.no_sweep))))
    else:
        print("no CUDA device: GPU section skipped")
    for directory, run in sections:
        record = metadata(argv)
        rows, record["summary"] = run()
        record["machine"]["load_average_at_end"] = os.getloadavg()
        write_results(args.out / directory, rows, record)


if __name__ == "__main__":
    main()
