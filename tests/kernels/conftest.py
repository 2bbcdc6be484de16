"""Kernel tests run every Triton kernel; without CUDA that means Triton's CPU interpreter.

triton.jit picks the interpreter when it decorates a kernel, i.e. when
flashcache_sglang.kernels is imported: tests/conftest.py imports it first with TRITON_INTERPRET=1,
then the variable is restored so that other tests (and the SGLang servers they spawn) do not
inherit it; each kernel test sets it again while it runs (Triton imports parts of itself
lazily at the first launch and checks it then). If something imported the kernels earlier
without it, the check below says so.
"""


import pytest
import torch

# The package itself is first imported by tests/conftest.py, with TRITON_INTERPRET=1 there.


@pytest.fixture(autouse=True)
def _kernel_test_environment(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FLASHCACHE_POISON_OUTPUTS", "1")
    monkeypatch.setenv("FLASHCACHE_DEBUG_CHECKS", "1")


@pytest.fixture(scope="session", autouse=True)
def _kernels_are_runnable():
    if torch.cuda.is_available():
        return
    from flashcache_sglang.kernels._common import interpreter_enabled

    if not interpreter_enabled():
        pytest.fail(
            "flashcache_sglang.kernels was imported before TRITON_INTERPRET=1 was set and "
            "cannot run on this CPU-only machine; run `TRITON_INTERPRET=1 pytest tests/kernels` "
            "or import it first from tests/kernels/conftest.py"
        )
