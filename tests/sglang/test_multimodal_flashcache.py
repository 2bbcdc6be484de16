"""FlashCache on visual tokens in a real SGLang server: tiny random Qwen2.5-VL, CPU, float32.

Server settings: retention 0.25, candidates "multimodal" (only image/video tokens may be dropped),
min_candidates 8 (the 112x112 image gives 16 tokens, the clip 32).

Checked end to end through HTTP:
- only visual tokens are dropped (spans located independently, from the HF processor), text is
  kept, and the kept count is round(0.25 * visual tokens);
- the same video with a new question reuses the compressed prefix;
- the text after a compressed video keeps its exact M-RoPE positions: the engine's
  teacher-forced logprobs equal a transformers reference dropping the same tokens at logical
  positions, and a reference with positions shifted by the number of dropped tokens does not;
- image + video in one prompt: both spans are candidates, the text between them is kept.

Why a hand-built transformers reference used to disagree with SGLang on videos (ENV_NOTES) -
measured here by ``test_reference_reproduces_sglang_video_exactly`` at retention 1.0:
  * SGLang samples/resizes frames itself (2 fps, >= 4 frames, upscale to VIDEO_MIN_PIXELS =
    128*28*28, then the HF processor downsizes): the reference must get those frames
    (``sglang_video_frames``; raw frames give another grid and token count);
  * SGLang hands them to the HF processor without metadata, so second_per_grid_ts = 2/24 (HF's
    24 fps default) instead of 2/2: with tokens_per_second 4 all temporal grids sit at temporal
    position 0. A reference with the true 1.0 s (or without second_per_grid_ts, HF default 1.0)
    misses by ~4 nats;
  * SGLang's vision tower runs full attention over the whole clip (cu_seqlens t*h*w), HF per
    temporal grid (h*w): ~0.1 nat. ``sglang_vision_attention`` aligns transformers.
With all three aligned the text after the video matches to ~1e-5 (float32, like images).
"""

from __future__ import annotations

import base64
import io
import subprocess

import pytest
import torch

from flashcache_sglang.testing.multimodal import sglang_video_frames, sglang_vision_attention

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

RETENTION = 0.25
SETTINGS = {"retention": RETENTION, "candidates": "multimodal", "min_candidates": 8}
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# Engine vs reference, float32 on both sides. At retention 1.0 they agree to ~1e-5 (summation
# order only); compression changes only which keys attention sums over (same kept set on both
# sides), so 1e-3 leaves ~100x headroom while a position error costs > 0.1 nat (asserted below).
TOLERANCE = 1e-3


def user(content: str) -> str:
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=4",
                    "-t", "2", "-pix_fmt", "yuv420p", str(path)], check=True, timeout=60)
    return path


@pytest.fixture(scope="module")
def frames(clip):
    return sglang_video_frames(clip)


@pytest.fixture(scope="module")
def picture(frames):
    """A textured 112x112 image (a frame of the clip): uniform images hide vision-tower bugs."""
    from PIL import Image

    image = Image.fromarray(frames[-1].permute(1, 2, 0).numpy()).resize((112, 112))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return image, "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def server(server_factory, tiny_vl_dir):
    return server_factory(tiny_vl_dir, flashcache=SETTINGS, extra_args=["--enable-multimodal"],
                          max_total_tokens=8192)


@pytest.fixture(scope="module")
def processor(tiny_vl_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_vl_dir)


@pytest.fixture(scope="module")
def model(tiny_vl_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vl_dir, dtype=torch.float32).eval()


def hf_inputs(processor, text, frames=None, image=None):
    """What the reference feeds the model; frames as a tensor without metadata, as SGLang does."""
    kwargs = {}
    if frames is not None:
        kwargs["videos"] = [frames]
    if image is not None:
        kwargs["images"] = [image]
    return dict(processor(text=[text], return_tensors="pt", **kwargs))


def visual_positions(model, input_ids: torch.Tensor) -> torch.Tensor:
    ids = input_ids[0]
    config = model.config
    return ((ids == config.video_token_id) | (ids == config.image_token_id)).nonzero().flatten()


def ask(server, text, *, frames_path=None, image_url=None, **fields):
    media = {}
    if frames_path is not None:
        media["video_data"] = str(frames_path)
    if image_url is not None:
        media["image_data"] = image_url
    return server.generate(text, max_new_tokens=1, **media, **fields)


def full_retention() -> dict:
    return {"sampling_params": {"custom_params": {"flashcache": {"retention": 1.0}}}}


def logprob_vector(meta) -> torch.Tensor:
    return torch.tensor([entry[0] if entry[0] is not None else float("nan")
                         for entry in meta["input_token_logprobs"]])


