"""flux1-ui / python -m flux1.ui: serve the page on this machine (loopback unless --auth is given)."""

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from flux1.backend import PRECISIONS
from flux1.configs import BASE_MODELS, REPOS
from flux1.quantize import BITS, GROUP_SIZES

LOOPBACK = ("localhost",)
LORA_SUFFIXES = (".safetensors",)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flux1-ui",
        description="A local web page for FLUX.1 (schnell, dev, Fill, Kontext, Canny, Depth).",
    )
    p.add_argument(
        "--model",
        "-m",
        nargs="+",
        default=[],
        help="schnell, dev, fill, kontext, canny, depth or hub repo ids (one or more)",
    )
    p.add_argument("--path", nargs="+", default=[], help="local model folders or BFL files (one or more)")
    p.add_argument("--gguf", help="a GGUF transformer for the (single) model given")
    p.add_argument("--base-model", choices=BASE_MODELS, help="which model --path is, when it cannot tell")
    p.add_argument(
        "--quantize", "-q", type=int, choices=BITS, help="initial quantization (the page changes it)"
    )
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64, help="quantization group size")
    p.add_argument("--lora-dir", help="a folder of LoRA .safetensors files offered in the page")
    p.add_argument("--lora-lenient", action="store_true", help="report LoRA keys that match no layer")
    p.add_argument(
        "--low-ram", action="store_true", help="load each network just before use, release it after"
    )
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="activation dtype, as main.py")
    p.add_argument(
        "--output-dir", default="outputs", help="where images go (main.py's naming, never overwritten)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--auth", help="USER:PASS, required to bind anything but loopback")
    p.add_argument("--max-upload", default="20mb", help="largest upload accepted (default 20mb)")
    return p


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_access(host: str, auth: str | None) -> tuple[str, str] | None:
    """(user, password) from --auth; binding beyond loopback without it is refused."""
    if auth is None:
        if not is_loopback(host):
            raise ValueError(
                f"--host {host}: serving beyond this machine requires --auth USER:PASS "
                "(anyone who reaches the port could run the model and read the outputs)"
            )
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth: expected USER:PASS")
    return user, password


def lora_files(folder: str | None) -> list[Path]:
    if folder is None:
        return []
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--lora-dir {root}: folder not found")
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix in LORA_SUFFIXES)


def sources(args: argparse.Namespace) -> dict:
    """The models the page offers, each with its kind: a local one's is read from its files now (a
    broken path stops here), a hub alias names its own, a hub repo id's is known once loaded."""
    from flux1.model_files import resolve
    from flux1.ui.request import Source

    if args.gguf and len(args.model) + len(args.path) > 1:
        raise ValueError("--gguf: give a single --model or --path with it")
    common = dict(gguf=args.gguf, base_model=args.base_model)
    found = {
        m: Source(m, model=m, **common, kind=args.base_model or (m if m in REPOS else None))
        for m in args.model
    }
    found |= {p: Source(p, path=p, **common, kind=resolve(path=p, **common).base_model) for p in args.path}
    if not found:
        raise ValueError("--model or --path is required (one or more)")
    return found


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    credentials = check_access(args.host, args.auth)
    models, loras = sources(args), lora_files(args.lora_dir)
    output = Path(args.output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    # Gradio's uploads and served copies go under the output folder, nowhere else; nothing phones home.
    os.environ["GRADIO_TEMP_DIR"] = str(output / ".gradio")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from flux1.ui.engine import Engine
    from flux1.ui.page import CSS, build_page

    engine = Engine(
        output,
        group_size=args.group_size,
        low_ram=args.low_ram,
        precision=args.precision,
        lora_strict=not args.lora_lenient,
    )
    page = build_page(engine, models, loras, args.quantize)
    page.queue(default_concurrency_limit=1, max_size=64)
    if credentials:
        print(f"flux1-ui: serving on {args.host}:{args.port} beyond this machine, behind --auth", flush=True)
    page.launch(
        server_name=args.host,
        server_port=args.port,
        auth=credentials,
        max_file_size=args.max_upload,
        share=False,
        ssr_mode=False,
        footer_links=[],
        allowed_paths=[str(output)],
        show_error=True,
        css=CSS,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="flux1: %(message)s", level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own requests to itself
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
