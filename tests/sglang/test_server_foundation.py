"""SGLang 0.5.23 really serves on CPU: real weights, radix reuse, tiny Qwen2.5-VL image/video."""

from __future__ import annotations

import base64
import io
import subprocess

import pytest
import torch

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

PROMPT = "The capital of France is Paris. The capital of Germany is"


def transformers_greedy(model_dir, input_ids: list[int], max_new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([input_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(input_ids):].tolist()


@pytest.fixture(scope="module")
def smollm2_server(server_factory, smollm2_dir):
    return server_factory(smollm2_dir)


def test_smollm2_greedy_matches_transformers(smollm2_server, smollm2_dir):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm2_dir)(PROMPT)["input_ids"]
    served = smollm2_server.generate(input_ids=ids, max_new_tokens=12)
    expected = transformers_greedy(smollm2_dir, ids, 12)
    assert served["output_ids"] == expected, (served["text"], expected)


def test_shared_prefix_is_served_from_radix_cache(smollm2_server):
    context = open("/usr/share/common-licenses/GPL-3").read()[:1500]
    first = smollm2_server.generate(context + "\nQuestion: what is this?", max_new_tokens=2)
    second = smollm2_server.generate(context + "\nQuestion: who wrote it?", max_new_tokens=2)
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] > 0.8 * first["meta_info"]["prompt_tokens"]


@pytest.fixture(scope="module")
def vl_server(server_factory, tiny_vl_dir):
    return server_factory(tiny_vl_dir, extra_args=["--enable-multimodal"], max_total_tokens=8192)


def _png_data_url(color) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (112, 112), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def test_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=4",
                    "-t", "2", "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


VISION = "<|vision_start|>{}<|vision_end|>"


def test_tiny_vl_answers_an_image(vl_server):
    text = f"<|im_start|>user\n{VISION.format('<|image_pad|>')}What is this?<|im_end|>\n<|im_start|>assistant\n"
    out = vl_server.generate(text, image_data=_png_data_url("red"), max_new_tokens=4)
    assert out["meta_info"]["completion_tokens"] == 4
    # 112x112 pixels = 8x8 patches of 14, merged 2x2: the one pad token becomes 16 image tokens.
    assert out["meta_info"]["prompt_tokens"] >= 15 + 16


def test_tiny_vl_video_prefix_is_reused(vl_server, test_video):
    def ask(question):
        text = (f"<|im_start|>user\n{VISION.format('<|video_pad|>')}{question}<|im_end|>\n"
                "<|im_start|>assistant\n")
        return vl_server.generate(text, video_data=str(test_video), max_new_tokens=3)

    first = ask("What happens?")
    second = ask("Which colours?")
    assert first["meta_info"]["prompt_tokens"] > 20
    assert second["meta_info"]["cached_tokens"] >= first["meta_info"]["prompt_tokens"] - 12
