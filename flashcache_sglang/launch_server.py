"""``python -m flashcache_sglang.launch_server <sglang args> --flashcache-retention 0.2 ...``

Validates the ``--flashcache-*`` flags, refuses SGLang settings FlashCache cannot serve
correctly, exports the settings for SGLang's spawned processes, and then runs SGLang's own
``sglang.launch_server`` with ``--radix-cache-backend flashcache``. On a machine without CUDA it
also adds what SGLang needs to run on CPU (see flashcache_sglang.cpu_compat) unless you set those
flags yourself.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from . import cpu_compat
from .config import CANDIDATE_MODES, ENV_VAR, FlashCacheConfig

# SGLang flags whose presence (or value) makes compressed rows unsafe: KV index != position,
# or a tree other than ours.
_REFUSED_FLAGS = {
    "--speculative-algorithm": "speculative decoding reads draft KV by position",
    "--disable-radix-cache": "flashcache is a radix cache; disabling it disables flashcache",
    "--enable-hierarchical-cache": "the hierarchical (host) cache copies rows by position",
    "--enable-dcp": "decode context parallelism shards KV by position",
    "--enable-streaming-session": "streaming sessions need SGLang's UnifiedRadixCache",
}

CPU_DEFAULTS = {
    "--device": "cpu",
    "--attention-backend": "torch_native",
    "--sampling-backend": "pytorch",
    "--grammar-backend": "none",
}
CPU_SWITCHES = ("--disable-cuda-graph",)


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


def config_from_args(args: argparse.Namespace) -> FlashCacheConfig:
    return FlashCacheConfig(
        retention=args.flashcache_retention, gamma=args.flashcache_gamma,
        policy=args.flashcache_policy, candidates=args.flashcache_candidates,
        sink_tokens=args.flashcache_sink_tokens, recent_tokens=args.flashcache_recent_tokens,
        min_candidates=args.flashcache_min_candidates,
    )


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def check_sglang_args(argv: Sequence[str]) -> None:
    """Raise ValueError naming the first SGLang flag FlashCache cannot serve."""
    for flag, why in _REFUSED_FLAGS.items():
        if _has_flag(argv, flag):
            raise ValueError(f"{flag} is not supported with flashcache: {why}")
    page_size = _flag_value(argv, "--page-size")
    if page_size is not None and page_size != "1":
        raise ValueError(f"--page-size {page_size} is not supported with flashcache: only 1 "
                         "(a dropped token cannot be freed from a larger page without compaction)")
    backend = _flag_value(argv, "--radix-cache-backend")
    if backend is not None and backend != "flashcache":
        raise ValueError(f"--radix-cache-backend {backend} conflicts with flashcache's own backend")
    attention = _flag_value(argv, "--attention-backend")
    if attention is not None and attention not in ("torch_native", "triton", "flashinfer"):
        raise ValueError(f"--attention-backend {attention} is not supported with flashcache: "
                         "use torch_native, triton or flashinfer")


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
    else:
        if not _has_flag(out, "--attention-backend"):
            # The default on Hopper is fa3, which the wrapper does not cover.
            out += ["--attention-backend", "flashinfer"]
        if not _has_flag(out, "--disable-cuda-graph"):
            # The wrapper prepares graph metadata from compacted rows, but replay over compressed
            # rows has not been verified on a GPU yet: run eagerly until it has.
            out.append("--disable-cuda-graph")
    return out


def prepare(argv: Sequence[str]) -> tuple[FlashCacheConfig, list[str], dict[str, str]]:
    """Parse our flags out of ``argv``; return the config, SGLang's argv and the environment."""
    parser = argparse.ArgumentParser(add_help=False)
    add_flashcache_arguments(parser)
    args, rest = parser.parse_known_args(list(argv))
    config = config_from_args(args)
    check_sglang_args(rest)
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
