#!/usr/bin/env bash
# GPU kernel tests and benchmarks, one step per call so each fits in a 10-minute device slot.
#
#   benchmarks/run_gpu_suite.sh tests     # compiled Triton kernels vs references (no interpreter)
#   benchmarks/run_gpu_suite.sh paper     # 2K / 4K / 8K, Qwen2.5-VL-7B KV shapes, bf16
#   benchmarks/run_gpu_suite.sh 32k       # 32K tokens
#   benchmarks/run_gpu_suite.sh sweep     # scoring tile configurations at 8K
#   benchmarks/run_gpu_suite.sh plot      # figure from the JSON written above
#   benchmarks/run_gpu_suite.sh all       # everything in sequence (needs ~15 minutes)
#
# Results go to benchmarks/results/kernels_<device>_<sizes>.json (+ .png); when $OUT is set
# (the project's device runner) they are copied there too so they come back.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
STEP="${1:-all}"
SLUG="$("$PYTHON" -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))')"
RESULTS=benchmarks/results

export_results() {
    if [[ -n "${OUT:-}" ]]; then
        mkdir -p "$OUT/results"
        cp "$RESULTS"/kernels_"$SLUG"_* "$RESULTS"/kernel_tests_"$SLUG".xml "$OUT/results/" 2>/dev/null || true
    fi
}

run_step() {
    case "$1" in
        tests)
            # Without TRITON_INTERPRET the kernels compile for the GPU (conftest only sets it
            # when CUDA is missing).
            env -u TRITON_INTERPRET timeout 540 "$PYTHON" -m pytest tests/kernels -q -p no:cacheprovider \
                --junitxml="$RESULTS/kernel_tests_$SLUG.xml"
            ;;
        paper)
            timeout 540 "$PYTHON" benchmarks/bench_kernels.py --device cuda --sizes paper \
                --output "$RESULTS/kernels_${SLUG}_paper.json"
            ;;
        32k)
            timeout 540 "$PYTHON" benchmarks/bench_kernels.py --device cuda --sizes 32k \
                --output "$RESULTS/kernels_${SLUG}_32k.json"
            ;;
        sweep)
            timeout 540 "$PYTHON" benchmarks/bench_kernels.py --device cuda --sizes paper --tokens 8192 \
                --skip-reference --sweep-configs --output "$RESULTS/kernels_${SLUG}_sweep.json"
            ;;
        plot)
            files=("$RESULTS/kernels_${SLUG}_paper.json")
            [[ -f "$RESULTS/kernels_${SLUG}_32k.json" ]] && files+=("$RESULTS/kernels_${SLUG}_32k.json")
            "$PYTHON" benchmarks/plot_kernels.py "${files[@]}" --output "$RESULTS/kernels_${SLUG}_plot.png"
            ;;
        *)
            echo "unknown step '$1' (valid: tests paper 32k sweep plot all)" >&2
            exit 2
            ;;
    esac
    export_results
}

if [[ "$STEP" == all ]]; then
    for step in tests paper 32k sweep plot; do run_step "$step"; done
else
    run_step "$STEP"
fi
