"""CLIP pooled output and T5 hidden states equal transformers' on the same files and prompts."""

import json
import os
import re
import shutil
import subprocess
import sys

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


REFERENCE_CLASSES = {"clip": CLIPTokenizer, "t5": T5TokenizerFast}
FOLDERS = {"clip": "tokenizer", "t5": "tokenizer_2"}
# Other prompts than the ones a pipeline is checked on before it is cached (tokenizers.PROBES).
EDGE_PROMPTS = [
    *PROMPTS,
    "",
    "UPPER lower MiXeD, and numbers: 3.14159 / 1,000,000!",
    "multiple     spaces\n\nnew lines\tand tabs ",
    "émoji 🎨🖌️, àccents ÉÈÊ, Ελληνικά, 한국어",
    "a sign reading <|endoftext|> then </s> mid-prompt",
    " ".join(["a red fox in the snow"] * 80),
]


def expected_tokens(reference, prompt: str, length: int) -> tuple[np.ndarray, int]:
    """What FluxPipeline's tokenizer gives: the padded, truncated ids and the untruncated count."""
    ids = reference(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="np")
    return ids.input_ids, len(reference(prompt, truncation=False).input_ids)


@pytest.fixture
def tokenizer_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "flux1" / "tokenizers"


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_tokens_equal_the_pipeline_tokenizer_built_and_cached(folders, kind, tokenizer_cache):
    reference = REFERENCE_CLASSES[kind].from_pretrained(folders / FOLDERS[kind])
    built = PromptTokenizer(folders / FOLDERS[kind], kind, 77)  # builds the pipeline and caches it
    assert len(list(tokenizer_cache.glob(f"{kind}-*.json"))) == 1
    for length in (77, 256, 512):
        cached = PromptTokenizer(folders / FOLDERS[kind], kind, length)  # reads it
        for prompt in EDGE_PROMPTS:
            ids, count = expected_tokens(reference, prompt, length)
            for ours in (cached(prompt), built(prompt) if length == 77 else cached(prompt)):
                assert np.array_equal(ours.ids, ids) and ours.token_count == count
                assert ours.truncated == (count > length)


def test_a_cached_tokenizer_runs_without_transformers(folders, tmp_path):
    script = (
        "import sys\n"
        "from flux1.tokenizers import PromptTokenizer\n"
        f"clip = PromptTokenizer({str(folders / 'tokenizer')!r}, 'clip', 77)\n"
        f"t5 = PromptTokenizer({str(folders / 'tokenizer_2')!r}, 't5', 256)\n"
        "print(clip('a red fox').ids.tolist(), t5('a red fox').ids.tolist(), 'transformers' in sys.modules)\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    runs = [
        subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True) for _ in "ab"
    ]
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    first, second = (run.stdout.rsplit(" ", 1) for run in runs)
    assert first[1].strip() == "True" and second[1].strip() == "False"  # built with it, then read
    assert first[0] == second[0]


def test_a_corrupt_tokenizer_cache_is_rebuilt_with_a_warning(folders, tokenizer_cache):
    PromptTokenizer(folders / "tokenizer_2", "t5", 256)
    (entry,) = tokenizer_cache.glob("t5-*.json")
    for damage in ("{not json", json.dumps({"key": "another"}), entry.read_text()[:-500]):
        entry.write_text(damage)
        with pytest.warns(
            UserWarning, match=f"ignoring the tokenizer cache {re.escape(str(entry))} .*; building"
        ):
            tokenized = PromptTokenizer(folders / "tokenizer_2", "t5", 256)(PROMPTS[0])
        reference = T5TokenizerFast.from_pretrained(folders / "tokenizer_2")
        assert np.array_equal(tokenized.ids, expected_tokens(reference, PROMPTS[0], 256)[0])
        assert json.loads(entry.read_text())["pad_token"] == "<pad>"  # whole again


def test_changed_tokenizer_files_are_tokenized_anew(folders, tmp_path, tokenizer_cache):
    changed = tmp_path / "tokenizer"
    shutil.copytree(folders / "tokenizer", changed)
    before = PromptTokenizer(changed, "clip", 77)(PROMPTS[0]).ids
    merges = (changed / "merges.txt").read_text().splitlines()
    (changed / "merges.txt").write_text("\n".join(merges[:10]) + "\n")  # words split into more pieces
    after = PromptTokenizer(changed, "clip", 77)(PROMPTS[0]).ids
    assert not np.array_equal(after, before)
    assert np.array_equal(after, expected_tokens(CLIPTokenizer.from_pretrained(changed), PROMPTS[0], 77)[0])
    assert len(list(tokenizer_cache.glob("clip-*.json"))) == 2


def test_a_pipeline_that_splits_otherwise_is_not_cached(folders, tokenizer_cache, monkeypatch):
    from flux1 import tokenizers

    wrong = tokenizers._Pipeline.__call__
    monkeypatch.setattr(tokenizers._Pipeline, "__call__", lambda self, p, n: wrong(self, p + "!", n))
    with pytest.warns(UserWarning, match="tokenizer of .* is not cached: .* each run imports transformers"):
        tokenizer = PromptTokenizer(folders / "tokenizer", "clip", 77)
    assert not tokenizer_cache.exists()
    reference = CLIPTokenizer.from_pretrained(folders / "tokenizer")
    assert np.array_equal(tokenizer(PROMPTS[0]).ids, expected_tokens(reference, PROMPTS[0], 77)[0])


def test_an_unwritable_cache_warns_and_tokenizes(folders, unwritable_folder, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(unwritable_folder))
    with pytest.warns(UserWarning, match="could not cache the tokenizer in"):
        tokenized = PromptTokenizer(folders / "tokenizer", "clip", 77)(PROMPTS[1])
    reference = CLIPTokenizer.from_pretrained(folders / "tokenizer")
    assert np.array_equal(tokenized.ids, expected_tokens(reference, PROMPTS[1], 77)[0])


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
