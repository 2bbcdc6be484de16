"""The demo's no-engine path (in-process backend): questions at points, table, plot and series.

The engine path is exercised by running the demo itself (scripts/demo.sh); the SGLang memory it
drives is tested in test_sglang_e2e.py.
"""

import json

from flashcache_sglang.streaming import demo


def test_demo_without_engine_writes_plot_and_series(tmp_path, capsys):
    output = tmp_path / "out"
    assert demo.main(["--no-engine", "--seconds", "12", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "falling back to the in-process backend" in printed
    assert printed.count("\n  Q") == 3 and "KV memory per chunk" in printed
    series = json.loads((output / "memory.json").read_text())
    chunks = series["chunks"]
    assert len(chunks) == 6 and series["cap_tokens"] == 32
    assert all(c["memory_kept_tokens"] <= c["memory_logical_tokens"] for c in chunks)
    assert [c["memory_logical_tokens"] for c in chunks] == sorted(c["memory_logical_tokens"] for c in chunks)
    asked = [q["chunks"] for q in series["questions"]]
    assert asked == [2, 4, 6], "questions land at 1/3, 2/3 and the end of the stream"
    png = (output / "memory.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
