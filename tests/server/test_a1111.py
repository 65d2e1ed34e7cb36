"""AUTOMATIC1111's API (/sdapi/v1) over real HTTP: raw requests, then the real `webuiapi` client."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from PIL import Image

from leansd.server.infotext import parse_parameters
from tests.server.conftest import call, decode_png, pixels, png_b64, wait_until

PROMPT = "a green square"
A1111_PAYLOAD = {  # what A1111 clients send besides the fields leansd uses: all ignored
    "enable_hr": False, "restore_faces": False, "tiling": False, "styles": [], "subseed": -1, "subseed_strength": 0,
    "alwayson_scripts": {}, "script_args": [], "s_churn": 0, "do_not_save_grid": True, "eta": 1.0, "hr_scale": 2,
}


def txt2img(server, **fields):
    return call("POST", f"{server.url}/sdapi/v1/txt2img", {**A1111_PAYLOAD, **fields})


def test_txt2img_response_shape_seeds_and_pixels(live_server, reference):
    reply = txt2img(live_server, prompt=PROMPT, negative_prompt="blurry", seed=40, steps=5, batch_size=2, n_iter=2, width=64, height=64)
    assert reply.status == 200, reply.body
    data = reply.json()
    assert set(data) == {"images", "parameters", "info"} and isinstance(data["info"], str)
    info = json.loads(data["info"])
    assert info["all_seeds"] == [40, 41, 42, 43] and info["seed"] == 40 and info["batch_size"] == 2
    assert info["sampler_name"] == "Euler" and info["cfg_scale"] == 7.0 and info["steps"] == 5  # A1111's defaults
    assert info["sd_model_name"] == "shapes" and info["negative_prompt"] == "blurry" and len(info["infotexts"]) == 4
    assert data["parameters"]["prompt"] == PROMPT and data["parameters"]["n_iter"] == 2
    for i, encoded in enumerate(data["images"]):
        image = decode_png(encoded)
        assert image.info["parameters"] == info["infotexts"][i]
        fields = parse_parameters(image.info["parameters"])
        assert (fields["Seed"], fields["Sampler"], fields["Negative prompt"]) == (str(40 + i), "Euler", "blurry")
        expected = reference(PROMPT, negative_prompt="blurry", seed=40 + i, num_inference_steps=5, guidance_scale=7.0,
                             scheduler="euler").images[0]
        assert np.array_equal(pixels(image), pixels(expected)), f"image {i}"


def test_clip_skip_from_override_settings(live_server, reference):
    """AUTOMATIC1111's clip skip (CLIP_stop_at_last_layers 2) is leansd's clip_skip=1, recorded as A1111 writes it."""
    reply = txt2img(live_server, prompt=PROMPT, seed=7, steps=4, width=64, height=64,
                    override_settings={"CLIP_stop_at_last_layers": 2})
    assert reply.status == 200, reply.body
    image = decode_png(reply.json()["images"][0])
    assert parse_parameters(image.info["parameters"])["Clip skip"] == "2"
    expected = reference(PROMPT, seed=7, num_inference_steps=4, guidance_scale=7.0, scheduler="euler", clip_skip=1).images[0]
    assert np.array_equal(pixels(image), pixels(expected))
    plain = reference(PROMPT, seed=7, num_inference_steps=4, guidance_scale=7.0, scheduler="euler").images[0]
    assert not np.array_equal(pixels(image), pixels(plain))  # the setting changed the image


@pytest.mark.parametrize("sampler", ["Euler a", "Euler", "LMS", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "PLMS", "LCM"])
def test_every_sampler_by_display_name(live_server, sampler):
    data = txt2img(live_server, prompt=PROMPT, seed=1, steps=4, sampler_name=sampler).json()
    assert json.loads(data["info"])["sampler_name"] == sampler
    assert parse_parameters(decode_png(data["images"][0]).info["parameters"])["Sampler"] == sampler


@pytest.mark.parametrize("fields, label, alias", [
    ({"sampler_name": "euler A"}, "Euler a", "euler_a"),
    ({"sampler_name": "k_dpmpp_2m_ka"}, "DPM++ 2M Karras", "dpm++2m_karras"),
    ({"sampler_name": "DPM++ 2M", "scheduler": "Karras"}, "DPM++ 2M Karras", "dpm++2m_karras"),
    ({"sampler_name": "DPM++ 2M", "scheduler": "automatic"}, "DPM++ 2M", "dpm++2m"),
    ({"sampler_name": None, "sampler_index": "ddim"}, "DDIM", "ddim"),
])
def test_sampler_aliases_and_schedule_types(live_server, reference, fields, label, alias):
    data = txt2img(live_server, prompt=PROMPT, seed=9, steps=4, **fields).json()
    assert json.loads(data["info"])["sampler_name"] == label
    expected = reference(PROMPT, seed=9, num_inference_steps=4, guidance_scale=7.0, scheduler=alias).images[0]
    assert np.array_equal(pixels(decode_png(data["images"][0])), pixels(expected))


def test_img2img_and_inpainting(live_server, reference):
    init = Image.new("RGB", (64, 64), (10, 120, 240))
    reply = call("POST", f"{live_server.url}/sdapi/v1/img2img", {
        **A1111_PAYLOAD, "prompt": PROMPT, "seed": 5, "steps": 10, "init_images": ["data:image/png;base64," + png_b64(init)],
        "denoising_strength": 0.5, "resize_mode": 0})
    data = reply.json()
    assert json.loads(data["info"])["denoising_strength"] == 0.5 and data["parameters"]["init_images"] is None
    expected = reference(PROMPT, seed=5, num_inference_steps=10, guidance_scale=7.0, scheduler="euler", image=init, strength=0.5).images[0]
    assert np.array_equal(pixels(decode_png(data["images"][0])), pixels(expected))
    mask = Image.new("L", (64, 64), 255)
    mask.paste(0, (0, 0, 32, 64))  # inverted below: the left half is repainted
    data = call("POST", f"{live_server.url}/sdapi/v1/img2img", {
        "prompt": PROMPT, "seed": 6, "steps": 6, "init_images": [png_b64(init)], "mask": png_b64(mask),
        "inpainting_mask_invert": 1, "denoising_strength": 1.0, "mask_blur": 4, "inpainting_fill": 1}).json()
    repaint = Image.new("L", (64, 64), 0)
    repaint.paste(255, (0, 0, 32, 64))
    expected = reference(PROMPT, seed=6, num_inference_steps=6, guidance_scale=7.0, scheduler="euler", image=init,
                         mask_image=repaint, strength=1.0).images[0]
    assert np.array_equal(pixels(decode_png(data["images"][0])), pixels(expected))


def test_models_options_and_switching(live_server):
    models = call("GET", f"{live_server.url}/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["shapes", "second"]
    assert all(m["title"] == f"{m['model_name']} [{m['hash']}]" and m["sha256"].startswith(m["hash"]) for m in models)
    assert call("GET", f"{live_server.url}/sdapi/v1/options").json()["sd_model_checkpoint"] == models[0]["title"]
    try:
        assert call("POST", f"{live_server.url}/sdapi/v1/options", {"sd_model_checkpoint": models[1]["title"]}).status == 200
        assert call("GET", f"{live_server.url}/sdapi/v1/options").json()["sd_model_checkpoint"] == models[1]["title"]
        info = json.loads(txt2img(live_server, prompt=PROMPT, steps=2, sampler_name="Euler").json()["info"])
        assert info["sd_model_name"] == "second"
        override = {"sd_model_checkpoint": "SHAPES"}  # by name, case-insensitively, for this request only
        info = json.loads(txt2img(live_server, prompt=PROMPT, steps=2, override_settings=override).json()["info"])
        assert info["sd_model_name"] == "shapes"
        reply = call("POST", f"{live_server.url}/sdapi/v1/options", {"sd_model_checkpoint": "missing.safetensors"})
        assert reply.status == 404 and reply.json()["field"] == "sd_model_checkpoint"
    finally:
        call("POST", f"{live_server.url}/sdapi/v1/options", {"sd_model_checkpoint": "shapes"})


def test_lists(live_server):
    names = {s["name"] for s in call("GET", f"{live_server.url}/sdapi/v1/samplers").json()}
    assert names == {"Euler a", "Euler", "LMS", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "PLMS", "LCM"}
    assert [s["name"] for s in call("GET", f"{live_server.url}/sdapi/v1/schedulers").json()] == ["automatic", "karras"]
    assert call("GET", f"{live_server.url}/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    for path in ("upscalers", "sd-vae", "loras", "prompt-styles"):  # what SillyTavern and others list: nothing here
        assert call("GET", f"{live_server.url}/sdapi/v1/{path}").json() == []
    assert call("GET", f"{live_server.url}/sdapi/v1/cmd-flags").json() == {}


def test_png_info_reads_back_the_parameters(live_server):
    data = txt2img(live_server, prompt="a cat, \"quoted\": yes", negative_prompt="dog", seed=77, steps=2).json()
    reply = call("POST", f"{live_server.url}/sdapi/v1/png-info", {"image": "data:image/png;base64," + data["images"][0]})
    info = reply.json()
    assert info["info"] == json.loads(data["info"])["infotexts"][0]
    assert info["parameters"]["Prompt"] == "a cat, \"quoted\": yes" and info["parameters"]["Negative prompt"] == "dog"
    assert info["parameters"]["Seed"] == "77" and info["parameters"]["Steps"] == "2"
    plain = call("POST", f"{live_server.url}/sdapi/v1/png-info", {"image": png_b64(Image.new("RGB", (8, 8)))}).json()
    assert plain["info"] == "" and plain["parameters"] == {}


def run_in_thread(fn):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("reply", fn()), daemon=True)
    thread.start()
    return thread, out


def test_progress_during_a_job_and_interrupt(start_server):
    server = start_server(step_delay=0.05)
    idle = call("GET", f"{server.url}/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    thread, out = run_in_thread(lambda: txt2img(server, prompt=PROMPT, seed=1, steps=30, n_iter=2))
    wait_until(lambda: call("GET", f"{server.url}/sdapi/v1/progress").json()["state"]["sampling_step"] >= 3, what="steps")
    progress = call("GET", f"{server.url}/sdapi/v1/progress").json()
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    assert progress["state"]["sampling_steps"] == 30 and progress["state"]["job_count"] == 2 and progress["state"]["job_no"] == 0
    assert decode_png(progress["current_image"]).size == (64, 64)
    assert call("GET", f"{server.url}/sdapi/v1/progress?skip_current_image=true").json()["current_image"] is None
    assert call("POST", f"{server.url}/sdapi/v1/interrupt").status == 200
    thread.join(20)
    reply = out["reply"]
    assert reply.status == 200 and reply.json()["images"] == []  # stopped during the first image
    assert call("GET", f"{server.url}/sdapi/v1/progress").json()["state"]["interrupted"] is True


def test_skip_drops_the_current_image_only(start_server):
    server = start_server(step_delay=0.05)
    thread, out = run_in_thread(lambda: txt2img(server, prompt=PROMPT, seed=10, steps=20, n_iter=2))
    wait_until(lambda: call("GET", f"{server.url}/sdapi/v1/progress").json()["state"]["sampling_step"] >= 2, what="steps")
    call("POST", f"{server.url}/sdapi/v1/skip")
    thread.join(30)
    info = json.loads(out["reply"].json()["info"])
    assert info["all_seeds"] == [11]


@pytest.mark.parametrize("path, fields, field", [
    ("txt2img", {"steps": 0}, "steps"),
    ("txt2img", {"cfg_scale": -3}, "cfg_scale"),
    ("txt2img", {"sampler_name": "Heun++ 9M"}, "sampler_name"),
    ("txt2img", {"sampler_name": "Euler", "scheduler": "Karras"}, "scheduler"),
    ("txt2img", {"scheduler": "Exponential"}, "scheduler"),
    ("txt2img", {"n_iter": 5, "batch_size": 5}, "batch_size"),
    ("txt2img", {"width": 63}, "width"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "nope"}}, "override_settings.sd_model_checkpoint"),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 0}}, "override_settings.CLIP_stop_at_last_layers"),
    ("img2img", {}, "init_images"),
    ("img2img", {"init_images": ["%%%"]}, "init_images"),
    ("img2img", {"init_images": [png_b64(Image.new("RGB", (64, 64)))], "denoising_strength": 0}, "denoising_strength"),
])
def test_errors_name_the_field(live_server, path, fields, field):
    reply = call("POST", f"{live_server.url}/sdapi/v1/{path}", {"prompt": PROMPT, **fields})
    assert 400 <= reply.status < 500
    body = reply.json()
    assert body["field"] == field and body["detail"] == body["error"], body


# ---------------------------------------------------------------- the real webuiapi client

def client(server):
    webuiapi = pytest.importorskip("webuiapi")
    return webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", sampler="Euler a", steps=6)


def test_webuiapi_txt2img_img2img_png_info(live_server, reference):
    api = client(live_server)
    result = api.txt2img(prompt=PROMPT, seed=100, batch_size=2, width=64, height=64, cfg_scale=5)
    assert len(result.images) == 2 and result.info["all_seeds"] == [100, 101]
    expected = reference(PROMPT, seed=101, num_inference_steps=6, guidance_scale=5.0, scheduler="euler_a").images[0]
    assert np.array_equal(pixels(result.images[1]), pixels(expected))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 20, 44, 44))
    edited = api.img2img(images=[result.image], mask_image=mask, prompt=PROMPT, seed=3, denoising_strength=0.9, width=64, height=64)
    assert edited.image.size == (64, 64) and edited.info["all_seeds"] == [3]
    assert api.png_info(edited.image).info == edited.info["infotexts"][0]


def test_webuiapi_models_samplers_progress(live_server):
    api = client(live_server)
    assert api.util_get_model_names() == sorted(m["title"] for m in api.get_sd_models())
    try:
        api.util_set_model("second")
        assert api.util_get_current_model().startswith("second [")
        assert api.txt2img(prompt=PROMPT, steps=2, width=64, height=64).info["sd_model_name"] == "second"
    finally:
        api.util_set_model("shapes")
    assert "DPM++ 2M Karras" in api.util_get_sampler_names()
    assert api.util_get_scheduler_names() == ["automatic", "karras"]
    api.util_wait_for_ready(check_interval=0.1)


def test_webuiapi_interrupt(start_server):
    server = start_server(step_delay=0.05)
    api = client(server)
    thread, out = run_in_thread(lambda: api.txt2img(prompt=PROMPT, steps=40, seed=1, width=64, height=64))
    wait_until(lambda: api.get_progress()["state"]["sampling_step"] >= 2, what="steps")
    api.interrupt()
    thread.join(20)
    assert out["reply"].images == [] and api.get_progress()["state"]["interrupted"] is True


def test_parse_parameters_reads_quoted_values_and_multiline_prompts():
    text = 'a cat\non two lines\nNegative prompt: dog\nSteps: 2, Model: "a, b: \\"c\\"", Seed: 3, Size: 64x64'
    assert parse_parameters(text) == {"Prompt": "a cat\non two lines", "Negative prompt": "dog", "Steps": "2",
                                      "Model": 'a, b: "c"', "Seed": "3", "Size": "64x64"}
    assert parse_parameters("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}
