"""transformers' CLIP and T5 checkpoints: their names are the canonical names, but for a prefix and
the tied T5 embedding."""

from flux1.weights.safetensors_io import Tensors

# transformers 4 writes CLIP keys under `text_model.`; transformers 5 drops the prefix.
_CLIP_PREFIX = "text_model."
# Buffers some writers store that are recomputed here, not weights.
_CLIP_BUFFERS = ("embeddings.position_ids",)
# The real T5 files store the tied input embedding as `shared` and/or `encoder.embed_tokens`.
_T5_TIED = "encoder.embed_tokens.weight"


def from_transformers_clip(tensors: Tensors) -> Tensors:
    def rename(name: str) -> str | None:
        name = name.removeprefix(_CLIP_PREFIX)
        return None if name in _CLIP_BUFFERS else name

    return tensors.renamed(rename)


def from_transformers_t5(tensors: Tensors) -> Tensors:
    if _T5_TIED in tensors:
        array, origin = tensors.pop(_T5_TIED)
        if "shared.weight" not in tensors:
            tensors.add("shared.weight", array, origin)
    return tensors
