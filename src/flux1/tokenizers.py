"""The prompt tokenizers of FLUX.1, called as diffusers' FluxPipeline calls them (padded to the
maximum length, truncated, no attention mask), reporting what truncation cut."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flux1.weights.safetensors_io import WeightFileError


@dataclass(frozen=True)
class TokenizedPrompt:
    ids: np.ndarray  # int32 [1, max_length]
    token_count: int  # tokens the whole prompt needs, special tokens included
    max_length: int

    @property
    def truncated(self) -> bool:
        return self.token_count > self.max_length


class PromptTokenizer:
    """`kind` "clip" reads `tokenizer/` (vocab.json + merges.txt); "t5" reads `tokenizer_2/`
    (tokenizer.json, or spiece.model)."""

    def __init__(self, folder: Path, kind: str, max_length: int):
        from transformers import CLIPTokenizer, T5TokenizerFast

        folder = Path(folder)
        if not folder.is_dir():
            raise WeightFileError(f"{folder}: tokenizer folder not found")
        self.kind, self.max_length = kind, max_length
        tokenizer_class = {"clip": CLIPTokenizer, "t5": T5TokenizerFast}[kind]
        try:
            self.tokenizer = tokenizer_class.from_pretrained(str(folder))
        except (OSError, ValueError, TypeError) as e:
            raise WeightFileError(f"{folder}: cannot load the {kind.upper()} tokenizer ({e})") from None

    def __call__(self, prompt: str) -> TokenizedPrompt:
        ids = self.tokenizer(
            prompt, padding="max_length", max_length=self.max_length, truncation=True
        ).input_ids
        token_count = len(self.tokenizer(prompt, truncation=False).input_ids)
        return TokenizedPrompt(np.array([ids], dtype=np.int32), token_count, self.max_length)

    def describe_truncation(self, tokenized: TokenizedPrompt, what: str = "prompt") -> str:
        return (
            f"the {what} has {tokenized.token_count} {self.kind.upper()} tokens; "
            f"only the first {tokenized.max_length} are used"
        )
