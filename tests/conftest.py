"""Shared fixtures: test models (built once, cached outside the repo) and Redis.

Real SGLang servers are started by module-scoped fixtures in tests/sglang/conftest.py, each in
its own process group (never inside pytest's process).
"""

from __future__ import annotations

import os

import pytest
import torch

# Triton picks its CPU interpreter when a kernel is decorated, i.e. when flashcache_sglang.kernels
# (or an SGLang kernel module) is first imported. Import them here, before any test module (the
# engine code imports them too), with TRITON_INTERPRET=1, then restore the variable so SGLang servers started by tests do not
# inherit it (tests/kernels/conftest.py sets it again around each kernel test).
if not torch.cuda.is_available():
    # The test process imports SGLang modules directly (pools, rotary embeddings, the scheduler's
    # classes): give it what every SGLang process gets on CPU (cpu_compat), as the launcher does.
    from flashcache_sglang import cpu_compat

    for _key, _value in cpu_compat.CPU_ENV.items():
        os.environ.setdefault(_key, _value)
    cpu_compat.activate()

    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import flashcache_sglang.kernels  # noqa: F401
    # SGLang's own Triton kernels that tests/sglang/test_attention_view.py runs on CPU (the
    # triton / fa3 attention backends' CUDA-graph metadata and the Triton decode kernel).
    import sglang.kernels.ops.attention.decode_attention  # noqa: F401
    import sglang.kernels.ops.attention.kv_indices  # noqa: F401
    import sglang.kernels.ops.attention.metadata  # noqa: F401

    if _previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous


@pytest.fixture(scope="session")
def smollm2_dir():
    from flashcache_sglang.testing.models import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="session")
def tiny_llama_dir():
    from flashcache_sglang.testing.models import tiny_llama_dir

    return tiny_llama_dir()


@pytest.fixture(scope="session")
def tiny_vl_dir():
    from flashcache_sglang.testing.models import tiny_qwen2_5_vl_dir

    return tiny_qwen2_5_vl_dir()


@pytest.fixture(scope="session")
def redis_url():
    """The Redis server .ci/run (scripts/test.sh) started; tests needing it fail loudly in CI."""
    url = os.environ.get("FLASHCACHE_TEST_REDIS_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("FLASHCACHE_TEST_REDIS_URL is not set: scripts/test.sh starts Redis for CI")
        pytest.skip("no Redis: run the suite through scripts/test.sh, which starts one")
    return url
