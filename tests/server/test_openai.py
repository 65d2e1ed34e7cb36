"""OpenAI's Images API (/v1) over real HTTP: the real `openai` client, and the error bodies it expects."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.server.conftest import call, decode_png, pixels

PROMPT = "a yellow triangle"


def client(server, api_key: str = "unused"):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0)


def png_file(image: Image.Image, name: str) -> tuple[str, bytes, str]:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return (name, out.getvalue(), "image/png")


def test_generations_with_the_openai_client(live_server, reference):
    api = client(live_server)
    result = api.images.generate(prompt=PROMPT, n=2, size="64x64", response_format="b64_json",
                                 extra_body={"seed": 21, "steps": 5, "negative_prompt": "red", "guidance_scale": 4.0})
    assert len(result.data) == 2
    for i, item in enumerate(result.data):
        image = decode_png(item.b64_json)
        expected = reference(PROMPT, seed=21 + i, num_inference_steps=5, negative_prompt="red", guidance_scale=4.0).images[0]
        assert np.array_equal(pixels(image), pixels(expected))
        assert f"Seed: {21 + i}" in image.info["parameters"]


def test_generations_as_urls_served_by_the_server(live_server):
    result = client(live_server).images.generate(prompt=PROMPT, model="dall-e-3", size="64x64", response_format="url",
                                                 extra_body={"steps": 2})
    url = result.data[0].url
    assert url.startswith(live_server.url + "/api/jobs/")
    reply = call("GET", url)
    assert reply.status == 200 and decode_png(reply.body).size == (64, 64)


def test_models_and_choosing_one(live_server):
    api = client(live_server)
    assert [m.id for m in api.models.list()] == ["shapes", "second"]
    image = decode_png(api.images.generate(prompt=PROMPT, model="second", extra_body={"steps": 2, "seed": 1}).data[0].b64_json)
    assert "Sampler: Euler," in image.info["parameters"]  # the second folder's own scheduler


def test_edits_repaint_the_transparent_pixels(live_server, reference):
    api = client(live_server)
    picture = Image.new("RGB", (64, 64), (0, 90, 200))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (8, 8, 40, 40))  # transparent: repaint
    result = api.images.edit(image=png_file(picture, "image.png"), mask=png_file(mask, "mask.png"), prompt=PROMPT, n=1,
                             size="64x64", extra_body={"seed": 4, "steps": 6})
    repaint = Image.new("L", (64, 64), 0)
    repaint.paste(255, (8, 8, 40, 40))
    expected = reference(PROMPT, seed=4, num_inference_steps=6, image=picture, mask_image=repaint, width=64, height=64).images[0]
    assert np.array_equal(pixels(decode_png(result.data[0].b64_json)), pixels(expected))
    # Without a mask, the image's own transparent pixels are repainted.
    holed = picture.convert("RGBA")
    holed.paste((0, 0, 0, 0), (8, 8, 40, 40))
    result = api.images.edit(image=png_file(holed, "holed.png"), prompt=PROMPT, extra_body={"seed": 4, "steps": 6})
    assert decode_png(result.data[0].b64_json).size == (64, 64)


def test_errors_are_openai_shaped(live_server):
    openai = pytest.importorskip("openai")
    api = client(live_server)
    with pytest.raises(openai.BadRequestError) as caught:
        api.images.generate(prompt=PROMPT, size="huge")
    assert caught.value.body["param"] == "size" and "WIDTHxHEIGHT" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError) as caught:
        api.images.generate(prompt=PROMPT, model="no-such-model")
    assert caught.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as caught:
        api.images.edit(image=png_file(Image.new("RGB", (64, 64)), "opaque.png"), prompt=PROMPT)
    assert caught.value.body["param"] == "mask"


@pytest.mark.parametrize("body, param", [
    ({"prompt": PROMPT, "n": 0}, "n"),
    ({"prompt": PROMPT, "n": 99}, "n"),
    ({"prompt": PROMPT, "size": "64x3"}, "size"),
    ({"prompt": PROMPT, "size": "99999x64"}, "size"),
    ({"prompt": PROMPT, "response_format": "jpeg"}, "response_format"),
    ({"prompt": ""}, "prompt"),
    ({}, "prompt"),
    ({"prompt": PROMPT, "steps": -1}, "steps"),
])
def test_raw_errors_name_the_param(live_server, body, param):
    reply = call("POST", f"{live_server.url}/v1/images/generations", body)
    assert 400 <= reply.status < 500
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"], error
