#!/usr/bin/env bash
# The main demo: a video stream's KV memory in SGLang with FlashCache, on this machine's CPU.
#
#   bash scripts/demo.sh                                   # generated video, tiny model (~3 min)
#   bash scripts/demo.sh --video clip.mp4                  # your file, or an rtsp:// URL
#   bash scripts/demo.sh --model-path Qwen/Qwen2.5-VL-7B-Instruct --kv-cap 2048   # GPU, real answers
#   bash scripts/demo.sh --no-engine                       # no SGLang: in-process accounting only
#
# Output (plot, series, chunk videos, server log) goes to ./demo-output unless --output DIR.
# Arguments go to python -m flashcache_sglang.streaming.demo (--help lists them).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec .venv/bin/python -m flashcache_sglang.streaming.demo "$@"
