"""Which files make a model: a hub alias (downloaded into the standard Hugging Face cache), a local
diffusers or flux1-saved folder, or a BFL single-file transformer."""

import json
from dataclasses import dataclass, replace
from pathlib import Path

from flux1.configs import CONTROL_IN_CHANNELS, CONTROL_KINDS, FILL_IN_CHANNELS, PIPELINE_CLASSES, REPOS

COMPONENTS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae")
# The diffusers layout only: the repos also hold the BFL single files (another 34 GB).
DOWNLOAD_PATTERNS = ["model_index.json", *(f"{c}/*" for c in COMPONENTS)]


class ModelFilesError(ValueError):
    """A model that cannot be found, downloaded or recognised; says which and what was expected."""


@dataclass(frozen=True)
class ModelFiles:
    root: Path  # scheduler/, text_encoder(_2)/, tokenizer(_2)/ live here
    transformer: Path  # a transformer/ folder or a single .safetensors file
    vae: Path  # a vae/ folder or a BFL ae.safetensors
    base_model: str  # the kind: "schnell", "dev", "fill", "kontext", "canny" or "depth"
    name: str  # what the user named: an alias, a repo id or a path

    @property
    def transformer_format(self) -> str:
        """ "gguf", "single_file" (BFL/ComfyUI .safetensors), "saved" (a flux1 save) or "diffusers"."""
        from flux1.weights import saved

        if self.transformer.suffix == ".gguf":
            return "gguf"
        if self.transformer.is_file():
            return "single_file"
        return "saved" if saved.is_saved(self.transformer) else "diffusers"

    def scheduler_config(self) -> dict:
        from flux1.configs import check_scheduler_config
        from flux1.weights.safetensors_io import read_config

        folder = self.root / "scheduler"
        return check_scheduler_config(
            read_config(folder, "scheduler_config.json"), folder / "scheduler_config.json"
        )

    def check(self) -> None:
        """Open and check every component's config and the tokenizers' files, so a broken file is
        named before the first network runs rather than after minutes of work."""
        from flux1.configs import check_config
        from flux1.weights.safetensors_io import read_config

        self.scheduler_config()
        for component in ("text_encoder", "text_encoder_2"):
            check_config(component, read_config(self.root / component), self.root / component / "config.json")
        if self.transformer_format in ("diffusers", "saved"):
            check_config("transformer", read_config(self.transformer), self.transformer / "config.json")
        if self.vae.is_dir():
            check_config("vae", read_config(self.vae), self.vae / "config.json")
        for folder, needed in (
            ("tokenizer", ("vocab.json", "merges.txt")),
            ("tokenizer_2", ("spiece.model", "tokenizer.json")),
        ):
            if not any((self.root / folder / name).is_file() for name in needed):
                raise ModelFilesError(f"{self.root / folder}: no tokenizer files ({' or '.join(needed)})")


def download(repo_id: str) -> Path:
    """The diffusers-layout files of a hub repo, from the cache or downloaded (HF_HOME and
    HF_HUB_OFFLINE respected)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS))
    except GatedRepoError:
        raise ModelFilesError(
            f"{repo_id} is gated: accept its license at https://huggingface.co/{repo_id}, then log in with "
            "`hf auth login` (or set HF_TOKEN) and run again"
        ) from None
    except RepositoryNotFoundError:
        raise ModelFilesError(
            f"{repo_id}: no such repository on the Hugging Face hub (or no access)"
        ) from None
    except LocalEntryNotFoundError:
        raise ModelFilesError(
            f"{repo_id} is not in the Hugging Face cache and cannot be downloaded (offline?): "
            "connect once, or pass --path to a local copy"
        ) from None


def _check_folder(root: Path, components=COMPONENTS) -> None:
    missing = [c for c in components if not (root / c).is_dir()]
    if missing:
        raise ModelFilesError(
            f"{root}: missing component folder(s) {', '.join(f'{m}/' for m in missing)} "
            f"(expected the diffusers layout: {', '.join(COMPONENTS)})"
        )


def _kind_of(
    transformer_config: dict, given: str | None, source: Path, pipeline_class: str | None = None
) -> str:
    """The model kind from the transformer's config (Fill reads 384 input channels, Canny and Depth
    128, schnell has no guidance embedding) and, for a folder, model_index.json's pipeline class
    (Kontext has the dev architecture: only its class, or --base-model for a single file, tells it
    apart; Canny and Depth have the same shapes and class: only `given` tells them apart)."""
    channels = transformer_config.get("in_channels", 64)
    if channels == FILL_IN_CHANNELS:
        inferred = "fill"
    elif channels == CONTROL_IN_CHANNELS:
        if given not in CONTROL_KINDS:
            raise ModelFilesError(
                (f"--base-model {given}, but {source} is" if given else f"{source}:")
                + f" a FLUX.1 Canny or Depth transformer (in_channels {channels}; the two have the same "
                "shapes): say which with --base-model canny or --base-model depth"
            )
        inferred = given
    elif not transformer_config.get("guidance_embeds"):
        inferred = "schnell"
    elif pipeline_class == PIPELINE_CLASSES["kontext"] or (pipeline_class is None and given == "kontext"):
        inferred = "kontext"
    else:
        inferred = "dev"
    if pipeline_class is not None and pipeline_class != PIPELINE_CLASSES[inferred]:
        raise ModelFilesError(
            f"{source}: model_index.json names {pipeline_class}, but the transformer is a FLUX.1-{inferred} "
            f"transformer (in_channels {transformer_config.get('in_channels', 64)})"
        )
    if given and given != inferred:
        raise ModelFilesError(f"--base-model {given}, but {source} is a FLUX.1-{inferred} transformer")
    return inferred


def _single_file_config(names_and_shapes: dict) -> dict:
    img_in = next((shape for name, shape in names_and_shapes.items() if name.endswith("img_in.weight")), None)
    return {
        "guidance_embeds": any(n.endswith("guidance_in.in_layer.weight") for n in names_and_shapes),
        "in_channels": img_in[1] if img_in else 64,
    }


def resolve(
    model: str | None = None,
    path: str | Path | None = None,
    base_model: str | None = None,
    gguf: str | Path | None = None,
) -> ModelFiles:
    """--model alias or repo id, and/or --path (a folder or a BFL single file); --base-model says
    which model a local file is when it cannot tell. --gguf replaces the transformer by a GGUF file,
    the other components coming from --path, --model or the GGUF's base model on the hub."""
    if gguf is not None:
        return _with_gguf(Path(gguf).expanduser().absolute(), model, path, base_model)
    for flag, value in (("--model", model), ("--base-model", base_model)):
        if value is not None and value not in REPOS and (flag == "--base-model" or "/" not in value):
            raise ModelFilesError(
                f"unknown {flag} '{value}': expected {', '.join(REPOS)}"
                + (" (or a Hugging Face repo id)" if flag == "--model" else "")
            )
    if path is None:
        if model is None:
            raise ModelFilesError("say which model: --model schnell|dev, or --path a local folder or file")
        root = download(REPOS.get(model, model))
        kind_of_repo = {repo: kind for kind, repo in REPOS.items()}
        return _folder(root, base_model or (model if model in REPOS else kind_of_repo.get(model)), model)
    path = Path(path).expanduser().absolute()  # the record names it from anywhere
    if path.is_dir():
        return _folder(path, base_model or model, str(path))
    if path.is_file():
        return _single_file(path, base_model or model)
    raise ModelFilesError(f"--path {path}: no such file or folder")


