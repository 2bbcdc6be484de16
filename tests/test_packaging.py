"""kernels/ and streaming/ install under flashcache_sglang, never as top-level packages."""

import importlib.util
import subprocess
import sys


def test_mapped_subpackages_import():
    import flashcache_sglang.kernels
    import flashcache_sglang.streaming

    assert flashcache_sglang.kernels.__file__.replace("\\", "/").endswith("kernels/__init__.py")
    assert flashcache_sglang.streaming.__file__.replace("\\", "/").endswith("streaming/__init__.py")


def test_no_top_level_kernels_or_streaming_from_us():
    for name in ("kernels", "streaming"):
        spec = importlib.util.find_spec(name)
        assert spec is None or "flashcache" not in str(spec.origin), (name, spec)


def test_transformers_does_not_see_our_kernels():
    # transformers probes find_spec("kernels") for Hugging Face's kernel hub.
    code = (
        "import transformers.utils.import_utils as u, flashcache_sglang.kernels;"
        "print(u.is_kernels_available())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
