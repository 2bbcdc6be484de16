"""The serving benchmark's pure logic and the report builder, without a server."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks import make_report, serving
from benchmarks.serving import RequestOutcome


def outcome(start, ttft, output_tokens, e2e, prompt=100, cached=0, success=True, slots=None):
    result = RequestOutcome(label="r", prompt_tokens=prompt, success=success, output_tokens=output_tokens,
                            cached_tokens=cached, start=start, first_token=start + ttft, end=start + e2e)
    result.itl = [(e2e - ttft) / max(1, output_tokens - 1)] * max(0, output_tokens - 1)
    if slots is not None:
        result.flashcache = {"prompt_kv_slots": slots}
    return result


@pytest.mark.parametrize("values", [[1.0], [3.0, 1.0, 2.0], list(np.linspace(0, 1, 97)), [5.0] * 4 + [100.0]],
                         ids=["one", "three", "97-linspace", "outlier"])
def test_distribution_matches_numpy_percentiles(values):
    got = serving.distribution_ms("ttft", values)
    ms = np.array(values) * 1000
    assert got["mean_ttft_ms"] == pytest.approx(ms.mean())
    assert got["median_ttft_ms"] == pytest.approx(np.percentile(ms, 50))
    assert got["p99_ttft_ms"] == pytest.approx(np.percentile(ms, 99))


def test_empty_distribution_is_nan_not_an_error():
    assert all(math.isnan(v) for v in serving.distribution_ms("itl", []).values())


def test_serving_metrics_use_bench_serving_names_and_skip_failures():
    outcomes = [outcome(0.0, 0.5, 11, 1.5, cached=40, slots=30), outcome(0.2, 0.3, 1, 0.4, cached=0, slots=50),
                outcome(0.0, 0.0, 0, 0.0, success=False)]
    metrics = serving.serving_metrics(outcomes, duration=2.0)
    assert metrics["completed"] == 2 and metrics["errors"] == 1
    assert metrics["request_throughput"] == pytest.approx(1.0)
    assert metrics["input_throughput"] == pytest.approx(100.0)
    assert metrics["output_throughput"] == pytest.approx(6.0)
    assert metrics["median_tpot_ms"] == pytest.approx(100.0)  # one token has no TPOT
    assert metrics["mean_ttft_ms"] == pytest.approx(400.0)
    assert metrics["cached_token_share"] == pytest.approx(0.2)
    assert metrics["mean_prompt_kv_slots"] == pytest.approx(40.0)
    for name in ("ttft", "tpot", "itl", "e2e_latency"):
        for stat in ("mean", "median", "p99"):
            assert f"{stat}_{name}_ms" in metrics


def test_max_overlap_counts_concurrent_intervals():
    assert serving.max_overlap([]) == 0
    assert serving.max_overlap([(0, 1), (1, 2)]) == 1  # touching end/start is not overlap
    assert serving.max_overlap([(0, 10), (1, 3), (2, 4), (3.5, 5)]) == 3


def test_prometheus_value_sums_label_sets_and_defaults_to_zero():
    text = ('# HELP sglang:evicted_tokens_total x\n# TYPE sglang:evicted_tokens_total counter\n'
            'sglang:evicted_tokens_total{tp_rank="0"} 256.0\nsglang:evicted_tokens_total{tp_rank="1"} 4.0\n'
            'sglang:evicted_tokens_total_created{tp_rank="0"} 1.7e9\n')
    assert serving.prometheus_value(text, serving.EVICTED_TOKENS_METRIC) == 260.0
    assert serving.prometheus_value("", serving.EVICTED_TOKENS_METRIC) == 0.0


def test_running_requests_parsed_from_the_schedulers_decode_lines():
    log = ("[t] Prefill batch, #new-seq: 3, #new-token: 768, #cached-token: 0, token usage: 0.24, "
           "#running-req: 0, #queue-req: 1\n"
           "[t] Decode batch, #running-req: 3, #token: 246, token usage: 0.24, cpu graph: False\n"
           "[t] Decode batch, #running-req: 4, #token: 330, token usage: 0.32, cpu graph: False\n")
    assert serving.running_requests_in_log(log) == {"max_running_requests": 4, "peak_token_usage": 0.32,
                                                    "decode_steps_logged": 2}


def test_ratio_is_none_without_a_comparable_baseline():
    assert serving.ratio(8, 2) == 4.0
    assert serving.ratio(1, 0) is None and serving.ratio(None, 1) is None and serving.ratio(1, float("nan")) is None


def test_finite_makes_strict_json():
    data = serving.finite({"a": float("nan"), "b": [math.inf, 1.5], "c": "x"})
    assert json.loads(json.dumps(data, allow_nan=False)) == {"a": None, "b": ["inf", 1.5], "c": "x"}


class WordTokenizer:
    """Stands in for the model's tokenizer: one id per whitespace-separated word."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [hash(word) % 50000 for word in text.split()]}


def test_corpus_windows_start_apart_and_reject_impossible_sizes():
    corpus = serving.LicenseCorpus(WordTokenizer())
    windows = corpus.windows(12, 300)
    starts = {tuple(w[:8]) for w in windows}
    assert len(starts) == 12 and all(len(w) == 300 for w in windows)
    assert corpus.windows(3, 300, salt=1) != corpus.windows(3, 300, salt=2)
    with pytest.raises(ValueError, match="window length"):
        corpus.windows(1, len(corpus.ids) + 1)
    with pytest.raises(ValueError, match="do not fit"):
        corpus.windows(len(corpus.ids), 100)


