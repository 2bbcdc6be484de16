"""``python -m flashcache_sglang.launch_server <sglang args> --flashcache-retention 0.2 ...``

Validates the ``--flashcache-*`` flags, pre-checks the SGLang flags against the one table of
refused settings (flashcache_sglang.support; the scheduler checks the resolved settings again
before the server reports healthy), exports the settings for SGLang's spawned processes, and
then runs SGLang's own ``sglang.launch_server`` with ``--radix-cache-backend flashcache``.

Defaults it adds unless you set them yourself:

- on a GPU: ``--cuda-graph-backend-prefill disabled`` (decode CUDA graphs stay on, as in
  SGLang; prefill graphs are refused, see support.py). The attention backend is SGLang's own
  default (fa3 on Hopper), which flashcache wraps;
- on a machine without CUDA: what SGLang needs to run on CPU (see flashcache_sglang.cpu_compat)
  and a KV pool of ``--max-total-tokens`` :data:`CPU_MAX_TOTAL_TOKENS` (SGLang would otherwise size
  the pool from the machine's memory: 14.8 GB for a 135M model on a 24 GB machine) unless
  ``--max-total-tokens`` or ``--mem-fraction-static`` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from . import cpu_compat, support
from .config import CANDIDATE_MODES, ENV_VAR, FlashCacheConfig

CPU_DEFAULTS = {
    "--device": "cpu",
    "--attention-backend": "torch_native",
    "--sampling-backend": "pytorch",
    "--grammar-backend": "none",
}
CPU_SWITCHES = ("--disable-cuda-graph",)
# KV pool bound on CPU, in tokens: generous for the small models CPUs serve (SmolLM2-135M in
# float32 holds 46 KB per token: 1.5 GB), and far from the whole machine.
CPU_MAX_TOTAL_TOKENS = 32768
GPU_DEFAULTS = {"--cuda-graph-backend-prefill": "disabled"}


def add_flashcache_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("flashcache")
    default = FlashCacheConfig()
    group.add_argument("--flashcache-retention", type=float, default=default.retention,
                       help="share of candidate (visual, or text-mode) tokens kept, in (0, 1]; 1 = off")
    group.add_argument("--flashcache-gamma", type=float, default=default.gamma,
                       help="DCT low-pass cutoff as a fraction of the span, in (0, 1)")
    group.add_argument("--flashcache-policy", default=default.policy,
                       help="policy scoring the tokens (must not need attention scores)")
    group.add_argument("--flashcache-candidates", default=default.candidates, choices=CANDIDATE_MODES,
                       help="which prompt tokens may be dropped")
    group.add_argument("--flashcache-sink-tokens", type=int, default=default.sink_tokens)
    group.add_argument("--flashcache-recent-tokens", type=int, default=default.recent_tokens)
    group.add_argument("--flashcache-min-candidates", type=int, default=default.min_candidates)
    group.add_argument("--flashcache-stream-max", type=int, default=default.stream_max,
                       help="most stream memories the server holds at once (a new one beyond it: 503)")
    group.add_argument("--flashcache-stream-idle-timeout", type=float, default=default.stream_idle_timeout_s,
                       help="close a stream memory unused for this many seconds (0: never)")


def config_from_args(args: argparse.Namespace) -> FlashCacheConfig:
    return FlashCacheConfig(
        retention=args.flashcache_retention, gamma=args.flashcache_gamma,
        policy=args.flashcache_policy, candidates=args.flashcache_candidates,
        sink_tokens=args.flashcache_sink_tokens, recent_tokens=args.flashcache_recent_tokens,
        min_candidates=args.flashcache_min_candidates, stream_max=args.flashcache_stream_max,
        stream_idle_timeout_s=args.flashcache_stream_idle_timeout,
    )


def _has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def check_sglang_args(argv: Sequence[str], config: FlashCacheConfig | None = None) -> None:
    """Raise support.UnsupportedSetting naming every SGLang flag (and FlashCache setting) that
    FlashCache cannot serve: the fast pre-check; the scheduler checks the resolved settings."""
    support.check({**support.environment_settings(), **support.settings_from_argv(argv)}, config)


def sglang_argv(argv: Sequence[str], cpu: bool) -> list[str]:
    out = list(argv)
    if not _has_flag(out, "--radix-cache-backend"):
        out += ["--radix-cache-backend", "flashcache"]
    if cpu:
        for flag, value in CPU_DEFAULTS.items():
            if not _has_flag(out, flag):
                out += [flag, value]
        for flag in CPU_SWITCHES:
            if not _has_flag(out, flag):
                out.append(flag)
        if not (_has_flag(out, "--max-total-tokens") or _has_flag(out, "--mem-fraction-static")):
            out += ["--max-total-tokens", str(CPU_MAX_TOTAL_TOKENS)]
    else:
        for flag, value in GPU_DEFAULTS.items():
            if not (_has_flag(out, flag) or _has_flag(out, "--disable-cuda-graph")):
                out += [flag, value]
    return out


def prepare(argv: Sequence[str]) -> tuple[FlashCacheConfig, list[str], dict[str, str]]:
    """Parse our flags out of ``argv``; return the config, SGLang's argv and the environment."""
    parser = argparse.ArgumentParser(add_help=False)
    add_flashcache_arguments(parser)
    args, rest = parser.parse_known_args(list(argv))
    config = config_from_args(args)
    check_sglang_args(rest, config)
    cpu = cpu_compat.needed()
    env = cpu_compat.environment()
    env[ENV_VAR] = config.to_json()
    return config, sglang_argv(rest, cpu), env


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        parser = argparse.ArgumentParser(prog="python -m flashcache_sglang.launch_server",
                                         description=__doc__.split("\n\n")[0] + " All other flags go to SGLang.")
        add_flashcache_arguments(parser)
        parser.print_help()
        return
    try:
        config, sglang_args, env = prepare(argv)
    except ValueError as error:
        print(f"flashcache_sglang.launch_server: error: {error}", file=sys.stderr)
        raise SystemExit(2)
    print(f"flashcache: retention={config.retention:g} gamma={config.gamma:g} policy={config.policy} "
          f"candidates={config.candidates}; sglang {' '.join(sglang_args)}", file=sys.stderr)
    os.execve(sys.executable, [sys.executable, "-m", "sglang.launch_server", *sglang_args], env)


if __name__ == "__main__":
    main()
