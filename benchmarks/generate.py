"""`prodsample generate`: what guided decoding costs, against plain decoding of the same model and prompts.

Methods (all sample at the same temperature; guided ones at --lam; B = batch size = rollouts):

- `plain`: `model.generate` on the B plain prompts: the baseline every ratio divides by.
- `plain_2B`: `model.generate` on 2B rows (the B plain and the B hinted prompts): the anchor, since a guided
  step reads both contexts. Target: `guided_generate` costs no more than this.
- `hf_cfg`: transformers' own classifier-free guidance (`guidance_scale` with `negative_prompt_ids` = the
  hinted prompts), which runs the second context as a separate, sequential forward: the reference point.
- `processor`: `prodsample.hf.ProductLogitsProcessor` in `model.generate`, records included
  (`output_scores`, `rollout()`).
- `guided_generate`: `prodsample.hf.guided_generate`, both contexts as rows of one batched forward.
- `guided_generate_lam1`: `guided_generate` at λ = 1 (no guide rows): its own loop's cost against `generate`'s.

vLLM is measured by `prodsample vllm` (`benchmarks/vllm_generate.py`): an engine schedules its own batches,
so its plain and guided runs alternate on one engine rather than sharing this loop; see `UNAVAILABLE`.

Every method decodes exactly --new-tokens tokens per row (EOS is switched off for all of them the same way),
so the rows and steps are equal. A forward pre-hook splits each call at its first one-token forward
(`DecodeClock`): prefill before it, and time per decode step = the rest / (N − 1). Repeats are interleaved, the method
order rotating each repeat, and every ratio is the median over repeats of method / plain measured in the
same repeat, so a change in machine load between repeats cancels; min and max over repeats show the spread
that load left within a repeat. `sampling share` is the share of a
`guided_generate` decode step spent in `product_sample` (mixing, filters, noise, sampling, log-probs).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import prodsample.hf
from prodsample.hf import ProductLogitsProcessor, build_contexts, guided_generate

from . import harness
from .errors import UsageError
from .runs import RunDir, invocation, load_average
from .tasks import Task

KIND = "generate"
DEFAULT_TASK = "letter_counting:max_words=5"
CFG_SCALE = 1.5  # any value ≠ 1 turns transformers' CFG on; its cost does not depend on the value
IDENTITY = ("model", "dtype", "task", "new_tokens", "lam", "temperature", "seed", "methods")
UNAVAILABLE = {
    "vllm": "a vLLM engine schedules its own batches, so it is measured apart: `prodsample vllm` (same ratios, one engine)",
}


@dataclass
class GenerateConfig:
    model: str
    dtype: str
    task: str
    batch_sizes: list[int]
    new_tokens: int
    repeats: int
    lam: float
    temperature: float
    seed: int
    methods: list[str]


@dataclass
class Batch:
    """B prompts in every form the methods need."""

    prompts: list
    answers: list[str]
    plain: dict  # left-padded input_ids / attention_mask
    guide: dict
    both: dict  # plain rows then hinted rows: 2B rows


class _TokenizerWithoutEos:
    """The tokenizer, minus its EOS id: `guided_generate` ends a rollout at the tokenizer's EOS, and the
    benchmark needs every method to decode exactly N tokens per row."""

    eos_token_id = None

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __len__(self):
        return len(self._tokenizer)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)


@contextlib.contextmanager
def fixed_length(model):
    """Switch the model's EOS off for `generate` (and for `guided_generate`, with `_TokenizerWithoutEos`)."""
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        yield
    finally:
        model.generation_config.eos_token_id = eos


class SamplingTimer:
    """Wraps `prodsample.hf.product_sample` (what guided_generate calls each step) to time it."""

    def __init__(self):
        self.seconds = 0.0

    @contextlib.contextmanager
    def installed(self):
        original = prodsample.hf.product_sample

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        prodsample.hf.product_sample = timed
        try:
            yield self
        finally:
            prodsample.hf.product_sample = original


# A method decodes `new_tokens` per row of `batch` with `model`/`tokenizer` at `config`'s settings.
Method = Callable[[object, object, Batch, int, "GenerateConfig"], None]