def test_param_overrides_are_validated():
    args = serving.parse_args(["--quick", "--param", "sessions-held.session_tokens=300", "--num-prompts", "7"])
    sizes = serving._sizes(args)
    assert sizes["sessions-held"]["session_tokens"] == 300 and sizes["long-prompt"]["num_prompts"] == 7
    assert args.max_total_tokens == serving.QUICK_POOL_TOKENS
    with pytest.raises(ValueError, match="valid: .*sessions-held.max_sessions"):
        serving._sizes(serving.parse_args(["--param", "sessions-held.bogus=1"]))


def _serving_report() -> dict:
    def side(held, slots, ttft):
        return {"sessions_held": held, "sessions_cached_after_fill": held, "kv_slots_per_session": slots,
                "mean_prefill_s": 1.0, "median_ttft_ms": ttft, "p99_ttft_ms": 2 * ttft, "median_tpot_ms": 10.0,
                "p99_tpot_ms": 12.0, "max_running_requests": 3,
                "per_turn": [{"turn": 1, "cached_token_share": 0.0, "median_ttft_ms": ttft},
                             {"turn": 2, "cached_token_share": 0.9, "median_ttft_ms": ttft / 4}]}

    vanilla, flash = side(6, 1500.0, 900.0), side(26, 329.0, 800.0)
    workloads = {name: {"sizes": {"session_tokens": 1500}, "vanilla": vanilla, "flashcache": flash,
                        "ratios": serving.compare(name, vanilla, flash)} for name in serving.WORKLOAD_NAMES}
    return {"benchmark": "serving", "quick": False, "command": "python -m benchmarks.serving",
            "machine": {"cpu_model": "cpu", "cores": 2, "load_average_start": [0.5, 0.5, 0.5],
                        "load_average_end": [2.0, 1.0, 0.5]},
            "settings": {"model": "m", "dtype": "float32", "max_total_tokens": 10000,
                         "flashcache": {"retention": 0.2}},
            "workloads": workloads, "errors": 0, "failed_leak_checks": 0, "ok": True,
            "headline": {"sessions_held_vanilla": 6, "sessions_held_flashcache": 26, "ratio": 26 / 6,
                         "retention": 0.2, "max_total_tokens": 10000, "session_tokens": 1500}}


def test_report_renders_every_kind_it_finds_and_names_what_is_missing(tmp_path):
    (tmp_path / "serving_cpu.json").write_text(json.dumps(_serving_report()))
    kernels = {"device": {"device_name": "Fake GPU"}, "shape": {"num_layers": 2, "num_kv_heads": 1, "head_dim": 4,
                                                                 "dtype": "torch.float16"},
               "target_ms": {"1024": 1.0},
               "results": [{"num_tokens": n, "engine": {"median_ms": n / 1000}, "stream": {"median_ms": n / 800},
                            "floor": {"median_ms": n / 4000}}
                           for n in (1024, 4096)]}
    (tmp_path / "kernels_fake.json").write_text(json.dumps(kernels))
    (tmp_path / "notes.json").write_text(json.dumps({"something": "else"}))
    (tmp_path / "broken.json").write_text("{")

    text, used = make_report.build_report(tmp_path)
    assert used == {"serving": ["serving_cpu.json"], "soak": [], "video_overhead": [], "kernels": ["kernels_fake.json"],
                    "fidelity": [], "stream_long": []}
    assert "vanilla 6, FlashCache 26 (**x4.33**)" in text
    assert "| sessions_held | 6 | 26 | 4.333 |" in text
    assert "Fake GPU" in text and "| 1024 | 1.024 | 1.28 |" in text
    assert "fidelity: none found" in text
    assert "ignored notes.json" in text and "broken.json (unreadable" in text
    assert (tmp_path / "serving_cpu.png").stat().st_size > 0
    assert (tmp_path / "kernels_fake.png").stat().st_size > 0


def test_video_workloads_parse_alone_and_pick_the_vl_model():
    args = serving.parse_args(["--quick", "--workloads", "video-shared-prefix", "video-multi-turn"])
    assert args.model == "tiny-vl" and serving.is_video_run(args)
    assert serving.flashcache_settings(args) == {"retention": 0.2, "candidates": "multimodal", "min_candidates": 8}
    assert "--enable-multimodal" in serving.server_args(args)
    sizes = serving._sizes(args)
    assert serving.needed_videos(args, sizes) == max(sizes["video-shared-prefix"]["videos"],
                                                     sizes["video-multi-turn"]["videos"] * sizes["video-multi-turn"]["num_sessions"])
    text = serving.parse_args(["--workloads", "shared-prefix"])
    assert not serving.is_video_run(text) and serving.flashcache_settings(text)["candidates"] == "text"
    with pytest.raises(SystemExit):
        serving.parse_args(["--workloads", "video-shared-prefix", "shared-prefix"])


def test_video_body_is_the_stream_backends_prompt():
    from flashcache_sglang.streaming.sglang_backend import PromptTemplate

    body = serving.video_body(["a.mp4", "b.mp4"], "\nQ?")
    assert body["video_data"] == ["a.mp4", "b.mp4"]
    template = PromptTemplate()
    assert body["text"] == template.header.format(system=template.system) + template.video * 2 + "\nQ?"
    assert body["text"].count("<|video_pad|>") == 2
