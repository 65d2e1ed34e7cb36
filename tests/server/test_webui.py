"""The web page in headless Chromium against a real server on 127.0.0.1 with the bundled model: generate and watch
the progress bar and step previews move, download the PNG, reuse the seed, cancel running and queued jobs, load
parameters from dropped PNGs (leansd's and AUTOMATIC1111-style ones), inpaint with a painted mask, and ask for the
API key once.

Needs the Python `playwright` package and a Chromium binary (Debian's `chromium`; none is downloaded). A screenshot
of the page is kept at $LEANSD_WEBUI_SCREENSHOT, else in pytest's temporary folder.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api", reason="needs the playwright package (requirements/dev.txt)")

from PIL import Image, PngImagePlugin  # noqa: E402
from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

from leansd.server.app import create_app  # noqa: E402
from tests.server.conftest import Server, call, decode_png, serving, wait_until  # noqa: E402

STEP_DELAY = 0.03  # seconds slept after each step: the bundled model is too fast to watch otherwise
KEY = "webui-test-key"


def chromium_path() -> str | None:
    explicit = os.environ.get("LEANSD_CHROMIUM")
    if explicit:
        return explicit
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


pytestmark = pytest.mark.skipif(chromium_path() is None, reason="no chromium binary on PATH (Debian: apt-get install "
                                "chromium; or set LEANSD_CHROMIUM to a Chromium or Chrome binary)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = chromium_path()
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start; the page is our own, on 127.0.0.1.
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(registry) -> Iterator[Server]:
    with serving(create_app(registry, step_delay=STEP_DELAY)) as server:
        yield server


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    """A fresh page (empty local storage) on the server; fails the test on any uncaught script error."""
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    yield page
    context.close()
    assert not errors, f"script errors on the page: {errors}"


def submit(page: Page, how) -> str:
    """Run how() (a click or a key press) and return the id of the job the page submitted."""
    with page.expect_response(lambda r: r.url.endswith("/api/jobs") and r.request.method == "POST") as response:
        how()
    assert response.value.status == 202, response.value.text()
    return response.value.json()["id"]


def job_of(server: Server, job_id: str) -> dict:
    return call("GET", f"{server.url}/api/jobs/{job_id}").json()


def wait_for_status(server: Server, job_id: str, status: str, timeout: float = 30) -> dict:
    wait_until(lambda: job_of(server, job_id)["status"] == status, timeout, f"job {job_id} to be {status}")
    return job_of(server, job_id)


def drop_file(page: Page, data: bytes, name: str, selector: str = ".output") -> None:
    """Drop a file on an element, as a person dragging it from their file manager would."""
    page.evaluate(
        """([b64, name, selector]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/png" }));
            const target = document.querySelector(selector);
            for (const type of ["dragenter", "dragover", "drop"]) {
                target.dispatchEvent(new DragEvent(type, { dataTransfer: transfer, bubbles: true, cancelable: true }));
            }
        }""",
        [base64.b64encode(data).decode(), name, selector],
    )


# Records every value the progress bar and the preview image take, from the page's side.
RECORD = """() => {
    window.__seen = { progress: [], previews: [] };
    const bar = document.getElementById("progress"), preview = document.getElementById("preview");
    new MutationObserver(() => window.__seen.progress.push([bar.value, bar.max]))
        .observe(bar, { attributes: true, attributeFilter: ["value", "max"] });
    new MutationObserver(() => window.__seen.previews.push(preview.src))
        .observe(preview, { attributes: true, attributeFilter: ["src"] });
}"""


def test_generate_shows_progress_preview_gallery_and_downloads_the_server_png(page: Page, server: Server, tmp_path_factory):
    page.fill("#prompt", "a red circle on a blue background")
    page.fill("#steps", "20")
    page.fill("#batch_size", "2")  # progress counts the steps of both images: 40
    page.evaluate(RECORD)
    job_id = submit(page, lambda: page.press("#prompt", "Control+Enter"))  # the keyboard shortcut
    items = page.locator(f'#gallery li[data-job="{job_id}"]')
    items.nth(1).wait_for(timeout=30_000)
    page.wait_for_selector(f'#progress_text[data-job="{job_id}"][data-status="done"]')  # the stream's last event

    seen = page.evaluate("window.__seen")
    steps = [value for value, top in seen["progress"] if top == 40]
    assert len({s for s in steps if 0 < s < 40}) >= 5, f"the progress bar did not move step by step: {seen['progress']}"
    assert steps == sorted(steps) and steps[-1] == 40
    previews = [src for src in seen["previews"] if src.startswith("data:image/png;base64,")]
    assert len(set(previews)) >= 3, "the step preview did not change during the job"
    assert page.text_content("#progress_text").startswith("Done")

    job = job_of(server, job_id)
    assert job["status"] == "done" and job["request"]["steps"] == 20 and len(job["images"]) == 2
    seeds = [image["seed"] for image in job["images"]]
    assert seeds[1] == seeds[0] + 1
    assert items.count() == 2
    for item, image in zip((items.nth(0), items.nth(1)), job["images"]):
        shown = item.locator("img").evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]")
        assert shown == [True, 64, 64]
        assert image["infotext"] in item.locator("pre").text_content()
    assert {f"seed {s}" in items.nth(k).text_content() for k, s in enumerate(seeds)} == {True}

    # Download: the very bytes the server made, parameters chunk included.
    first = items.filter(has_text=f"seed {seeds[0]} ")
    with page.expect_download() as download:
        first.get_by_role("link", name="Download PNG").click()
    data = Path(download.value.path()).read_bytes()
    assert data == call("GET", server.url + job["images"][0]["url"]).body
    assert decode_png(data).text["parameters"] == job["images"][0]["infotext"]
    assert download.value.suggested_filename.endswith(".png")

    # "Reuse last" fills the seed of the newest job (its first image: the batch comes out again) and turns off
    # the random seed.
    assert page.is_checked("#seed_random")
    page.click("#seed_reuse")
    assert page.input_value("#seed") == str(seeds[0])
    assert not page.is_checked("#seed_random") and page.is_enabled("#seed")

    # "Use settings" puts an image's settings back in the form.
    page.fill("#prompt", "something else")
    page.fill("#steps", "7")
    first.get_by_role("button", name="Use settings").click()
    assert page.input_value("#prompt") == "a red circle on a blue background"
    assert [page.input_value("#steps"), page.input_value("#seed")] == ["20", str(seeds[0])]

    shot = Path(os.environ.get("LEANSD_WEBUI_SCREENSHOT") or tmp_path_factory.mktemp("webui") / "webui.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot))
    print(f"screenshot: {shot}")


def test_cancel_running_job_with_escape_and_queued_job_from_the_queue(page: Page, server: Server):
    page.fill("#prompt", "a green square")
    page.fill("#steps", "150")  # 150 steps x 30 ms delay: ~5 s or more, far longer than the test needs
    first, second, third = (submit(page, lambda: page.click("#generate")) for _ in range(3))
    page.locator("#queue li").nth(2).wait_for()
    assert page.locator("#queue li").count() == 3

    # A queued job, cancelled from its own button in the queue: it never runs.
    page.locator(f'#queue li[data-job="{third}"]').get_by_role("button", name="Cancel").click()
    assert wait_for_status(server, third, "cancelled")["started"] is None

    # The running job, cancelled with Escape once the page shows it moving.
    page.wait_for_function("document.getElementById('progress').value >= 2")
    page.keyboard.press("Escape")
    job = wait_for_status(server, first, "cancelled")
    assert job["started"] is not None and job["step"] < 150 and not job["images"]

    # Then the next one runs; the Cancel button cancels it too.
    page.wait_for_selector(f'#progress_text[data-job="{second}"][data-status="running"]')
    page.click("#cancel")
    wait_for_status(server, second, "cancelled")
    page.wait_for_selector(f'#progress_text[data-job="{second}"][data-status="cancelled"]')
    page.wait_for_selector("#queue li", state="detached")
    assert page.is_visible("#queue_empty")
    assert page.locator(f'#gallery li[data-job="{first}"], #gallery li[data-job="{second}"]').count() == 0
    expect(page.locator("#cancel")).to_be_disabled()


def made_by_server(server: Server, **settings) -> tuple[dict, bytes]:
    reply = call("POST", f"{server.url}/api/jobs", settings)
    assert reply.status == 202, reply.body
    job = wait_for_status(server, reply.json()["id"], "done")
    return job, call("GET", server.url + job["images"][0]["url"]).body


def a1111_png(text: str, compressed: bool) -> bytes:
    """A PNG as AUTOMATIC1111 writes one (iTXt when the text is not Latin-1), here zlib-compressed on request."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt("parameters", text, zip=compressed)
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(out, format="PNG", pnginfo=info)
    return out.getvalue()