def _sampling_kwargs(config) -> dict:
    return {"do_sample": config.temperature > 0, "temperature": config.temperature or None}


def run_plain(model, tokenizer, batch, new_tokens, config):
    model.generate(**batch.plain, max_new_tokens=new_tokens, **_sampling_kwargs(config))


def run_plain_2b(model, tokenizer, batch, new_tokens, config):
    model.generate(**batch.both, max_new_tokens=new_tokens, **_sampling_kwargs(config))


def run_hf_cfg(model, tokenizer, batch, new_tokens, config):
    model.generate(
        **batch.plain, max_new_tokens=new_tokens, guidance_scale=CFG_SCALE,
        negative_prompt_ids=batch.guide["input_ids"], negative_prompt_attention_mask=batch.guide["attention_mask"],
        **_sampling_kwargs(config),
    )


def run_processor(model, tokenizer, batch, new_tokens, config):
    processor = ProductLogitsProcessor(
        model, batch.guide["input_ids"], batch.guide["attention_mask"], lam=config.lam, temperature=config.temperature
    )
    outputs = model.generate(
        **batch.plain, max_new_tokens=new_tokens, logits_processor=[processor], output_scores=True,
        return_dict_in_generate=True, **_sampling_kwargs(config),
    )
    processor.rollout(outputs, batch.plain["attention_mask"])


def _run_guided(lam_of: Callable[[GenerateConfig], float]) -> Method:
    def run(model, tokenizer, batch, new_tokens, config):
        guided_generate(
            model, _TokenizerWithoutEos(tokenizer), batch.prompts, batch.answers, lam=lam_of(config),
            max_new_tokens=new_tokens, temperature=config.temperature, seed=config.seed,
        )

    return run


METHODS: dict[str, Method] = {
    "plain": run_plain,
    "plain_2B": run_plain_2b,
    "hf_cfg": run_hf_cfg,
    "processor": run_processor,
    "guided_generate": _run_guided(lambda config: config.lam),
    "guided_generate_lam1": _run_guided(lambda config: 1.0),
}
TIMED_SAMPLING = {"guided_generate"}


