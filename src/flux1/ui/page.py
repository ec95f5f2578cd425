"""The Gradio page: settings and the generation modes' inputs on the left (those the chosen model's
kind takes), progress with a latent preview, the image, the gallery of everything made since start and
the records on the right. Generate is queued (one job at a time; Gradio shows each tab its place in the
queue); checks that need no model run at once, unqueued."""

from pathlib import Path

import gradio as gr

from flux1.metadata import read_record
from flux1.ui.engine import Engine, Progress, Saved
from flux1.ui.request import (
    NO_QUANTIZATION,
    QUANTIZATIONS,
    Source,
    build,
    default_strength,
    input_size,
    modes_line,
    page_message,
    takes,
)

GALLERY_COLUMNS = 8
SIZES = ["1024x1024", "1360x768", "768x1360", "1152x896", "896x1152", "768x768", "512x512"]
FREE_SIZE = "free size"
# Gradio's gallery widens its columns to fill the row when it holds fewer images than `columns`: keep
# them thumbnails, however few.
CSS = f"#gallery .grid-container {{--grid-cols: {GALLERY_COLUMNS} !important}}"


def _gallery(engine: Engine) -> list[tuple[str, str]]:
    return [(str(path), f"seed {record['seed']}: {record['prompt']}") for path, record in engine.gallery]


def _image_label(kind: str | None) -> str:
    if kind == "kontext":
        return "Reference image (Kontext)"
    if kind in ("canny", "depth"):
        return f"Control image ({kind}: an edge map or a depth map, used as given)"
    return "Input image (image to image; inpainting or Fill with a mask)"


