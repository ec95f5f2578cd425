"""flux1-ui in a real browser: the real server (`python -m flux1.ui`, a subprocess on loopback) serving
the tiny fixture, driven by headless Chromium through Selenium; the load test through gradio_client.
Images are 32x32 to 64x64 with 1-2 steps, so the module adds about two minutes."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from flux1.cli.generate import main as generate_main
from flux1.configs import GUIDANCE
from flux1.metadata import read_record

pytest.importorskip("gradio", reason="the UI extra is not installed (pip install .[ui])")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
)
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("FLUX1_TEST_ARTIFACTS", ROOT / "test-artifacts"))
WAIT = 180  # seconds, the bound of every wait (a loaded 2-core machine is slow)
LONG_JOB = 1000  # steps: a job still running when the test cancels it or queues another behind it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(check, timeout=WAIT, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _pngs(folder: Path) -> set[str]:
    """The generated images (input copies are `input-*`)."""
    return {p.name for p in folder.glob("image*.png")}


def _written(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file()}


MAX_UPLOAD = 100_000  # bytes: the server's --max-upload


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A 64x64 input image, masks (the right half white; one of the wrong size), a broken file."""
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "photo.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(mask[:32, :48]).save(folder / "small-mask.png")
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "huge.png").write_bytes(b"\0" * (2 * MAX_UPLOAD))
    return folder


