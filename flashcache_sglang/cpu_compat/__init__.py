"""CPU compatibility: lets SGLang 0.5.23 run on machines without CUDA.

SGLang imports names from ``sgl_kernel`` (a CUDA/AMX extension whose CPU build is not on PyPI)
and looks up ``torch.ops.sgl_kernel.<op>`` at import time in some modules. For a dense model on
CPUs without Intel AMX it never *calls* them (ops fall back to pure-torch ``forward_native``).
The stand-ins here satisfy the imports and raise ``NotImplementedError`` naming the op if SGLang
ever does call one, so a missing kernel can never turn into silent wrong output.

They are installed only when no CUDA device is present (see :func:`needed`), through
``site/sitecustomize.py`` on PYTHONPATH, which reaches SGLang's spawned scheduler and
detokenizer processes too. :func:`environment` returns the variables a launcher adds.
"""

from __future__ import annotations

import os
from pathlib import Path

SITE_DIR = Path(__file__).resolve().parent / "site"

# Names SGLang probes with hasattr(torch.ops.sgl_kernel, ...) to pick a code path: they must be
# absent (AttributeError), or SGLang takes a kernel path that does not exist here.
PROBED_OP_NAMES = frozenset(
    {
        "shm_group_initialize",
        "convert_weight_packed",
        "gdn_attention",
        "fused_qk_norm_rope_cpu",
        "fused_qk_norm_cpu",
        "get_device_accessible_ptr",
    }
)

# The variables every SGLang process needs on CPU (ENV_NOTES: without SGLANG_USE_CPU_ENGINE the
# scheduler imports vllm; without TORCHDYNAMO_DISABLE the first video request compiles M-RoPE
# code with Inductor for ~40 s).
CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1", "TORCHDYNAMO_DISABLE": "1"}


def needed(environ=None) -> bool:
    """True when the stand-ins are required: no real sgl_kernel can load (no CUDA).

    ``FLASHCACHE_CPU_COMPAT=1`` / ``0`` in ``environ`` (default os.environ) forces the answer.
    """
    forced = (os.environ if environ is None else environ).get("FLASHCACHE_CPU_COMPAT")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:  # torch missing or broken: nothing of SGLang will run either way
        return True


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default: os.environ) with what SGLang's processes need on CPU."""
    env = dict(os.environ if base is None else base)
    if not needed(env):
        return env
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(SITE_DIR) not in paths:
        env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), *paths])
    for key, value in CPU_ENV.items():
        env.setdefault(key, value)
    env["FLASHCACHE_CPU_COMPAT"] = "1"
    return env


def activate() -> None:
    """Install the stand-ins in this process (idempotent). Call before importing sglang."""
    from . import _standins

    _standins.install()
