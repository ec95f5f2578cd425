"""CLIP pooled output and T5 hidden states equal transformers' on the same files and prompts."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from tests.conftest import relative_error
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from flux1.fixtures import text_encoders as fixture
from flux1.fixtures.presets import configs
from flux1.loaders.text_encoders import load_clip, load_t5
from flux1.tokenizers import PromptTokenizer

# fp32 on both sides: only summation order differs (measured 4e-7 CLIP, 2e-6 T5).
TOLERANCE = 1e-4
PROMPTS = [
    "A cat holding a sign that says hello world",
    "mountains above the clouds at sunrise, golden light",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    cfg = configs("tiny", "schnell")
    fixture.write_clip(root / "text_encoder", cfg["text_encoder"], "float32", seed=5)
    fixture.write_clip_tokenizer(root / "tokenizer", cfg["text_encoder"]["vocab_size"])
    fixture.write_t5(root / "text_encoder_2", cfg["text_encoder_2"], "float32", seed=5)
    fixture.write_t5_tokenizer(root / "tokenizer_2", cfg["text_encoder_2"]["vocab_size"], 256)
    return root


def _assert_clean(info):
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_clip_pooled_output_equals_transformers(folders, compute_path):
    reference, info = CLIPTextModel.from_pretrained(
        folders / "text_encoder", output_loading_info=True, dtype=torch.float32
    )
    _assert_clean(info)
    tokenizer = PromptTokenizer(folders / "tokenizer", "clip", 77)
    model = load_clip(folders / "text_encoder")
    ids = np.concatenate([tokenizer(p).ids for p in PROMPTS])
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids).long()).pooler_output.numpy()
    assert relative_error(model(mx.array(ids)), expected) < TOLERANCE


@pytest.mark.parametrize("length", [256, 12])
def test_t5_hidden_states_equal_transformers(folders, length, compute_path):
    reference, info = T5EncoderModel.from_pretrained(
        folders / "text_encoder_2", output_loading_info=True, dtype=torch.float32
    )
    _assert_clean(info)
    tokenizer = PromptTokenizer(folders / "tokenizer_2", "t5", length)
    model = load_t5(folders / "text_encoder_2")
    ids = np.concatenate([tokenizer(p).ids for p in PROMPTS])
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert relative_error(model(mx.array(ids)), expected) < TOLERANCE


@pytest.mark.parametrize(
    ("kind", "folder", "length", "reference_class"),
    [
        ("clip", "tokenizer", 77, CLIPTokenizer),
        ("t5", "tokenizer_2", 256, T5TokenizerFast),
    ],
)
def test_tokens_equal_the_pipeline_tokenizer(folders, kind, folder, length, reference_class):
    reference = reference_class.from_pretrained(folders / folder)
    ours = PromptTokenizer(folders / folder, kind, length)
    for prompt in PROMPTS:
        expected = reference(
            prompt, padding="max_length", max_length=length, truncation=True, return_tensors="np"
        ).input_ids
        tokenized = ours(prompt)
        assert np.array_equal(tokenized.ids, expected) and not tokenized.truncated


def test_long_prompt_is_truncated_and_reported(folders):
    tokenizer = PromptTokenizer(folders / "tokenizer", "clip", 77)
    words = int((tokenizer("golden light").ids[0] < 998).sum())
    tokenized = tokenizer(" ".join(["golden light"] * 60))
    assert tokenized.truncated and tokenized.token_count == 60 * words + 2
    assert tokenized.ids.shape == (1, 77) and tokenized.ids[0, -1] == 999  # end-of-text kept last
    assert (
        tokenizer.describe_truncation(tokenized)
        == f"the prompt has {60 * words + 2} CLIP tokens; only the first 77 are used"
    )


def test_clip_file_without_text_model_prefix_loads_the_same(folders, tmp_path):
    tensors = mx.load(str(folders / "text_encoder" / "model.safetensors"))
    (tmp_path / "config.json").write_bytes((folders / "text_encoder" / "config.json").read_bytes())
    mx.save_safetensors(
        str(tmp_path / "model.safetensors"), {k.removeprefix("text_model."): v for k, v in tensors.items()}
    )
    ids = mx.array(PromptTokenizer(folders / "tokenizer", "clip", 77)(PROMPTS[0]).ids)
    assert np.array_equal(
        np.array(load_clip(tmp_path)(ids)), np.array(load_clip(folders / "text_encoder")(ids))
    )