@pytest.fixture(scope="module")
def server_png(server: Server) -> tuple[dict, bytes]:
    """A job and its first PNG, made before the page opens (so no progress message replaces the page's status)."""
    return made_by_server(server, prompt="a blue triangle", negative_prompt="blurry, dark", seed=1234, steps=12,
                          guidance_scale=5.5, sampler="euler_a", width=64, height=64)


def test_dropped_png_fills_the_form(server_png: tuple[dict, bytes], page: Page, server: Server):
    job, data = server_png
    drop_file(page, data, "leansd.png")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Loaded parameters')")
    assert page.input_value("#prompt") == "a blue triangle"
    assert page.input_value("#negative_prompt") == "blurry, dark"
    assert page.input_value("#seed") == "1234" and not page.is_checked("#seed_random")
    assert [page.input_value(f"#{f}") for f in ("steps", "guidance_scale", "width", "height")] == ["12", "5.5", "64", "64"]
    assert page.input_value("#sampler") == "Euler a"
    assert page.input_value("#model") == job["request"]["model"]
    assert "not" not in page.text_content("#status"), page.text_content("#status")

    # AUTOMATIC1111 >= 1.9: the schedule in its own field, a multi-line prompt, a seed past 2**53, a model we lack;
    # read from a compressed iTXt chunk, through the file picker this time.
    text = ("a photo of a cat, (masterpiece:1.2)\nsitting on a mat\nNegative prompt: ugly, lowres\nwatermark\n"
            "Steps: 33, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 18446744073709551615, "
            'Size: 72x96, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.35, '
            'Lora hashes: "a: 1, b: 2", Version: v1.10.1')
    page.set_input_files("#png_file", files=[{"name": "a1111.png", "mimeType": "image/png", "buffer": a1111_png(text, True)}])
    page.wait_for_function("document.getElementById('status').textContent.includes('a1111.png')")
    assert page.input_value("#prompt") == "a photo of a cat, (masterpiece:1.2)\nsitting on a mat"
    assert page.input_value("#negative_prompt") == "ugly, lowres\nwatermark"
    assert page.input_value("#sampler") == "DPM++ 2M Karras"
    assert page.input_value("#seed") == "18446744073709551615"
    assert [page.input_value(f"#{f}") for f in ("steps", "guidance_scale", "width", "height", "strength")] == ["33", "6.5", "72", "96", "0.35"]
    assert 'model "v1-5-pruned-emaonly" is not served here' in page.text_content("#status")

    # The other two ways a PNG holds text: zTXt (compressed Latin-1) and plain iTXt (UTF-8).
    for name, add in (("ztxt.png", lambda info, t: info.add_text("parameters", t, zip=True)),
                      ("itxt.png", lambda info, t: info.add_itxt("parameters", t))):
        prompt = f"ein Würfel aus {name} 🎲" if name == "itxt.png" else f"un cube vert ({name})"
        info = PngImagePlugin.PngInfo()
        add(info, f"{prompt}\nSteps: 9, Sampler: Euler, CFG scale: 3, Seed: 77, Size: 64x64")
        out = io.BytesIO()
        Image.new("RGB", (8, 8)).save(out, format="PNG", pnginfo=info)
        drop_file(page, out.getvalue(), name)
        page.wait_for_function(f"document.getElementById('status').textContent.includes('{name}')")
        assert [page.input_value("#prompt"), page.input_value("#steps"), page.input_value("#seed")] == [prompt, "9", "77"]
    page.set_input_files("#png_file", files=[{"name": "a1111.png", "mimeType": "image/png", "buffer": a1111_png(text, True)}])
    page.wait_for_function("document.getElementById('status').textContent.includes('a1111.png')")

    # The seed goes to the server digit for digit (it is past JavaScript's exact integers).
    page.fill("#steps", "2")
    job_id = submit(page, lambda: page.click("#generate"))
    assert job_of(server, job_id)["request"]["seed"] == 2**64 - 1
    page.wait_for_selector(f'#progress_text[data-job="{job_id}"][data-status="done"]')

    # An image without parameters says so and leaves the form alone.
    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, format="PNG")
    drop_file(page, plain.getvalue(), "plain.png")
    page.wait_for_function("document.getElementById('status').textContent.includes('no generation parameters')")
    assert page.input_value("#prompt") == "a photo of a cat, (masterpiece:1.2)\nsitting on a mat"