@pytest.fixture(scope="module")
def server(tiny_schnell, tiny_dev, tmp_path_factory):
    """The UI on 127.0.0.1 with the tiny schnell and dev fixtures and a LoRA made for a wider model."""
    root = tmp_path_factory.mktemp("ui")
    loras, out = root / "loras", root / "out"
    loras.mkdir()
    mx.save_safetensors(
        str(loras / "wide.safetensors"),
        {
            "transformer.proj_out.lora_A.weight": mx.zeros((4, 3072)),
            "transformer.proj_out.lora_B.weight": mx.zeros((64, 4)),
        },
    )
    port = _free_port()
    command = [sys.executable, "-m", "flux1.ui", "--path", str(tiny_schnell), str(tiny_dev)]
    command += ["--lora-dir", str(loras), "--output-dir", str(out), "--port", str(port)]
    command += ["--max-upload", f"{MAX_UPLOAD}b"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"

    def up():
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return process.poll() is not None  # died: stop waiting, fail below

    _until(up, what="the UI to serve")
    assert process.poll() is None, process.stdout.read()
    yield url, out, tiny_schnell
    process.terminate()
    process.wait(timeout=30)


def _driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1300"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = _driver()
    yield driver
    driver.quit()


class Page:
    def __init__(self, driver, url):
        from selenium.webdriver.common.by import By

        self.driver, self.by = driver, By
        driver.get(url)
        _until(lambda: self.find("#generate"), what="the page")

    def find(self, css):
        found = self.driver.find_elements(self.by.CSS_SELECTOR, css)
        return found[0] if found else None

    def fill(self, elem_id, value):
        from selenium.webdriver.common.keys import Keys

        field = self.find(f"#{elem_id} textarea") or self.find(f"#{elem_id} input[type=number]")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(str(value), Keys.TAB)

    def value(self, elem_id):
        field = self.find(f"#{elem_id} textarea") or self.find(f"#{elem_id} input")
        return field.get_attribute("value")

    def text(self, elem_id):
        element = self.find(f"#{elem_id}")
        return element.text if element else ""

    def wait_text(self, elem_id, part):
        return _until(
            lambda: part in self.text(elem_id), what=f"'{part}' in #{elem_id}: {self.text(elem_id)!r}"
        )

    def wait_running(self, elem_id="status"):
        """Until #elem_id reports a finished step of a long job (steps pass faster than a poll: wait for
        any, never for one in particular)."""
        return _until(
            lambda: re.search(rf"step \d+/{LONG_JOB}\b", self.text(elem_id)),
            what=f"a step of {LONG_JOB} in #{elem_id}",
        )

    def settings(self, prompt="a red fox", width=64, height=64, steps=2, seed=7):
        for elem_id, value in (("prompt", prompt), ("width", width), ("height", height), ("steps", steps)):
            self.fill(elem_id, value)
        self.fill("seed", seed)

    def click(self, elem_id):
        self.find(f"#{elem_id}").click()

    def upload(self, elem_id, path):
        self.find(f"#{elem_id} input[type=file]").send_keys(str(path))

    def clear_upload(self, elem_id):
        self.find(f"#{elem_id} button[aria-label=Clear]").click()

    def choose(self, elem_id, option):
        """Pick an option of a dropdown."""
        self.find(f"#{elem_id} input").click()
        _until(lambda: self.find(f"li[role=option][aria-label='{option}']"), what=f"option {option}").click()

    def watch(self, elem_id):
        """From now on, every text #elem_id shows is kept (read back with seen())."""
        self.driver.execute_script(
            "const e = document.getElementById(arguments[0]); window.seen = [];"
            "new MutationObserver(() => window.seen.push(e.innerText))"
            ".observe(e, {subtree: true, childList: true, characterData: true});",
            elem_id,
        )

    def seen(self):
        return self.driver.execute_script("return window.seen")


def _main_py_image(checkpoint: Path, folder: Path, *flags) -> Path:
    """What main.py writes for the same settings."""
    out = folder / "main.png"
    assert generate_main(["--path", str(checkpoint), "--output", str(out), *flags]) == 0
    return out


VOLATILE = {"created", "generation_seconds"}


def _same_record(record: dict, expected: dict, *other: str) -> None:
    skip = VOLATILE | set(other)
    assert {k: v for k, v in record.items() if k not in skip} == {
        k: v for k, v in expected.items() if k not in skip
    }


def _same_pixels(a: Path, b: Path) -> None:
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


@needs_browser
def test_generate_in_the_page_writes_what_main_py_writes(server, browser, tmp_path):
    url, out, checkpoint = server
    page = Page(browser, url)
    before = _pngs(out)
    page.settings(prompt="a red fox", seed=7)
    page.click("generate")
    page.wait_text("status", "Saved image")
    (name,) = _pngs(out) - before
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "ui-page.png"))
    record = read_record(out / name)
    assert (record["prompt"], record["seed"], record["steps"], record["width"], record["height"]) == (
        "a red fox",
        7,
        2,
        64,
        64,
    )
    reference = _main_py_image(
        checkpoint,
        tmp_path,
        "--prompt",
        "a red fox",
        "--seed",
        "7",
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
    )
    assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(reference)))
    expected = read_record(reference)
    assert {k: v for k, v in record.items() if k not in VOLATILE} == {
        k: v for k, v in expected.items() if k not in VOLATILE
    }
    # The image shown (and downloaded) is the saved file, byte for byte, metadata included.
    shown = page.find("#image img").get_attribute("src")
    assert urllib.request.urlopen(shown, timeout=10).read() == (out / name).read_bytes()
    assert "seed 7" in page.text("status")
    # Nothing the page loads comes from beyond this machine (no CDN fonts or scripts, no analytics).
    requested = [
        json.loads(entry["message"])["message"].get("params", {}).get("request", {}).get("url", "")
        for entry in browser.get_log("performance")
    ]
    outside = [u for u in requested if u and not u.startswith((url, "data:", "blob:"))]
    assert any(u.startswith(url) for u in requested) and not outside, outside


@needs_browser
def test_cancel_stops_after_a_step_and_saves_nothing(server, browser):
    url, out, _ = server
    page = Page(browser, url)
    before = _pngs(out)
    page.settings(steps=LONG_JOB, seed=3)
    page.click("generate")
    page.wait_running()
    assert page.find("#image img") is not None  # the latent preview
    page.click("cancel")
    page.wait_text("status", "Cancelled at step")
    assert _pngs(out) == before