def add_arguments(parser) -> None:
    parser.add_argument("--batch-sizes", default="1,4,8,16", help="rollouts per batch, comma-separated (default: %(default)s)")
    parser.add_argument("--new-tokens", default="32", help="tokens decoded per row (default: %(default)s)")
    parser.add_argument("--repeats", default="3", help="interleaved repeats per method and batch size (default: %(default)s)")
    parser.add_argument("--lam", type=float, default=0.5, help="λ of the guided methods (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    parser.add_argument("--task", default=DEFAULT_TASK, help="reasoning-gym task the prompts come from (default: %(default)s)")
    parser.add_argument(
        "--methods", default=",".join(METHODS),
        help=f"methods to compare, comma-separated; 'plain' is always included (default: %(default)s)",
    )
    parser.add_argument("--seed", default="0", help="prompt and sampling seed (default: %(default)s)")
    harness.add_model_arguments(parser)
    harness.add_output_argument(parser, KIND)


def config_from_args(args) -> GenerateConfig:
    methods = harness.parse_list(args.methods, "--methods", str)
    for name in methods:
        if name in UNAVAILABLE:
            raise UsageError(f"--methods: {name!r} is not available here: {UNAVAILABLE[name]}")
        if name not in METHODS:
            raise UsageError(f"--methods: unknown method {name!r}; choose from {', '.join(METHODS)}")
    if not 0.0 <= args.lam <= 1.0:
        raise UsageError(f"--lam must lie in [0, 1], got {args.lam}")
    if not args.temperature >= 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    return GenerateConfig(
        model=args.model,
        dtype=args.dtype,
        task=args.task,
        batch_sizes=harness.parse_batch_sizes(args.batch_sizes),
        new_tokens=harness.parse_int(args.new_tokens, "--new-tokens", minimum=2),
        repeats=harness.parse_int(args.repeats, "--repeats", minimum=1),
        lam=args.lam,
        temperature=args.temperature,
        seed=harness.parse_int(args.seed, "--seed"),
        methods=["plain"] + [name for name in methods if name != "plain"],
    )


def main(args) -> RunDir:
    config = config_from_args(args)
    run_dir = RunDir(harness.output_dir(args, KIND))
    threads = harness.set_threads(args.threads)
    task = Task(config.task, seed=config.seed)
    loaded = harness.load_model_from_args(args, seed=config.seed)
    run_dir.start(invocation(KIND, getattr(args, "command_line", None), asdict(config), IDENTITY, {"seed": config.seed}, str(loaded.model.device)))
    print(f"[prodsample generate] {loaded.name} ({loaded.source}), {threads} thread(s), results in {run_dir.path}")
    done = {record["batch_size"] for record in run_dir.records()}
    todo = [size for size in config.batch_sizes if size not in done]
    with harness.ProgressReport(len(todo) * config.repeats * len(config.methods), "measurements") as progress:
        for batch_size in todo:
            progress.describe(f"B={batch_size}")
            batch = make_batch(loaded.tokenizer, task, batch_size)
            run_dir.append(measure(loaded, batch, config, progress.advance))
    report(run_dir)
    return run_dir


def make_batch(tokenizer, task: Task, batch_size: int) -> Batch:
    problems = [task.problem(i) for i in range(batch_size)]
    prompts, answers = [task.prompt(p) for p in problems], [p.answer for p in problems]
    plain_ids, guide_ids = build_contexts(tokenizer, prompts, answers)

    def padded(ids):
        return dict(tokenizer.pad({"input_ids": ids}, return_tensors="pt"))

    return Batch(prompts, answers, padded(plain_ids), padded(guide_ids), padded(plain_ids + guide_ids))


def measure(loaded, batch: Batch, config: GenerateConfig, advance: Callable[[], None]) -> list[dict]:
    """Interleaved repeats of every method, after one warm-up call each."""
    model, tokenizer = loaded.model, loaded.tokenizer
    batch = _on_device(batch, model.device)
    clock, records = DecodeClock(model), []
    with fixed_length(model):
        for name in config.methods:
            METHODS[name](model, tokenizer, batch, 2, config)  # warm-up: first-call costs stay out of the timings
        for repeat in range(config.repeats):
            shift = repeat % len(config.methods)
            for name in config.methods[shift:] + config.methods[:shift]:
                timer = SamplingTimer()
                with timer.installed() if name in TIMED_SAMPLING else contextlib.nullcontext(), clock.running():
                    METHODS[name](model, tokenizer, batch, config.new_tokens, config)
                record = {
                    "batch_size": len(batch.prompts), "method": name, "repeat": repeat, "new_tokens": config.new_tokens,
                    "seconds": clock.seconds, "prefill_seconds": clock.prefill_seconds,
                    "step_seconds": clock.decode_seconds / (config.new_tokens - 1), "load_average": load_average(),
                }
                if name in TIMED_SAMPLING:
                    record["sampling_seconds"] = timer.seconds
                records.append(record)
                advance()
    return records


class DecodeClock:
    """Splits one generation call into prefill and decode by watching the model's forward calls: decoding
    starts at the first forward over a single new token per row. Every method's decode steps are such
    forwards, and every prefill (a guide context's included) reads whole prompts, so prefill = call start →
    first one-token forward, and the N − 1 later steps take the rest."""

    def __init__(self, model):
        self.model = model
        self.synchronize = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    @contextlib.contextmanager
    def running(self):
        handle = self.model.register_forward_pre_hook(self._seen, with_kwargs=True)
        self.decode_started = None
        self.started = self._now()
        try:
            yield self
        finally:
            self.finished = self._now()
            handle.remove()
        if self.decode_started is None:
            raise RuntimeError("no one-token forward was seen: the method did not decode past its prefill")

    def _now(self) -> float:
        self.synchronize()
        return time.perf_counter()

    def _seen(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if self.decode_started is None and input_ids is not None and input_ids.shape[1] == 1:
            self.decode_started = self._now()

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    @property
    def prefill_seconds(self) -> float:
        return self.decode_started - self.started

    @property
    def decode_seconds(self) -> float:
        return self.finished - self.decode_started


def _on_device(batch: Batch, device) -> Batch:
    def move(encoded):
        return {key: value.to(device) for key, value in encoded.items()}

    return Batch(batch.prompts, batch.answers, move(batch.plain), move(batch.guide), move(batch.both))


# ---------------------------------------------------------------------------------------------------------
# Summaries, tables and plots: from records.jsonl alone
# ---------------------------------------------------------------------------------------------------------

COLUMNS = [
    ("batch_size", "B", "d"),
    ("method", "method", ""),
    ("tokens_per_s", "tokens/s", ".1f"),
    ("step_ms", "ms/step", ".1f"),
    ("prefill_ms", "prefill ms", ".0f"),
    ("step_ratio", "step ÷ plain", ".2f"),
    ("step_ratio_min", "min", ".2f"),
    ("step_ratio_max", "max", ".2f"),
    ("total_ratio", "total ÷ plain", ".2f"),
    ("sampling_share", "sampling share", ".3f"),
    ("load", "load", ".1f"),
]


def summarize(records: list[dict]) -> list[dict]:
    """One row per (batch size, method): medians over repeats; ratios paired with plain's same repeat."""
    by_key = defaultdict(dict)
    for record in records:
        by_key[(record["batch_size"], record["method"])][record["repeat"]] = record
    method_order = list(dict.fromkeys(record["method"] for record in records))
    rows = []
    for batch_size, method in sorted(by_key, key=lambda key: (key[0], method_order.index(key[1]))):
        runs, plain = by_key[(batch_size, method)], by_key.get((batch_size, "plain"), {})
        paired = [repeat for repeat in runs if repeat in plain]
        step_ratios = [runs[k]["step_seconds"] / plain[k]["step_seconds"] for k in paired]
        new_tokens = next(iter(runs.values()))["new_tokens"]

        def median(key):
            return statistics.median(r[key] for r in runs.values())

        rows.append({
            "batch_size": batch_size,
            "method": method,
            "repeats": len(runs),
            "new_tokens": new_tokens,
            "tokens_per_s": batch_size * new_tokens / median("seconds"),
            "step_ms": 1000 * median("step_seconds"),
            "prefill_ms": 1000 * median("prefill_seconds"),
            "step_ratio": statistics.median(step_ratios) if step_ratios else None,
            "step_ratio_min": min(step_ratios, default=None),
            "step_ratio_max": max(step_ratios, default=None),
            "total_ratio": statistics.median(runs[k]["seconds"] / plain[k]["seconds"] for k in paired) if paired else None,
            # Sampling runs once per token; its time per token over the decode step's time.
            "sampling_share": statistics.median(r["sampling_seconds"] / r["new_tokens"] / r["step_seconds"] for r in runs.values())
            if all("sampling_seconds" in r for r in runs.values()) else None,
            "load": statistics.median(r["load_average"][0] for r in runs.values()),
        })
    return rows


def report(run_dir: RunDir) -> list[dict]:
    rows = summarize(run_dir.records())
    if not rows:
        raise UsageError(f"{run_dir.path} has no generate records yet")
    config = run_dir.invocations()[-1]["config"]
    run_dir.write_json("summary.json", {"definitions": __doc__, "unavailable": UNAVAILABLE, "rows": rows})
    run_dir.write_csv("summary.csv", rows, [key for key, _, _ in COLUMNS] + ["repeats", "new_tokens"])
    plot(run_dir, rows)
    harness.print_table(
        f"decoding cost: {config['model']}, {config['new_tokens']} new tokens, λ={config['lam']:g}, "
        f"T={config['temperature']:g}", rows, COLUMNS,
    )
    return rows


def plot(run_dir: RunDir, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in dict.fromkeys(row["method"] for row in rows):
        series = [row for row in rows if row["method"] == method]
        sizes = [row["batch_size"] for row in series]
        axes[0].plot(sizes, [row["step_ratio"] for row in series], marker="o", label=method)
        axes[1].plot(sizes, [row["tokens_per_s"] for row in series], marker="o", label=method)
    axes[0].set_title("time per decode step ÷ plain (same repeat)")
    axes[1].set_title("tokens/s (rollout tokens, prefill included)")
    for axis in axes:
        axis.set_xscale("log", base=2)
        axis.set_xlabel("batch size B (rollouts)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    run_dir.save_figure(figure, "generate.png")
    plt.close(figure)