def build_page(
    engine: Engine, sources: dict[str, Source], loras: list[Path], quantize: int | None
) -> gr.Blocks:
    with gr.Blocks(title="flux1", analytics_enabled=False) as page:
        gr.Markdown("## flux1: FLUX.1")
        first = next(iter(sources.values()))
        with gr.Row():
            with gr.Column(scale=2):
                # The generation fields, in the order build() takes them: a new mode is one more entry.
                fields = {
                    "prompt": gr.Textbox(label="Prompt", lines=3, elem_id="prompt"),
                    "model": gr.Dropdown(
                        list(sources), value=next(iter(sources)), label="Model", elem_id="model"
                    ),
                    "quantize": gr.Dropdown(
                        QUANTIZATIONS,
                        value=NO_QUANTIZATION if quantize is None else str(quantize),
                        label="Quantization (bits; changing it reloads the model)",
                        elem_id="quantize",
                    ),
                }
                kind_message = gr.Markdown(modes_line(first.kind), elem_id="modes")
                size = gr.Dropdown(SIZES + [FREE_SIZE], value=SIZES[0], label="Size", elem_id="size")
                with gr.Row():
                    fields["width"] = gr.Number(1024, label="Width", precision=0, step=16, elem_id="width")
                    fields["height"] = gr.Number(1024, label="Height", precision=0, step=16, elem_id="height")
                size_message = gr.Markdown(elem_id="size-message")
                with gr.Row():
                    fields["steps"] = gr.Number(
                        0, label="Steps (0: the model's default)", precision=0, elem_id="steps"
                    )
                    fields["guidance"] = gr.Number(
                        0, label="Guidance (0: the model's; schnell has none)", elem_id="guidance"
                    )
                with gr.Row():
                    fields["seed"] = gr.Number(-1, label="Seed (-1: random)", precision=0, elem_id="seed")
                    fields["batch"] = gr.Number(1, label="Batch count", precision=0, elem_id="batch")
                    fields["batch_size"] = gr.Number(
                        1, label="Batch size (images at a time)", precision=0, elem_id="batch-size"
                    )
                with gr.Accordion("LoRAs (scale 0: off)", open=bool(loras)):
                    sliders = [
                        gr.Slider(-2, 2, value=0, step=0.05, label=path.name, elem_id=f"lora-{i}")
                        for i, path in enumerate(loras)
                    ]
                with gr.Accordion("Negative prompt, input image, mask", open=True):
                    with gr.Row():
                        fields["negative_prompt"] = gr.Textbox(
                            label="Negative prompt", lines=1, scale=3, elem_id="negative-prompt"
                        )
                        fields["true_cfg_scale"] = gr.Number(
                            1.0, label="True CFG scale (above 1: used)", scale=1, elem_id="true-cfg"
                        )
                    with gr.Row():
                        fields["image"] = gr.File(
                            label=_image_label(first.kind),
                            file_types=["image"],
                            type="filepath",
                            height=120,
                            elem_id="init-image",
                        )
                        fields["mask"] = gr.File(
                            label="Mask (white = repaint), or draw it below",
                            file_types=["image"],
                            type="filepath",
                            height=120,
                            visible=takes(first.kind, "mask"),
                            elem_id="mask",
                        )
                    fields["image_strength"] = gr.Slider(
                        0,
                        1,
                        value=default_strength(first.kind),
                        step=0.05,
                        label="Image strength: how much of the input image is kept",
                        visible=takes(first.kind, "strength"),
                        elem_id="strength",
                    )
                    fields["editor"] = gr.ImageEditor(
                        label="Draw the mask on the input image (white = repaint)",
                        type="numpy",
                        sources=(),
                        layers=False,
                        transforms=(),
                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=8),
                        format="png",
                        height=300,
                        visible=takes(first.kind, "mask"),
                        elem_id="editor",
                    )
                    fields["canny"] = gr.Checkbox(
                        False,
                        label="Canny edges of the input image as the control image (FLUX.1 Canny)",
                        visible=takes(first.kind, "canny"),
                        elem_id="canny",
                    )
                fields["vae_tiling"] = gr.Checkbox(
                    False,
                    label="VAE tiling: decode (and encode) in 1024-pixel tiles, for large images in less memory",
                    elem_id="vae-tiling",
                )
                settings = gr.File(
                    label="Drop a flux1 PNG (or its JSON) to load its settings",
                    file_types=[".png", ".json"],
                    type="filepath",
                    elem_id="settings",
                )
            with gr.Column(scale=3):
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("Cancel", elem_id="cancel")
                status = gr.Markdown(elem_id="status")
                image = gr.Image(label="Image", format="png", interactive=False, height=360, elem_id="image")
                gallery = gr.Gallery(
                    label="Made since start (select one for its record)",
                    format="png",
                    columns=GALLERY_COLUMNS,
                    height=160,
                    preview=False,
                    elem_id="gallery",
                )
                record = gr.JSON(label="Generation record", elem_id="record")

        def pick_model(label):
            kind = sources[label].kind
            return {
                kind_message: modes_line(kind),
                fields["image"]: gr.update(label=_image_label(kind)),
                fields["mask"]: gr.update(visible=takes(kind, "mask")),
                fields["editor"]: gr.update(visible=takes(kind, "mask")),
                fields["canny"]: gr.update(visible=takes(kind, "canny")),
                fields["image_strength"]: gr.update(
                    visible=takes(kind, "strength"), value=default_strength(kind)
                ),
            }

        def take_image(path, label):
            """The size main.py would give without --height/--width, and the image to draw the mask on."""
            if path is None:
                return {fields["editor"]: None, status: ""}
            try:
                height, width = input_size(sources[label].kind, path)
            except ValueError as e:
                return {fields["editor"]: None, status: f"Error: {page_message(e, (path,))}"}
            return {
                fields["width"]: width,
                fields["height"]: height,
                size: FREE_SIZE,
                fields["editor"]: {"background": path, "layers": [], "composite": path},
                status: f"Input image {Path(path).name}: {width}x{height} (width x height)",
            }

        def generate_images(request: gr.Request, *values):
            named = dict(zip(fields, values[: len(fields)]))
            chosen = dict(zip(loras, values[len(fields) :]))
            try:
                job = build(sources, **named, loras=chosen)
            except ValueError as e:
                yield {status: f"Error: {page_message(e)}"}
                return
            for event in engine.run(job, request.session_hash):
                if isinstance(event, Progress):
                    yield {
                        status: event.message,
                        **({image: event.preview} if event.preview is not None else {}),
                    }
                elif isinstance(event, Saved):
                    yield {
                        status: event.message,
                        image: str(event.path),
                        gallery: _gallery(engine),
                        record: event.record,
                    }
                else:
                    yield {status: event.message}

        def check_size(width, height):
            preset = f"{width}x{height}"
            try:
                build(sources, "-", next(iter(sources)), NO_QUANTIZATION, width, height, 0, 0.0, 0, 1, {})
            except ValueError as e:
                return {size_message: f"Error: {e}", size: FREE_SIZE}
            return {size_message: "", size: preset if preset in SIZES else FREE_SIZE}

        def load_settings(path):
            if path is None:
                return {}
            try:
                found = read_record(Path(path))
                updates = {
                    fields["prompt"]: found["prompt"],
                    fields["width"]: found["width"],
                    fields["height"]: found["height"],
                    fields["steps"]: found["steps"],
                    fields["seed"]: found["seed"],
                    fields["quantize"]: str(found["quantize"]) if found.get("quantize") else NO_QUANTIZATION,
                    fields["negative_prompt"]: found.get("negative_prompt") or "",
                    fields["true_cfg_scale"]: found.get("true_cfg_scale", 1.0),
                    fields["canny"]: found.get("canny") is True,
                    fields["vae_tiling"]: found.get("vae_tiling") is True,
                    size: FREE_SIZE,
                }
            except (ValueError, KeyError, TypeError) as e:
                reason = str(e).split(f"{path}: ", 1)[-1] if isinstance(e, ValueError) else f"no {e} in it"
                return {status: f"Error: cannot load settings from {Path(path).name}: {reason}"}
            for key in ("guidance", "image_strength"):
                if found.get(key) is not None:
                    updates[fields[key]] = found[key]
            if found.get("model") in sources:
                updates[fields["model"]] = found["model"]
            return {**updates, status: f"Loaded the settings of {Path(path).name} (seed {found['seed']})"}

        def pick_size(choice):
            if choice == FREE_SIZE:
                return {fields["width"]: gr.update(), fields["height"]: gr.update()}
            width, height = (int(v) for v in choice.split("x"))
            return {fields["width"]: width, fields["height"]: height}

        def show_record(event: gr.SelectData):
            return engine.gallery[event.index][1]

        def arm(request: gr.Request):
            engine.arm(request.session_hash)

        def stop(request: gr.Request):
            engine.cancel(request.session_hash)

        run = generate.click(arm, None, None, queue=False)
        run.then(
            generate_images,
            list(fields.values()) + sliders,
            [status, image, gallery, record],
            api_name="generate",
        )
        cancel.click(stop, None, None, queue=False)
        for side in (fields["width"], fields["height"]):
            side.change(check_size, [fields["width"], fields["height"]], [size_message, size], queue=False)
        size.change(pick_size, size, [fields["width"], fields["height"]], queue=False)
        settings.upload(load_settings, settings, [*fields.values(), size, status], queue=False)
        fields["model"].change(
            pick_model,
            fields["model"],
            [
                kind_message,
                *(fields[name] for name in ("image", "mask", "editor", "canny", "image_strength")),
            ],
            queue=False,
        )
        fields["image"].change(
            take_image,
            [fields["image"], fields["model"]],
            [fields["width"], fields["height"], size, fields["editor"], status],
            queue=False,
        )
        gallery.select(show_record, None, record, queue=False)
        page.load(lambda: _gallery(engine), None, gallery, queue=False)
    return page
