"""The CPU stand-ins satisfy SGLang's imports and fail loudly if an op is ever called."""

import subprocess
import sys

import pytest

from flashcache_sglang import cpu_compat


def run_isolated(code: str) -> str:
    env = cpu_compat.environment()
    env["FLASHCACHE_CPU_COMPAT"] = "1"
    env = cpu_compat.environment(env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_environment_adds_site_and_cpu_flags():
    env = cpu_compat.environment({"PATH": "/bin", "FLASHCACHE_CPU_COMPAT": "1"})
    assert env["PYTHONPATH"].split(":")[0] == str(cpu_compat.SITE_DIR)
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["TORCHDYNAMO_DISABLE"] == "1"


def test_environment_untouched_when_not_needed():
    env = cpu_compat.environment({"PATH": "/bin", "FLASHCACHE_CPU_COMPAT": "0"})
    assert env == {"PATH": "/bin", "FLASHCACHE_CPU_COMPAT": "0"}


def test_standin_raises_naming_the_op():
    out = run_isolated(
        "import sgl_kernel\n"
        "try:\n    sgl_kernel.silu_and_mul(None)\n"
        "except NotImplementedError as e:\n    print('raised', e)\n"
    )
    assert "raised" in out and "silu_and_mul" in out


def test_torch_ops_namespace_hides_probed_names():
    out = run_isolated(
        "import torch\n"
        "print(hasattr(torch.ops.sgl_kernel, 'gdn_attention'))\n"
        "f = torch.ops.sgl_kernel.rmsnorm\n"
        "try:\n    f()\nexcept NotImplementedError as e:\n    print('raised', e)\n"
    )
    lines = out.splitlines()
    assert lines[0] == "False"
    assert "raised" in lines[1] and "rmsnorm" in lines[1]


@pytest.mark.timeout(300)
def test_sglang_scheduler_modules_import_on_cpu():
    out = run_isolated(
        "import sglang.srt.managers.scheduler, sglang.srt.layers.activation\n"
        "import sglang.srt.mem_cache.radix_cache\nprint('ok')\n"
    )
    assert out.strip().endswith("ok")
