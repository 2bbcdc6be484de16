"""Package layout only; all metadata lives in pyproject.toml.

kernels/ and streaming/ sit at the top of the repository but install as
``flashcache_sglang.kernels`` and ``flashcache_sglang.streaming``: a top-level ``kernels`` is
Hugging Face's kernel hub (transformers probes for it with find_spec) and ``streaming`` is
MosaicML's package. tests/test_packaging.py checks that importing transformers is unaffected.
"""

from setuptools import find_packages, setup

MAPPED_FOLDERS = {"flashcache_sglang.kernels": "kernels", "flashcache_sglang.streaming": "streaming"}


def _packages_under(package: str, folder: str) -> list[str]:
    return [package] + [f"{package}.{sub}" for sub in find_packages(folder)]


packages = find_packages(include=["flashcache_sglang", "flashcache_sglang.*"])
for package, folder in MAPPED_FOLDERS.items():
    packages += _packages_under(package, folder)

setup(packages=packages, package_dir={"flashcache_sglang": "flashcache_sglang", **MAPPED_FOLDERS})
