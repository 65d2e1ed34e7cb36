"""The job API (/api) over real HTTP: submit, status, images equal to leansd's own, batches' seeds, the
progress stream with previews, cancel, and refusals that name the field."""
from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from tests.server.conftest import call, decode_png, pixels, png_b64, wait_until

PROMPT = "a red circle on a blue background"


def finished(server, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = call("GET", f"{server.url}/api/jobs/{job_id}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} did not finish: {job}"
        time.sleep(0.02)


def submit(server, **request) -> dict:
    reply = call("POST", f"{server.url}/api/jobs", request)
    assert reply.status == 202, reply.body
    return reply.json()


def test_models_lists_both_folders_with_defaults_and_limits(live_server):
    data = call("GET", f"{live_server.url}/api/models").json()
    names = [m["name"] for m in data["models"]]
    assert names == ["shapes", "second"]
    first = data["models"][0]
    assert first["default"] is True and data["models"][1]["default"] is False
    assert (first["width"], first["height"], first["steps"], first["sampler"]) == (64, 64, 20, "DDIM")
    assert first["tiny_vae"] is False and first["inpainting"] is False
    assert first["aliases"][0] == "leansd-shapes" and first["aliases"][1].startswith("shapes [")  # infotext name, A1111 title
    assert {"Euler a", "Euler", "DDIM", "PLMS", "LMS", "DPM++ 2M", "DPM++ 2M Karras", "LCM"} <= {s["name"] for s in data["samplers"]}
    assert data["limits"]["max_batch"] == 8


def test_batch_images_equal_leansd_with_seed_plus_i(live_server, reference):
    accepted = submit(live_server, prompt=PROMPT, seed=1234, steps=6, batch_size=3, sampler="Euler a", guidance_scale=6.0)
    assert accepted["status"] == "queued" and isinstance(accepted["position"], int)
    job = finished(live_server, accepted["id"])
    assert job["status"] == "done", job
    assert [image["seed"] for image in job["images"]] == [1234, 1235, 1236]
    assert job["request"]["seed"] == 1234 and job["request"]["sampler"] == "Euler a" and job["step"] == job["total"] == 18
    for i, entry in enumerate(job["images"]):
        reply = call("GET", live_server.url + entry["url"])
        assert reply.status == 200 and reply.headers["content-type"] == "image/png"
        image = decode_png(reply.body)
        expected = reference(PROMPT, seed=1234 + i, num_inference_steps=6, scheduler="euler_a", guidance_scale=6.0).images[0]
        assert np.array_equal(pixels(image), pixels(expected)), f"image {i} differs from leansd.load()(...) with seed {1234 + i}"
        assert image.info["parameters"] == entry["infotext"]
        assert f"Seed: {1234 + i}" in entry["infotext"] and "Sampler: Euler a" in entry["infotext"]


def test_img2img_and_inpaint_equal_leansd(live_server, reference):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    job = finished(live_server, submit(live_server, prompt=PROMPT, seed=7, steps=8, init_image="data:image/png;base64," + png_b64(init),
                                       strength=0.6)["id"])
    expected = reference(PROMPT, seed=7, num_inference_steps=8, image=init, strength=0.6).images[0]
    assert np.array_equal(pixels(decode_png(call("GET", live_server.url + job["images"][0]["url"]).body)), pixels(expected))
    assert job["request"]["init_image"] is True and job["request"]["strength"] == 0.6
    job = finished(live_server, submit(live_server, prompt=PROMPT, seed=8, steps=8, init_image=png_b64(init), mask=png_b64(mask))["id"])
    expected = reference(PROMPT, seed=8, num_inference_steps=8, image=init, mask_image=mask).images[0]
    assert np.array_equal(pixels(decode_png(call("GET", live_server.url + job["images"][0]["url"]).body)), pixels(expected))
    holes = Image.new("RGBA", (64, 64), (255, 255, 255, 255))  # transparent = repaint, whatever the colour
    holes.paste((0, 0, 0, 0), (16, 16, 48, 48))
    job = finished(live_server, submit(live_server, prompt=PROMPT, seed=8, steps=8, init_image=png_b64(init), mask=png_b64(holes))["id"])
    assert np.array_equal(pixels(decode_png(call("GET", live_server.url + job["images"][0]["url"]).body)), pixels(expected))


def test_second_model_is_used_when_named(live_server, second_model):
    import leansd

    job = finished(live_server, submit(live_server, prompt=PROMPT, seed=3, steps=5, model="second")["id"])
    assert job["request"]["model"] == "second" and job["request"]["sampler"] == "Euler"
    expected = leansd.load(second_model)(PROMPT, seed=3, num_inference_steps=5).images[0]
    assert np.array_equal(pixels(decode_png(call("GET", live_server.url + job["images"][0]["url"]).body)), pixels(expected))


def test_random_seed_is_reported(live_server):
    job = finished(live_server, submit(live_server, prompt=PROMPT, seed=-1, steps=2)["id"])
    assert 0 <= job["request"]["seed"] < 2**32 and job["images"][0]["seed"] == job["request"]["seed"]


def read_events(url: str, timeout: float = 60.0) -> list[tuple[str, dict]]:
    events, name = [], None
    with urllib.request.urlopen(url, timeout=timeout) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if name in ("done", "failed", "cancelled"):
                    return events
    return events


def test_event_stream_reports_status_progress_previews_and_done(start_server):
    server = start_server(step_delay=0.02)
    job = submit(server, prompt=PROMPT, seed=1, steps=10, batch_size=2)
    events = read_events(f"{server.url}/api/jobs/{job['id']}/events")
    assert events[0][0] == "status" and events[0][1]["id"] == job["id"]
    progress = [data for name, data in events if name == "progress"]
    assert len(progress) >= 5
    steps = [p["step"] for p in progress]
    assert steps == sorted(steps) and all(p["total"] == 20 for p in progress)
    assert progress[0]["preview"].startswith("data:image/png;base64,")
    preview = decode_png(progress[0]["preview"].split(",", 1)[1])
    assert preview.size == (64, 64)
    assert events[-1][0] == "done" and len(events[-1][1]["images"]) == 2
    # A finished job's stream is one status event and the final one.
    again = read_events(f"{server.url}/api/jobs/{job['id']}/events")
    assert [name for name, _ in again] == ["status", "done"]


def test_preview_png_while_running(start_server):
    server = start_server(step_delay=0.05)
    job = submit(server, prompt=PROMPT, seed=2, steps=30)
    assert call("GET", f"{server.url}/api/jobs/{job['id']}/preview.png").status in (200, 404)  # 404 before the first step
    wait_until(lambda: call("GET", f"{server.url}/api/jobs/{job['id']}").json()["step"] >= 2, what="two steps")
    reply = call("GET", f"{server.url}/api/jobs/{job['id']}/preview.png")
    assert reply.status == 200 and decode_png(reply.body).size == (64, 64)
    call("POST", f"{server.url}/api/jobs/{job['id']}/cancel")


def test_cancel_running_and_queued_jobs(start_server):
    server = start_server(step_delay=0.05)
    running = submit(server, prompt=PROMPT, seed=1, steps=40, batch_size=2)
    queued = submit(server, prompt=PROMPT, seed=2, steps=40)
    assert queued["position"] == 1
    wait_until(lambda: call("GET", f"{server.url}/api/jobs/{running['id']}").json()["step"] >= 2, what="the first job to run")
    cancelled = call("DELETE", f"{server.url}/api/jobs/{queued['id']}").json()
    assert cancelled["status"] == "cancelled" and cancelled["step"] == 0
    reply = call("POST", f"{server.url}/api/jobs/{running['id']}/cancel")
    assert reply.status == 200
    job = finished(server, running["id"], timeout=10)
    assert job["status"] == "cancelled" and job["images"] == [] and job["step"] < 40
    listed = call("GET", f"{server.url}/api/jobs").json()["jobs"]
    assert [j["id"] for j in listed[:2]] == [queued["id"], running["id"]]  # newest first
    # The worker goes on with new jobs.
    assert finished(server, submit(server, prompt=PROMPT, steps=2)["id"])["status"] == "done"


@pytest.mark.parametrize("request_fields, field", [
    ({"steps": 0}, "steps"),
    ({"steps": 10_000}, "steps"),
    ({"batch_size": 100}, "batch_size"),
    ({"width": 61}, "width"),
    ({"width": 100_000}, "width"),
    ({"height": -8}, "height"),
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"strength": 2, "init_image": "x"}, "init_image"),
    ({"init_image": "bm90IGFuIGltYWdl"}, "init_image"),
    ({"mask": "bm90IGFuIGltYWdl"}, "mask"),
    ({"sampler": "k_heun_imaginary"}, "sampler"),
    ({"model": "nope"}, "model"),
    ({"seed": 2**64}, "seed"),
    ({"steps": "many"}, "steps"),
    ({"prompt": None}, "prompt"),
])
def test_bad_requests_name_the_field(live_server, request_fields, field):
    reply = call("POST", f"{live_server.url}/api/jobs", {"prompt": PROMPT, **request_fields})
    assert 400 <= reply.status < 500, reply.body
    body = reply.json()
    assert body["field"] == field, body
    assert field.split("_")[0] in body["error"] or field in body["error"] or "model" in body["error"]


def test_strength_out_of_range_names_strength(live_server):
    init = png_b64(Image.new("RGB", (64, 64)))
    body = call("POST", f"{live_server.url}/api/jobs", {"prompt": PROMPT, "init_image": init, "strength": 1.5}).json()
    assert body["field"] == "strength" and "strength" in body["error"]


def test_unknown_job_and_image_are_404(live_server):
    assert call("GET", f"{live_server.url}/api/jobs/0123").status == 404
    job = finished(live_server, submit(live_server, prompt=PROMPT, steps=1)["id"])
    assert call("GET", f"{live_server.url}/api/jobs/{job['id']}/images/5.png").status == 404
    assert call("GET", f"{live_server.url}/no/such/route").json()["error"].startswith("no such route")


def test_page_is_served(live_server):
    reply = call("GET", live_server.url + "/")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/html")