@needs_browser
def test_bad_input_gives_a_message_and_writes_nothing(server, browser, tmp_path):
    url, out, _ = server
    page = Page(browser, url)
    before = _pngs(out)
    page.settings(width=40)
    page.wait_text("size-message", "Width 40: must be a multiple of 16 from 16 to 8192 (nearest: 32 or 48)")
    page.click("generate")
    page.wait_text("status", "Error: Width 40: must be a multiple of 16")
    page.fill("width", 64)
    _until(lambda: page.text("size-message") == "", what="the size message to clear")

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    page.find("#settings input[type=file]").send_keys(str(broken))
    page.wait_text("status", "Error: cannot load settings from broken.png: not an image or JSON file")

    page.fill("lora-0", 1)
    page.click("generate")
    page.wait_text("status", "do not fit layer 'final_layer.linear' of transformer")
    assert _pngs(out) == before
    page.fill("lora-0", 0)  # the server keeps serving: the next request goes through
    page.click("generate")
    page.wait_text("status", "Saved image")


@needs_browser
def test_dropping_a_png_loads_its_settings(server, browser, tmp_path):
    url, _, checkpoint = server
    made = _main_py_image(
        checkpoint,
        tmp_path,
        "--prompt",
        "a blue jay",
        "--seed",
        "41",
        "--steps",
        "1",
        "--height",
        "32",
        "--width",
        "48",
    )
    page = Page(browser, url)
    page.find("#settings input[type=file]").send_keys(str(made))
    page.wait_text("status", "Loaded the settings of main.png (seed 41)")
    assert [page.value(k) for k in ("prompt", "seed", "steps", "width", "height")] == [
        "a blue jay",
        "41",
        "1",
        "48",
        "32",
    ]


@needs_browser
def test_vae_tiling_in_the_page_writes_what_main_py_writes(server, browser, tmp_path):
    """96 pixels are wider than the tiny VAE's 64-pixel tiles: the box decodes in tiles, as main.py's
    --vae-tiling; the record keeps it, and dropping that PNG ticks the box again."""
    url, out, checkpoint = server
    page = Page(browser, url)
    before = _pngs(out)
    page.settings(prompt="a tiled fox", width=96, height=96, seed=9)
    page.click("vae-tiling")
    page.click("generate")
    page.wait_text("status", "Saved image")
    (name,) = _pngs(out) - before
    flags = ["--prompt", "a tiled fox", "--seed", "9", "--steps", "2", "--height", "96", "--width", "96"]
    reference = _main_py_image(checkpoint, tmp_path, *flags, "--vae-tiling")
    assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(reference)))
    record = read_record(out / name)
    _same_record(record, read_record(reference))
    assert record["vae_tiling"] is True
    page = Page(browser, url)
    assert not page.find("#vae-tiling input").is_selected()
    page.find("#settings input[type=file]").send_keys(str(out / name))
    page.wait_text("status", f"Loaded the settings of {name} (seed 9)")
    assert page.find("#vae-tiling input").is_selected()


def test_the_page_takes_canny_edges_for_a_canny_model_only(tmp_path):
    """The box is shown for a Canny model (or one whose kind is not known yet) and asks for --canny;
    for another kind it is hidden and ignored."""
    from flux1.ui.request import Source, build, takes

    picture = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(picture)
    sources = {kind: Source(kind, path=str(tmp_path), kind=kind) for kind in ("canny", "depth", "schnell")}
    values = dict(width=64, height=64, steps=2, guidance=0, seed=1, batch=1, loras={}, image_strength=0.4)
    for kind, taken in (("canny", True), ("depth", False), ("schnell", False)):
        assert takes(kind, "canny") == taken
        request = build(sources, "x", kind, "none", image=str(picture), canny=True, vae_tiling=True, **values)
        assert (request.inputs.canny, request.config.vae_tiling) == (taken, True)
    assert takes(None, "canny")


def _kept(out: Path, record: dict, name: str, original: Path) -> None:
    """The record's input file is the upload's bytes, in the output folder, named for what it is."""
    kept = Path(record[f"{name}_path"])
    assert kept == out / f"input-{name}-{record[f'{name}_sha256'][:16]}.png"
    assert kept.read_bytes() == original.read_bytes()