def test_inpainting_sends_the_painted_mask(page: Page, server: Server, tmp_path: Path):
    init = Image.new("RGB", (64, 64), (30, 60, 200))
    init.paste((220, 30, 30), (16, 16, 48, 48))
    init.save(tmp_path / "init.png")
    page.click("#img2img > summary")
    page.set_input_files("#init_file", str(tmp_path / "init.png"))
    page.wait_for_selector("#mask_canvas", state="visible")
    assert [page.input_value("#width"), page.input_value("#height")] == ["64", "64"]

    # Paint a stroke across the top of the image with a small brush.
    page.evaluate("""() => { const b = document.getElementById('brush'); b.value = 8; b.dispatchEvent(new Event('input')); }""")
    box = page.locator("#mask_canvas").bounding_box()
    y = box["y"] + box["height"] * 0.1
    page.mouse.move(box["x"] + box["width"] * 0.1, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.9, y, steps=8)
    page.mouse.up()
    assert page.text_content("#mask_help").startswith("Inpainting")

    # Strength from the keyboard: 0.75 -> 0.60.
    page.focus("#strength")
    for _ in range(15):
        page.keyboard.press("ArrowLeft")
    assert page.input_value("#strength") == "0.6"

    page.fill("#prompt", "a red circle on a blue background")
    page.fill("#steps", "10")
    with page.expect_request(lambda r: r.url.endswith("/api/jobs") and r.method == "POST") as request:
        job_id = submit(page, lambda: page.press("#prompt", "Control+Enter"))
    body = request.value.post_data_json
    sent = decode_png(body["init_image"].split(",", 1)[1]).convert("RGB")
    assert sent.size == (64, 64) and sent.tobytes() == init.tobytes()
    mask = decode_png(body["mask"].split(",", 1)[1]).convert("L")
    assert mask.size == (64, 64)
    assert mask.getpixel((32, 6)) == 255 and mask.getpixel((32, 40)) == 0 and mask.getpixel((60, 60)) == 0
    assert body["strength"] == 0.6

    job = wait_for_status(server, job_id, "done")
    assert job["request"]["init_image"] and job["request"]["mask"] and job["request"]["strength"] == 0.6
    assert "Denoising strength: 0.6" in job["images"][0]["infotext"]
    page.locator(f'#gallery li[data-job="{job_id}"]').wait_for()

    # Invert swaps painted and unpainted; Clear empties the mask.
    alpha = "([x, y]) => { const c = document.getElementById('mask_canvas'); return c.getContext('2d').getImageData(x, y, 1, 1).data[3]; }"
    assert page.evaluate(alpha, [32, 6]) == 255 and page.evaluate(alpha, [32, 40]) == 0
    page.click("#mask_invert")
    assert page.evaluate(alpha, [32, 6]) == 0 and page.evaluate(alpha, [32, 40]) == 255
    page.click("#mask_clear")
    assert page.evaluate(alpha, [32, 40]) == 0
    assert page.text_content("#mask_help").startswith("Image to image")

    # A PNG dropped on the image area replaces the init image (its parameters are not loaded), sized to the model.
    small = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "not this prompt\nSteps: 3, Sampler: Euler, Seed: 5")
    Image.new("RGB", (16, 8), "green").save(small, format="PNG", pnginfo=info)
    drop_file(page, small.getvalue(), "small.png", "#init_drop")
    page.wait_for_function("document.getElementById('init_canvas').width === 16")
    assert page.input_value("#prompt") == "a red circle on a blue background"
    assert [page.input_value("#width"), page.input_value("#height")] == ["88", "48"]  # about 64x64's area


