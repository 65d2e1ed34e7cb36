"""Load test of sd-serve: N requests from C concurrent clients against a real server on the bundled model.

The requests rotate through the three APIs (AUTOMATIC1111 txt2img, OpenAI generations, the job API's submit +
event stream + image download), each with its own seed; every answer must carry its own image (the PNG's
`parameters` name the request's seed and prompt). Writes perf/RESULTS-serve.md.

    .venv-runtime/bin/python perf/serve_load.py                         # 200 requests, 8 clients
    .venv-runtime/bin/python perf/serve_load.py --requests 24 --clients 4 --output /tmp/serve.md
    .venv-runtime/bin/python perf/serve_load.py --url http://127.0.0.1:7860   # against a running server
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APIS = ("a1111", "openai", "jobs")


@dataclass
class Outcome:
    api: str
    seed: int
    latency: float
    ok: bool
    problem: str = ""


@dataclass
class LoadResult:
    requests: int
    clients: int
    steps: int
    wall: float
    outcomes: list[Outcome] = field(default_factory=list)
    load_at_start: float = 0.0

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def latency(self, q: float, api: str | None = None) -> float:
        values = sorted(o.latency for o in self.outcomes if o.ok and api in (None, o.api))
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")

    @property
    def throughput(self) -> float:
        return sum(o.ok for o in self.outcomes) / self.wall


def _post(url: str, body: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _get(url: str, timeout: float = 600) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _parameters(png: bytes) -> str:
    from PIL import Image

    return Image.open(io.BytesIO(png)).info.get("parameters", "")


def one_request(base: str, api: str, seed: int, steps: int) -> Outcome:
    prompt = f"load test request {seed}"
    start = time.perf_counter()
    try:
        if api == "a1111":
            data = _post(f"{base}/sdapi/v1/txt2img", {"prompt": prompt, "seed": seed, "steps": steps, "sampler_name": "Euler a"})
            png = base64.b64decode(data["images"][0])
        elif api == "openai":
            data = _post(f"{base}/v1/images/generations", {"prompt": prompt, "seed": seed, "steps": steps})
            png = base64.b64decode(data["data"][0]["b64_json"])
        else:
            job = _post(f"{base}/api/jobs", {"prompt": prompt, "seed": seed, "steps": steps})
            final = None
            with urllib.request.urlopen(f"{base}/api/jobs/{job['id']}/events", timeout=600) as stream:
                event = None
                for raw in stream:
                    line = raw.decode().strip()
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event in ("done", "failed", "cancelled"):
                        final = json.loads(line[6:])
                        break
            if final is None or final["status"] != "done":
                raise RuntimeError(f"job ended as {final and final['status']}: {final and final['error']}")
            png = _get(base + final["images"][0]["url"])
        latency = time.perf_counter() - start
        text = _parameters(png)
        if f"Seed: {seed}," not in text or not text.startswith(prompt):
            return Outcome(api, seed, latency, False, f"the image is not this request's: {text[:80]!r}")
        return Outcome(api, seed, latency, True)
    except (urllib.error.URLError, OSError, KeyError, ValueError, RuntimeError) as exc:
        body = exc.read().decode()[:200] if isinstance(exc, urllib.error.HTTPError) else ""
        return Outcome(api, seed, time.perf_counter() - start, False, f"{type(exc).__name__}: {exc} {body}")


def run_load(base: str, requests: int, clients: int, steps: int = 20) -> LoadResult:
    """Send `requests` requests from `clients` threads; each thread sends its next request when the last returns."""
    load, start = os.getloadavg()[0], time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(lambda i: one_request(base, APIS[i % 3], 1000 + i, steps), range(requests)))
    return LoadResult(requests, clients, steps, time.perf_counter() - start, outcomes, load)


def jobs_on_server(base: str) -> dict[str, int]:
    jobs = json.loads(_get(f"{base}/api/jobs"))["jobs"]
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job["status"]] = counts.get(job["status"], 0) + 1
    return counts


def server_generation_time(base: str) -> float:
    """Median seconds a job ran on the server (started to finished): the generation without queueing or HTTP."""
    jobs = json.loads(_get(f"{base}/api/jobs"))["jobs"]
    return statistics.median(j["finished"] - j["started"] for j in jobs if j["status"] == "done")


def in_process_time(steps: int, runs: int = 5) -> float:
    """Median seconds of the same generation with `leansd.load()` in this process, without a server."""
    import leansd

    pipe = leansd.load()
    pipe("warm-up", seed=0, num_inference_steps=steps)
    times = []
    for i in range(runs):
        start = time.perf_counter()
        pipe(f"load test request {i}", seed=i, num_inference_steps=steps, scheduler="euler_a")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags] or ["no AVX2"]
    return f"{model}, {os.cpu_count()} logical CPUs, {' '.join(isa)}; Python {platform.python_version()}, {platform.system()}"


def start_server(history: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-m", "leansd.server", "--port", str(port), "--history", str(history),
                                "--max-queue", "64"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            _get(f"{base}/api/models", timeout=2)
            return process, base
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise SystemExit("sd-serve did not start")
            time.sleep(0.2)


def report(result: LoadResult, single: float, server_jobs: dict[str, int], on_server: float = float("nan"),
           in_process: float = float("nan")) -> str:
    ms = lambda s: f"{s * 1000:.0f} ms"  # noqa: E731
    lines = [
        "# sd-serve under load", "",
        f"{result.requests} requests from {result.clients} concurrent clients, bundled model (64x64), {result.steps} steps, "
        "rotating through AUTOMATIC1111 txt2img, OpenAI generations and the job API (submit + event stream + image).", "",
        "| measure | value |", "| --- | --- |",
        f"| requests answered with their own image | {len(result.outcomes) - len(result.failed)} / {result.requests} |",
        f"| failed or lost | {len(result.failed)} |",
        f"| jobs on the server (with 6 warm-up and single runs) | {', '.join(f'{k}: {v}' for k, v in sorted(server_jobs.items()))} |",
        f"| latency p50 | {ms(result.latency(0.5))} |", f"| latency p95 | {ms(result.latency(0.95))} |",
        f"| latency max | {ms(result.latency(1.0))} |",
        f"| throughput | {result.throughput:.2f} images/s ({result.wall:.1f} s wall) |",
        f"| one request alone over HTTP (median of 5) | {ms(single)} |",
        f"| one job's generation on the server (median, started to finished) | {ms(on_server)} |",
        f"| the same generation with leansd.load() in one process (median of 5) | {ms(in_process)} |", "",
        "| API | p50 | p95 |", "| --- | --- | --- |",
        *[f"| {api} | {ms(result.latency(0.5, api))} | {ms(result.latency(0.95, api))} |" for api in APIS], "",
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average (1 min) at "
        f"the start: {result.load_at_start:.1f}, at the end: {os.getloadavg()[0]:.1f}"
        + (" (above the CPU count: other processes were competing for the cores, so every time here is longer than on "
           "an idle machine)." if max(result.load_at_start, os.getloadavg()[0]) > (os.cpu_count() or 1) else "."), "",
        "With one worker per model, jobs run one at a time: latency under load is queueing (about clients x the single-"
        "request time); throughput is one model's generation rate. Reproduce: `.venv-runtime/bin/python perf/serve_load.py`.", "",
    ]
    if result.failed:
        lines += ["Failures:", *[f"- {o.api} seed {o.seed}: {o.problem}" for o in result.failed[:20]], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--url", help="a running server (default: start one on the bundled model)")
    p.add_argument("--output", type=Path, default=REPO / "perf" / "RESULTS-serve.md")
    args = p.parse_args(argv)
    process, base = (None, args.url.rstrip("/")) if args.url else start_server(history=args.requests + 10)
    try:
        one_request(base, "a1111", 1, args.steps)  # warm-up
        single = statistics.median(one_request(base, APIS[i % 3], 10 + i, args.steps).latency for i in range(5))
        result = run_load(base, args.requests, args.clients, args.steps)
        server_jobs, on_server = jobs_on_server(base), server_generation_time(base)
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
    text = report(result, single, server_jobs, on_server, in_process_time(args.steps))
    tmp = args.output.with_name(f".{args.output.name}.tmp")
    tmp.write_text(text)
    tmp.replace(args.output)
    print(text)
    return 1 if result.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
