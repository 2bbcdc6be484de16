"""Real SGLang servers on CPU, one process group each, shared by the tests of a module."""

from __future__ import annotations

import pytest

from flashcache_sglang.testing.server import SGLangServer


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory):
    """Start servers on demand; all of them are stopped when the module's tests are done."""
    started: list[SGLangServer] = []

    def start(model_dir, **kwargs) -> SGLangServer:
        server = SGLangServer(model_dir, log_dir=tmp_path_factory.mktemp("server"), **kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