def test_asks_for_the_api_key_once_and_keeps_it(browser: Browser, registry):
    with serving(create_app(registry, api_key=KEY)) as server:
        context = browser.new_context()
        page = context.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("#key_dialog[open]")
        page.fill("#key_input", KEY)
        page.press("#key_input", "Enter")
        page.wait_for_selector("body[data-ready=true]")
        assert page.locator("#model option").count() == len(registry.models)
        assert page.evaluate("localStorage.getItem('leansd.apiKey')") == KEY
        assert not page.is_visible("#key_dialog")

        page.reload()  # the stored key is used: no second question
        page.wait_for_selector("body[data-ready=true]")
        assert not page.is_visible("#key_dialog")
        assert page.locator("#model option").count() == len(registry.models)

        page.evaluate("localStorage.setItem('leansd.apiKey', 'wrong')")
        page.reload()  # a refused key is asked for again, saying so
        page.wait_for_selector("#key_dialog[open]")
        assert "refused" in page.text_content("#key_dialog")
        context.close()


def test_controls_are_labelled_focus_is_visible_and_errors_name_the_field(page: Page, server: Server):
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button, canvas')]
        .filter((e) => e.type !== 'hidden' && !e.hidden)
        .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map((e) => e.id || e.outerHTML.slice(0, 80))""")
    assert unlabelled == []

    # Keyboard focus shows a ring.
    page.focus("#prompt")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "negative_prompt"
    ring = page.evaluate("(() => { const s = getComputedStyle(document.activeElement); return [s.outlineStyle, s.outlineWidth]; })()")
    assert ring[0] != "none" and ring[1] != "0px", ring

    # The server's error is shown and its field marked and focused; nothing is queued.
    page.fill("#prompt", "a red circle")
    page.fill("#steps", "151")
    with page.expect_response(lambda r: r.url.endswith("/api/jobs") and r.request.method == "POST") as response:
        page.click("#generate")
    assert 400 <= response.value.status < 500
    expect(page.locator("#form_error")).to_contain_text("steps")
    assert page.get_attribute("#steps", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "steps"

    # An empty prompt is caught before any request.
    page.fill("#prompt", "  ")
    page.keyboard.press("Control+Enter")
    expect(page.locator("#form_error")).to_contain_text("prompt")
    assert page.evaluate("document.activeElement.id") == "prompt"