# ---------------------------------------------------------------------------------- 3a. calibration
def test_reference_reproduces_sglang_video_exactly(server, clip, frames, processor, model):
    """Retention 1.0: SGLang vs transformers on the same video, and why they used to differ."""
    text = user(VIDEO + "What happens in this clip? Describe the colours.")
    meta = ask(server, text, frames_path=clip, return_logprob=True, logprob_start_len=0,
               **full_retention())["meta_info"]
    inputs = hf_inputs(processor, text, frames)
    ids = inputs["input_ids"]
    assert meta["prompt_tokens"] == ids.shape[1] and meta["video_tokens"] == 32
    assert inputs["video_grid_thw"].tolist() == [[2, 8, 8]]  # 4 frames, 336x336 -> 112x112
    # SGLang and this call both leave the HF processor at its 24 fps default.
    assert inputs["second_per_grid_ts"].tolist() == pytest.approx([2 / 24])
    engine = logprob_vector(meta)
    # Compare where the target is a text token (SGLang scores visual positions against their
    # content-hash pad ids, not the real token id).
    text_targets = torch.ones(ids.shape[1], dtype=torch.bool)
    text_targets[0] = False
    text_targets[visual_positions(model, ids)] = False

    def error(**overrides) -> float:
        with torch.no_grad():
            logits = model(**{**inputs, **overrides}).logits[0].float()
        reference = torch.log_softmax(logits, -1)[:-1].gather(1, ids[0, 1:, None])[:, 0]
        reference = torch.cat([reference.new_full((1,), float("nan")), reference])
        return (reference - engine)[text_targets].abs().max().item()

    with sglang_vision_attention():
        aligned = error()
        true_fps = error(second_per_grid_ts=torch.tensor([1.0]))
    per_frame_vision = error()
    print(f"\nvideo logprob max |diff|: aligned {aligned:.1e}, HF per-frame vision attention "
          f"{per_frame_vision:.1e}, second_per_grid_ts 1.0 {true_fps:.1e}")
    assert aligned < 1e-4
    assert per_frame_vision > 1e-2  # SGLang 0.5.23's whole-clip vision attention
    assert true_fps > 1.0  # SGLang's collapsed temporal positions (24 fps assumption)


# ---------------------------------------------------------------------------------- 1. only visual
def test_only_video_tokens_are_dropped(server, clip, frames, processor, model):
    server.flush_cache()
    text = user(VIDEO + "What happens in this clip?")
    out = ask(server, text, frames_path=clip)
    ids = hf_inputs(processor, text, frames)["input_ids"]
    video = visual_positions(model, ids).tolist()
    assert video == list(range(video[0], video[0] + 32))  # one contiguous span
    kept = server.kept_positions(out["meta_info"]["id"])
    assert kept["prompt_len"] == ids.shape[1]
    assert kept["candidate_positions"] == video
    dropped = set(kept["dropped_positions"])
    assert dropped <= set(video)
    assert len(dropped) == len(video) - round(RETENTION * len(video))
    report = out["meta_info"]["flashcache"][0]
    assert report["candidate_tokens"] == 32 and report["kept_tokens"] == round(RETENTION * 32)
    assert report["prompt_kv_slots"] == ids.shape[1] - len(dropped)


# ---------------------------------------------------------------------------------- 2. reuse
def test_repeated_video_reuses_the_compressed_prefix(server, clip, frames, processor, model):
    server.flush_cache()
    first = ask(server, user(VIDEO + "What happens in this clip?"), frames_path=clip)
    second = ask(server, user(VIDEO + "Which colours appear?"), frames_path=clip)
    ids = hf_inputs(processor, user(VIDEO + "Which colours appear?"), frames)["input_ids"]
    video_end = int(visual_positions(model, ids)[-1]) + 1
    meta = second["meta_info"]
    assert meta["cached_tokens"] >= video_end, meta
    report = meta["flashcache"][0]
    dropped = first["meta_info"]["flashcache"][0]["candidate_tokens"] - \
        first["meta_info"]["flashcache"][0]["kept_tokens"]
    assert report["candidate_tokens"] == 0  # nothing new to compress: the video came from the cache
    assert report["prompt_kv_slots"] == meta["prompt_tokens"] - dropped < meta["prompt_tokens"]
    stats = server.stats()
    assert stats["tree_dropped_entries"] == dropped