@needs_browser
def test_img2img_with_a_negative_prompt_writes_what_main_py_writes(server, browser, pictures, tmp_path):
    url, out, checkpoint = server
    page = Page(browser, url)
    before = _pngs(out)
    page.settings(width=32, height=32)
    page.upload("init-image", pictures / "photo.png")
    page.wait_text("status", "Input image photo.png: 64x64 (width x height)")
    assert (page.value("width"), page.value("height")) == ("64", "64")  # main.py's size for it
    page.fill("prompt", "a red fox")
    page.fill("steps", 2)
    page.fill("seed", 7)
    page.fill("strength", 0.5)
    page.fill("negative-prompt", "blurry")
    page.fill("true-cfg", 2)
    page.click("generate")
    page.wait_text("status", "Saved image")
    (name,) = _pngs(out) - before
    flags = ["--prompt", "a red fox", "--seed", "7", "--steps", "2", "--image-strength", "0.5"]
    flags += [
        "--negative-prompt",
        "blurry",
        "--true-cfg-scale",
        "2",
        "--image-path",
        str(pictures / "photo.png"),
    ]
    reference = _main_py_image(checkpoint, tmp_path, *flags)
    _same_pixels(out / name, reference)
    record = read_record(out / name)
    _same_record(record, read_record(reference), "image_path")
    assert (record["image_strength"], record["negative_prompt"], record["true_cfg_scale"]) == (
        0.5,
        "blurry",
        2,
    )
    _kept(out, record, "image", pictures / "photo.png")


@needs_browser
def test_inpainting_with_an_uploaded_mask_reruns_with_main_py_c(server, browser, pictures, tmp_path):
    url, out, checkpoint = server
    page = Page(browser, url)
    before = _pngs(out)
    page.upload("init-image", pictures / "photo.png")
    page.wait_text("status", "Input image photo.png")
    page.upload("mask", pictures / "mask.png")
    page.settings(prompt="a hat", seed=8)
    page.click("generate")
    page.wait_text("status", "Saved image")
    (name,) = _pngs(out) - before
    photo, mask = str(pictures / "photo.png"), str(pictures / "mask.png")
    reference = _main_py_image(
        checkpoint,
        tmp_path,
        "--prompt",
        "a hat",
        "--seed",
        "8",
        "--steps",
        "2",
        "--image-path",
        photo,
        "--mask-path",
        mask,
    )
    _same_pixels(out / name, reference)
    record = read_record(out / name)
    _same_record(record, read_record(reference), "image_path", "mask_path")
    assert record["image_strength"] == 0.4  # the default, as main.py's
    _kept(out, record, "image", pictures / "photo.png")
    _kept(out, record, "mask", pictures / "mask.png")
    # main.py -C on the page's PNG finds its inputs in the output folder and makes the same image.
    again = tmp_path / "again.png"
    assert generate_main(["-C", str(out / name), "--output", str(again)]) == 0
    _same_pixels(again, out / name)


@needs_browser
def test_bad_uploads_give_a_message_and_write_nothing(server, browser, pictures):
    url, out, _ = server
    page = Page(browser, url)
    written = _written(out)
    page.upload("init-image", pictures / "huge.png")
    refused = 'File(s) exceed the maximum allowed size of 97.7 Kb: "huge.png"'
    _until(lambda: refused in getattr(page.find(".toast-body"), "text", ""), what="the size message")
    assert not list(out.rglob("huge.png"))  # refused before anything is sent

    page.upload("init-image", pictures / "broken.png")
    unreadable = (
        "Input image broken.png: not an image that Pillow can read (cannot identify image file 'broken.png')"
    )
    page.wait_text("status", f"Error: {unreadable}")
    page.settings()
    page.click("generate")
    page.wait_text("status", f"Error: {unreadable}")

    page.clear_upload("init-image")
    page.upload("init-image", pictures / "photo.png")
    page.wait_text("status", "Input image photo.png")
    page.upload("mask", pictures / "small-mask.png")
    page.settings()
    page.click("generate")
    page.wait_text(
        "status",
        "Error: Mask small-mask.png: 48x32 pixels, but the image is 64x64: the mask must cover the image "
        "pixel for pixel (both are then fitted to the output size alike)",
    )
    assert _written(out) == written
    page.clear_upload("mask")  # the server keeps serving: the next request goes through
    page.click("generate")
    page.wait_text("status", "Saved image")


