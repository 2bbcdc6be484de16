"""Stand-in for the CUDA-only ``sgl_kernel`` package (see flashcache_sglang.cpu_compat).

Every attribute is a function that raises NotImplementedError naming the op.
"""

from flashcache_sglang.cpu_compat._standins import missing_op

__version__ = "0.0.0+flashcache-cpu-standin"


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return missing_op(name)