# ---------------------------------------------------------------------------------- 3. M-RoPE
def _reference_logprobs(model, inputs, context_len, dropped):
    """Teacher-forced logprobs of the tokens after ``context_len`` (entry 0 excluded), with
    ``dropped`` context tokens removed from every layer's cache and logical positions kept."""
    from flashcache_sglang import reference
    from flashcache_sglang.policies import KeepSet

    ids = inputs["input_ids"]
    context = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    context["mm_token_type_ids"] = inputs["mm_token_type_ids"][:, :context_len]  # M-RoPE needs it
    config = model.config.get_text_config(decoder=True)
    keep = torch.ones(context_len, dtype=torch.bool)
    keep[dropped] = False
    keep_set = KeepSet(keep=keep.expand(config.num_hidden_layers, config.num_key_value_heads, -1).clone(),
                       candidate_mask=torch.ones(context_len, dtype=torch.bool))
    with sglang_vision_attention():
        prefilled = reference.prefill(model, ids[:, :context_len], observation_window=1, **context)
    nll = reference.continue_from_prefill(model, prefilled, ids[:, context_len:], keep_set)
    return -nll[1:]


def test_text_after_compressed_video_keeps_mrope_positions(server, clip, frames, processor, model, monkeypatch):
    from flashcache_sglang import reference

    server.flush_cache()
    context_text = user(VIDEO + "What happens in this clip?")
    full_text = context_text + "The clip shows colour bars, a moving wedge and a counter that ticks."
    inputs = hf_inputs(processor, full_text, frames)
    context_len = hf_inputs(processor, context_text, frames)["input_ids"].shape[1]
    first = ask(server, context_text, frames_path=clip)
    assert first["meta_info"]["prompt_tokens"] == context_len
    dropped = server.kept_positions(first["meta_info"]["id"])["dropped_positions"]
    assert len(dropped) == 32 - round(RETENTION * 32)

    out = ask(server, full_text, frames_path=clip, return_logprob=True, logprob_start_len=context_len)
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert len(meta["input_token_logprobs"]) == inputs["input_ids"].shape[1] - context_len
    assert meta["cached_tokens"] == context_len, meta  # the compressed prefix was reused, not recomputed
    engine = logprob_vector(meta)[1:]

    expected = _reference_logprobs(model, inputs, context_len, dropped)
    error = (engine - expected).abs().max().item()
    # Sanity: compression really changed the output (else this test would prove nothing).
    uncompressed = _reference_logprobs(model, inputs, context_len, [])
    compression_effect = (engine - uncompressed).abs().max().item()
    assert compression_effect > 10 * TOLERANCE

    # Had the engine numbered the text after the video by *kept* tokens, it would match this.
    real_positions = reference._position_ids
    monkeypatch.setattr(reference, "_position_ids",
                        lambda model, start, length, device: real_positions(model, start - len(dropped), length, device))
    shifted = _reference_logprobs(model, inputs, context_len, dropped)
    shifted_error = (engine - shifted).abs().max().item()
    print(f"\nengine vs reference after compressed video: {error:.1e}; shifted positions "
          f"{shifted_error:.1e}; compressed vs uncompressed {compression_effect:.1e}; "
          f"cached {meta['cached_tokens']} of context {context_len}")
    assert error < TOLERANCE
    assert shifted_error > 100 * TOLERANCE


# ---------------------------------------------------------------------------------- 4. image+video
def test_image_and_video_spans_are_candidates_text_between_kept(server, clip, frames, picture, processor, model):
    server.flush_cache()
    image, image_url = picture
    text = user(IMAGE + "Compare this picture with the clip" + VIDEO + "Which is brighter?")
    out = ask(server, text, frames_path=clip, image_url=image_url)
    inputs = hf_inputs(processor, text, frames, image)
    ids = inputs["input_ids"]
    visual = visual_positions(model, ids).tolist()
    image_span = (ids[0] == model.config.image_token_id).nonzero().flatten().tolist()
    video_span = (ids[0] == model.config.video_token_id).nonzero().flatten().tolist()
    assert len(image_span) == 16 and len(video_span) == 32
    between = list(range(image_span[-1] + 1, video_span[0]))
    assert len(between) > 5  # "<|vision_end|>Compare ... clip<|vision_start|>"

    kept = server.kept_positions(out["meta_info"]["id"])
    assert kept["prompt_len"] == ids.shape[1]
    assert kept["candidate_positions"] == visual == image_span + video_span
    dropped = set(kept["dropped_positions"])
    assert dropped <= set(visual) and not dropped & set(between)
    assert len(dropped) == len(visual) - round(RETENTION * len(visual))
    report = out["meta_info"]["flashcache"][0]
    assert report["candidate_tokens"] == 48
    assert report["prompt_kv_slots"] == ids.shape[1] - len(dropped)
