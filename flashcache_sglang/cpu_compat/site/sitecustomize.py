# Put on PYTHONPATH by flashcache_sglang.cpu_compat.environment() for SGLang's processes on
# machines without CUDA: installs the sgl_kernel stand-ins before SGLang is imported.
try:
    from flashcache_sglang.cpu_compat import activate as _activate, needed as _needed

    if _needed():
        _activate()
except ImportError:  # flashcache_sglang not importable in this interpreter: do nothing
    pass