@needs_browser
def test_a_second_tab_sees_its_place_in_the_queue(server, browser):
    url, out, _ = server
    first, second_driver = Page(browser, url), _driver()
    try:
        second = Page(second_driver, url)
        first.settings(steps=LONG_JOB, seed=3)
        second.settings(prompt="a second tab", steps=1, seed=4)
        first.click("generate")
        first.wait_running()
        second.click("generate")
        # Gradio's status over the tab's outputs: its place among the waiting jobs (and time waited)
        second.wait_text("image .progress-text", "queue: 1/1 |")
        first.click("cancel")
        first.wait_text("status", "Cancelled at step")
        second.wait_text("status", "Saved image")
        assert read_record(out / second.text("status").split()[1])["prompt"] == "a second tab"
    finally:
        second_driver.quit()


@needs_browser
def test_changing_the_model_reloads_with_progress(server, browser, tiny_dev):
    url, out, checkpoint = server
    page = Page(browser, url)
    for model, kind, seed in ((tiny_dev, "dev", 5), (checkpoint, "schnell", 6)):
        page.choose("model", str(model))
        page.wait_text(
            "modes", f"FLUX.1-{kind} takes the prompt alone or input image or input image and mask"
        )
        page.settings(seed=seed, steps=1)
        page.watch("status")
        page.click("generate")
        page.wait_text("status", f"(seed {seed};")
        seen = "\n".join(page.seen())
        assert f"Loading {model}: transformer" in seen, seen
        record = read_record(out / page.text("status").split()[1])
        # guidance 0 in the page: the kind's own (dev 3.5; schnell has no guidance input)
        assert (record["model"], record["base_model"], record["guidance"]) == (
            str(model),
            kind,
            GUIDANCE[kind],
        )


@needs_browser
def test_the_gallery_shows_thumbnails_of_every_image(server, browser):
    url, out, _ = server
    page = Page(browser, url)
    page.settings(seed=11, steps=1)
    page.click("generate")
    page.wait_text("status", "Saved image")
    page = Page(browser, url)  # a fresh page lists everything made since start
    made = _pngs(out)
    _until(
        lambda: len(browser.find_elements(page.by.CSS_SELECTOR, "#gallery img")) == len(made),
        what="the gallery",
    )
    gallery = page.find("#gallery").rect
    loaded = "arguments[0].scrollIntoView(); return arguments[0].complete && arguments[0].naturalWidth"
    for thumbnail in browser.find_elements(page.by.CSS_SELECTOR, "#gallery img"):
        assert Path(thumbnail.get_attribute("src")).name in made
        _until(
            lambda thumbnail=thumbnail: browser.execute_script(loaded, thumbnail), what="a thumbnail to load"
        )
        assert thumbnail.rect["width"] <= gallery["width"] / 6  # a thumbnail, however few images there are


