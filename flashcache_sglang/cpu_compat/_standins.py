"""The stand-ins themselves; see the package docstring for why they exist."""

from __future__ import annotations

import sys

from . import PROBED_OP_NAMES, SITE_DIR

_installed = False


def missing_op(name: str):
    def _raise(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel op {name!r} was called, but this process runs SGLang on CPU with "
            "flashcache_sglang's stand-ins (no sgl_kernel CPU build is installed). This model "
            "or setting needs a real sgl_kernel."
        )

    _raise.__name__ = name
    _raise.__qualname__ = f"sgl_kernel_standin.{name}"
    return _raise


class _TorchOpsNamespace:
    """Stands in for torch.ops.sgl_kernel: raising functions, AttributeError for probed names."""

    def __getattr__(self, name: str):
        if name.startswith("__") or name in PROBED_OP_NAMES or _called_from_patch_torch():
            raise AttributeError(name)
        return missing_op(name)


def _called_from_patch_torch() -> bool:
    # sglang/srt/utils/patch_torch.py registers fake kernels only for ops that exist
    # (register_fake_if_exists): there every op must look absent.
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return False
        if frame.f_code.co_filename.endswith("patch_torch.py"):
            return True
        frame = frame.f_back
    return False


def install() -> None:
    global _installed
    if _installed:
        return
    site = str(SITE_DIR)
    if site not in sys.path:
        sys.path.insert(0, site)  # the sgl_kernel stand-in package lives there
    import torch

    # The lookup happens once per name at SGLang's import time, so a plain attribute on
    # torch.ops (which otherwise creates an empty namespace on first access) is enough.
    setattr(torch.ops, "sgl_kernel", _TorchOpsNamespace())
    _installed = True