def _folder(root: Path, base_model: str | None, name: str) -> ModelFiles:
    if not (root / "model_index.json").is_file():
        raise ModelFilesError(
            f"{root}: no model_index.json, so not a complete model folder (diffusers layout, or a save.py "
            "folder; an interrupted save leaves none)"
        )
    _check_folder(root)
    config_file = root / "transformer" / "config.json"
    if not config_file.is_file():
        raise ModelFilesError(f"{config_file}: file not found")
    index = json.loads((root / "model_index.json").read_text())
    pipeline_class = index.get("_class_name")
    if pipeline_class not in PIPELINE_CLASSES.values():
        raise ModelFilesError(
            f"{root / 'model_index.json'}: _class_name {pipeline_class!r}, expected one of "
            f"{', '.join(sorted(set(PIPELINE_CLASSES.values())))}"
        )
    saved = index.get("flux1")  # a save.py folder records its kind (Canny and Depth look alike)
    recorded = saved.get("base_model") if isinstance(saved, dict) else None
    given = base_model or (recorded if recorded in REPOS else None)
    base = _kind_of(json.loads(config_file.read_text()), given, root / "transformer", pipeline_class)
    return ModelFiles(root, root / "transformer", root / "vae", base, name)


def _single_file(file: Path, base_model: str | None) -> ModelFiles:
    """A BFL transformer file; the text encoders, tokenizers and scheduler come from the base model's
    hub repo, the VAE from `ae.safetensors` beside the file if there is one."""
    from flux1.weights.safetensors_io import read_header

    header, _ = read_header(file)
    shapes = {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
    base = _kind_of(_single_file_config(shapes), base_model, file)
    root = download(REPOS[base])
    ae = file.parent / "ae.safetensors"
    return ModelFiles(root, file, ae if ae.is_file() else root / "vae", base, str(file))


def _with_gguf(file: Path, model: str | None, path: str | Path | None, base_model: str | None) -> ModelFiles:
    from gguf import GGUFReader

    if not file.is_file():
        raise ModelFilesError(f"--gguf {file}: file not found")
    try:
        # GGUF stores shapes innermost first
        shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in GGUFReader(file).tensors}
    except Exception as e:
        raise ModelFilesError(f"--gguf {file}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    config = _single_file_config(shapes)
    others = resolve(model=model, path=path, base_model=base_model) if model or path else None
    given = base_model
    if given is None and others is not None and config["in_channels"] == CONTROL_IN_CHANNELS:
        given = others.base_model  # Canny or Depth: the other components say which
    inferred = _kind_of(config, given, file)
    others = others or resolve(model=inferred, base_model=base_model)
    if inferred == "dev" and others.base_model == "kontext" and base_model is None:
        inferred = "kontext"  # Kontext has dev's shapes: the other components tell them apart
    if others.base_model != inferred:
        raise ModelFilesError(
            f"--gguf {file} is a FLUX.1-{inferred} transformer, but the other components are {others.base_model}"
        )
    return replace(others, transformer=file)
