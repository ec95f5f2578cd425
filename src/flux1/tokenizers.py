"""The prompt tokenizers of FLUX.1, called as diffusers' FluxPipeline calls them (padded to the
maximum length, truncated, no attention mask), reporting what truncation cut.

transformers builds them (`CLIPTokenizer` from vocab.json + merges.txt, `T5TokenizerFast` from
tokenizer.json or spiece.model: the pipeline's own classes), but importing transformers takes about
2 s of every run. What it builds is a `tokenizers` pipeline, so that pipeline is kept as JSON in
flux1's cache folder (`tokenizers/`, keyed by the SHA-256 of every file of the tokenizer folder and
both libraries' versions) and later runs read only that. An entry is written only after it tokenized
the PROBES exactly as transformers did; one that does not parse is rebuilt, with a warning.
"""

import hashlib
import json
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from flux1 import user_cache
from flux1.metadata import write_json
from flux1.weights.safetensors_io import WeightFileError

FORMAT = 1
# What a cached pipeline must tokenize as transformers does, at every PROBE_LENGTHS: case,
# punctuation, digits, runs of white space, accents and other scripts, the special tokens' text, and
# more words than any window holds.
PROBES = (
    "A cat holding a sign that says hello world",
    "  Mixed CASE,   punctuation!? digits 0123456789\ttabs\nand newlines  ",
    "café naïve Ærøskøbing, “quotes” and 東京 🦊",
    "<|startoftext|> <|endoftext|> </s> <pad> <unk> <extra_id_0>",
    " ".join(["golden light"] * 300),
)
PROBE_LENGTHS = (16, 77, 512)


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
        folder = Path(folder)
        if not folder.is_dir():
            raise WeightFileError(f"{folder}: tokenizer folder not found")
        self.kind, self.max_length = kind, max_length
        self._encode = _cached_pipeline(folder, kind)

    def __call__(self, prompt: str) -> TokenizedPrompt:
        ids, token_count = self._encode(prompt, self.max_length)
        return TokenizedPrompt(np.array([ids], dtype=np.int32), token_count, self.max_length)

    def describe_truncation(self, tokenized: TokenizedPrompt, what: str = "prompt") -> str:
        return (
            f"the {what} has {tokenized.token_count} {self.kind.upper()} tokens; "
            f"only the first {tokenized.max_length} are used"
        )


class _Pipeline:
    """A `tokenizers` pipeline as transformers built it, called as transformers calls it: the
    words truncated to leave room for the special tokens, the special tokens added, then padding."""

    def __init__(self, entry: dict):
        self.tokenizer = Tokenizer.from_str(entry["pipeline"])
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.tokenizer.encode_special_tokens = entry["split_special_tokens"]
        self.pad_id, self.pad_token = entry["pad_id"], entry["pad_token"]
        if not (isinstance(self.pad_id, int) and isinstance(self.pad_token, str)):
            raise ValueError("no padding token")

    def __call__(self, prompt: str, max_length: int) -> tuple[list[int], int]:
        words = self.tokenizer.encode(prompt, add_special_tokens=False)
        specials = self.tokenizer.num_special_tokens_to_add(False)
        token_count = len(words.ids) + specials
        words.truncate(max_length - specials)
        encoding = self.tokenizer.post_process(words)
        encoding.pad(max_length, pad_id=self.pad_id, pad_token=self.pad_token)
        return encoding.ids, token_count


def _transformers_tokenizer(folder: Path, kind: str):
    from transformers import CLIPTokenizer, T5TokenizerFast

    tokenizer_class = {"clip": CLIPTokenizer, "t5": T5TokenizerFast}[kind]
    try:
        tokenizer = tokenizer_class.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise WeightFileError(f"{folder}: cannot load the {kind.upper()} tokenizer ({e})") from None

    def encode(prompt: str, max_length: int) -> tuple[list[int], int]:
        ids = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True).input_ids
        return ids, len(tokenizer(prompt, truncation=False).input_ids)

    entry = {
        "pipeline": tokenizer.backend_tokenizer.to_str(),
        "pad_id": tokenizer.pad_token_id,
        "pad_token": tokenizer.pad_token,
        "split_special_tokens": bool(tokenizer.split_special_tokens),
    }
    return encode, entry


def _key(folder: Path, kind: str) -> dict:
    files = sorted(path for path in folder.iterdir() if path.is_file())
    return {
        "format": FORMAT,
        "kind": kind,
        "files": {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in files},
        "transformers": version("transformers"),
        "tokenizers": version("tokenizers"),
    }


def _cached_pipeline(folder: Path, kind: str):
    """The tokenizer of `folder` as a function (prompt, max_length) -> (padded ids, token count):
    the cached pipeline, or transformers' tokenizer (and its pipeline cached if it agrees)."""
    key = _key(folder, kind)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    file = user_cache.folder() / "tokenizers" / f"{kind}-{digest[:32]}.json"
    try:
        entry = json.loads(file.read_text())
        if entry.get("key") != key:
            raise ValueError("made from other files")
        return _Pipeline(entry)
    except FileNotFoundError:
        pass
    except Exception as error:  # unreadable, not JSON, not an entry, or a pipeline tokenizers rejects
        warnings.warn(
            f"flux1: ignoring the tokenizer cache {file} ({error}); building it again", stacklevel=3
        )
    encode, entry = _transformers_tokenizer(folder, kind)
    pipeline = _Pipeline(entry)
    if not _agree(pipeline, encode):
        warnings.warn(
            f"flux1: the {kind.upper()} tokenizer of {folder} is not cached: its tokenizers pipeline "
            f"splits prompts otherwise than transformers {key['transformers']} does; each run imports "
            "transformers",
            stacklevel=3,
        )
        return encode
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        write_json({"key": key, **entry}, file)
    except OSError as error:
        warnings.warn(f"flux1: could not cache the tokenizer in {file}: {error}", stacklevel=3)
    return pipeline


def _agree(pipeline: _Pipeline, encode) -> bool:
    """Whether the pipeline tokenizes every probe as transformers does (whose warning that the long
    probe exceeds the model's window is silenced: the probe is long on purpose)."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        probes = [(prompt, length) for prompt in PROBES for length in PROBE_LENGTHS]
        return all(pipeline(*probe) == encode(*probe) for probe in probes)
    finally:
        logging.set_verbosity(verbosity)