def test_five_requests_from_two_clients_complete_in_order(server):
    from gradio_client import Client
    from gradio_client.utils import Status

    from flux1 import Config, Flux1

    url, out, checkpoint = server
    clients = [Client(url, verbose=False) for _ in range(2)]
    seeds = [100 + i for i in range(5)]
    steps = [120, 2, 2, 2, 2]  # the first runs long enough for the last to be queued behind it
    jobs = []
    for i, seed in enumerate(seeds):
        job = clients[i % 2].submit(
            *("a lighthouse", str(checkpoint), "none", 64, 64, steps[i], 0, seed, 1, 1),
            *("", 1, None, None, 0.4, None),  # no negative prompt, input image, mask or drawing
            *(False, False),  # no Canny edges, no VAE tiling
            0,  # the LoRA's scale
            api_name="/generate",
        )
        _until(
            lambda job=job: job.status().code not in (Status.STARTING, Status.JOINING_QUEUE), what="queued"
        )
        jobs.append(job)
    assert jobs[-1].status().rank > 0  # waits its turn, and is told its place
    results = [job.result(timeout=WAIT) for job in jobs]
    saved = [r[0].split()[1] for r in results]  # "Saved image_3.png (seed ...)"
    flux = Flux1.from_path(checkpoint)
    for seed, count, name, result in zip(seeds, steps, saved, results):
        record = read_record(out / name)
        assert record["seed"] == seed == result[3]["seed"]
        expected = flux.generate_image(seed, "a lighthouse", Config(count, 64, 64), progress=False)
        assert np.array_equal(np.asarray(Image.open(out / name)), expected.pixels)
    # Names are taken as each job starts (image.png, image_1.png, ...): their order is the run order.
    order = [int(Path(name).stem.removeprefix("image").removeprefix("_") or 0) for name in saved]
    assert order == sorted(order) and len(set(order)) == 5


def test_a_batch_in_the_page_writes_what_main_py_writes_for_the_batch(server, tmp_path):
    """Batch count 3, batch size 2: seeds 21 and 22 through the transformer as one batch, then 23; the
    images and records are main.py's --batch-size 2 ones; a batch size of 0 is refused by name."""
    from gradio_client import Client

    from flux1.ui.request import Source, build

    url, out, checkpoint = server
    before = _pngs(out)
    settings = ("a heron", str(checkpoint), "none", 64, 64, 2, 0, 21, 3)
    job = Client(url, verbose=False).submit(
        *settings, 2, *("", 1, None, None, 0.4, None), *(False, False), 0, api_name="/generate"
    )
    job.result(timeout=WAIT)
    said = [output[0] for output in job.outputs()]
    assert any(line.startswith("images 1-2/3 (seeds 21-22): step 2/2") for line in said), said
    assert [line.split(" (")[1].split(";")[0] for line in said if line.startswith("Saved")] == [
        "seed 21",
        "seed 22",
        "seed 23",
    ]
    assert sum("; batch of 2: " in line for line in said) == 2
    made = sorted(_pngs(out) - before, key=lambda name: read_record(out / name)["seed"])
    flags = [
        "--prompt", "a heron", "--seed", "21", "22", "23", "--steps", "2", "--height", "64", "--width", "64",
    ]  # fmt: skip
    main_out = tmp_path / "main.png"
    assert (
        generate_main(["--path", str(checkpoint), "--output", str(main_out), *flags, "--batch-size", "2"])
        == 0
    )
    expected = sorted(tmp_path.glob("main_seed_*.png"))
    assert len(made) == len(expected) == 3
    for name, reference in zip(made, expected):
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(reference)))
        _same_record(read_record(out / name), read_record(reference))
    sources = {"tiny": Source("tiny", path=str(checkpoint), kind="schnell")}
    with pytest.raises(ValueError, match=r"^Batch size 0: expected a whole number >= 1$"):
        build(sources, "x", "tiny", "none", 64, 64, 2, 0, 1, 2, {}, batch_size=0)


def test_serving_beyond_loopback_requires_auth(tiny_schnell, tmp_path, capsys):
    from flux1.ui.cli import main

    out = tmp_path / "out"
    assert main(["--path", str(tiny_schnell), "--output-dir", str(out), "--host", "0.0.0.0"]) == 2
    assert capsys.readouterr().err == (
        "error: --host 0.0.0.0: serving beyond this machine requires --auth USER:PASS "
        "(anyone who reaches the port could run the model and read the outputs)\n"
    )
    assert main(["--path", str(tiny_schnell), "--host", "0.0.0.0", "--auth", "nopassword"]) == 2
    assert capsys.readouterr().err == "error: --auth: expected USER:PASS\n"
    assert not out.exists()


def test_flux1_imports_without_gradio():
    code = "import sys; sys.modules['gradio'] = None; import flux1, flux1.pipeline, flux1.preview, flux1.cli.generate"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
