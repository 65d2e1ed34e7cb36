"""One benchmark measurement in a fresh process (bench.py starts one per configuration).

    python perf/worker.py SPEC.json [SPAWN_TIME]

SPEC names the peer kind (leansd, diffusers, optimum-ort, optimum-ov), its model folder and options and the
generation settings. SPAWN_TIME is the wall-clock time at which bench.py started this process; without it the
kernel's record of the process start is used (psutil), so a worker can be rerun by hand. The worker

  1. imports the peer's library and loads the pipeline as a user would,
  2. generates whole images (the first is the cold one: spawn -> first image),
  3. times the text encoder (1 prompt), one UNet call at batch 2 (classifier-free guidance) and one VAE
     decode, each `repeats` times after one warm-up call, on the peer's own component objects,
  4. writes result.json (and the first image as image.npy) into the spec's out_dir.

Peak RSS of the whole process is taken by bench.py from the kernel (wait4); the worker adds the peak as it
stood after loading and after the first image (getrusage, self). No library internals are patched except a
pass-through wrapper that counts the UNet calls of each image.
"""
from __future__ import annotations

import time

T_MAIN = time.time()

import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

# kind -> (module, prefix of its StableDiffusionPipeline / StableDiffusionXLPipeline class)
PIPELINE_CLASSES = {"diffusers": ("diffusers", ""), "optimum-ort": ("optimum.onnxruntime", "ORT"), "optimum-ov": ("optimum.intel", "OV")}
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")[:300]


class CallTimer:
    """Wraps a bound method: counts and times calls, returns what the method returns."""

    def __init__(self, fn):
        self.fn = fn
        self.times: list[float] = []

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.times.append(time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- adapters
class LeansdPeer:
    """leansd's own runtime: no torch in this process."""

    def __init__(self, spec: dict):
        t0 = time.perf_counter()
        import numpy as np

        import leansd

        self.np = np
        self.import_s = time.perf_counter() - t0
        opts = spec["options"]
        t0 = time.perf_counter()
        self.pipe = leansd.load(
            spec["folder"],
            backend=opts["backend"],
            precision=opts.get("precision", "fp32"),
            low_memory=bool(opts.get("low_memory")),
            num_threads=opts.get("num_threads"),
            cache_dir=opts.get("cache_dir"),
            deep_cache=opts.get("deep_cache"),
            tiny_vae=bool(opts.get("tiny_vae")),
            guidance_cutoff=float(opts.get("guidance_cutoff", 1.0)),
            token_merging=bool(opts.get("token_merging")),
        )
        self.load_s = time.perf_counter() - t0
        # A run may change the folder's scheduler config (SDXL-Turbo's trailing timesteps on the SDXL base folder): the
        # pipeline plans every generation from this dict, as if the folder's scheduler_config.json said so.
        self.pipe.bundle.scheduler_config.update(spec["run"].get("scheduler_config") or {})
        self.low_memory = bool(opts.get("low_memory"))
        self.deep_cache = int(opts.get("deep_cache") or 1)
        self.num_threads = opts.get("num_threads")
        models = self.pipe.models
        self.denoiser = models.denoiser.variant(bool(opts.get("token_merging")))  # the graphs its generations run
        self.decoder = models.tiny_vae_decoder if opts.get("tiny_vae") else models.vae_decoder
        if self.deep_cache > 1:
            # One call per step, whether it refreshes the deep features or reuses them.
            from leansd.runtime import denoiser

            self.unet_timer = timer = CallTimer(denoiser.DenoiserRun.predict)
            denoiser.DenoiserRun.predict = lambda run, *args: timer(run, *args)
        else:
            self.unet_timer = CallTimer(self.denoiser.unet.predict)
            self.denoiser.unet.predict = self.unet_timer
        # The timed UNet "step" of a deep-cache row is one refresh cycle (1 full + N-1 shallow calls) / N.
        self.unet_divisor = self.deep_cache

    def threads(self) -> dict:
        return {"num_threads": self.num_threads or "backend default"}

    def image(self, run: dict, seed: int):
        out = self.pipe(
            PROMPT,
            num_inference_steps=run["steps"],
            guidance_scale=run["guidance_scale"],
            height=run["height"],
            width=run["width"],
            seed=seed,
            output_type="np",
            **({"scheduler": run["scheduler"]} if run.get("scheduler") else {}),
        )
        return self.np.asarray(out.images, dtype=self.np.float32)

    def precision(self) -> dict:
        precision = self.pipe.precision
        if precision == "int8" and self.pipe.backend == "openvino":
            # OpenVINO int8 files keep float operations (all of them in weight-only files), run in bf16 where native.
            from leansd.runtime.backends.openvino import cpu_precision_hint

            precision = f"int8 weights, {cpu_precision_hint('bf16-if-native')} float operations"
        return {"precision": precision, "precision_reason": self.pipe.precision_reason}

    def micro(self, run: dict):
        """(text encoder, UNet, VAE decode) callables on fixed inputs, as the pipeline feeds them."""
        from leansd.runtime import guidance_embedding

        np, pipe = self.np, self.pipe
        prompt_encoder, denoiser = pipe.models.prompt_encoder, self.denoiser
        if len(prompt_encoder.encoders) > 1:  # SDXL: both encoders (penultimate layers, pooled embedding), as the pipeline
            def text():
                return prompt_encoder.encode([PROMPT])
        else:
            text_encoder, ids = prompt_encoder.encoders[0], prompt_encoder.tokenizers[0]([PROMPT])

            def text():
                return {"encoder_hidden_states": text_encoder.encode(ids).hidden}
        cond = text()
        self.release("text_encoder")
        batch = int(run.get("unet_batch", 2))  # 1 for LCM-distilled UNets, which take guidance as an input
        emb2 = {name: np.concatenate([v] * batch) for name, v in cond.items()}
        if pipe.bundle.unet_config.get("addition_embed_type") == "text_time":  # SDXL's micro-conditioning, its defaults
            h, w = run["height"], run["width"]
            emb2["time_ids"] = np.tile(np.asarray([h, w, 0, 0, h, w], dtype=np.float32), (batch, 1))
        if width := guidance_embedding.width(pipe.bundle.unet_config):
            emb2[guidance_embedding.INPUT] = guidance_embedding.embed(run["guidance_scale"], width, batch)
        f = pipe.vae_scale_factor
        rng = np.random.default_rng(0)
        shape = (batch, pipe.unet.in_channels, run["height"] // f, run["width"] // f)
        sample = rng.standard_normal(shape, dtype=np.float32)
        latents = sample[:1].copy()
        # Low-memory mode runs a guided step as two calls of batch 1 and decodes large images in tiles: time what it runs.
        split = denoiser.split_guidance
        tiled = self.low_memory and self.decoder is pipe.models.vae_decoder
        if self.deep_cache > 1:
            def unet():
                features = denoiser.deep.predict(sample, 500, emb2)["deep_features"]
                for _ in range(self.deep_cache - 1):
                    denoiser.shallow.predict(sample, 500, {**emb2, "deep_features": features})
        else:
            fn = self.unet_timer.fn

            def unet():
                if split and batch == 2:
                    return [fn(sample[i : i + 1], 500, {k: v[i : i + 1] for k, v in emb2.items()}) for i in (0, 1)]
                return fn(sample, 500, emb2)
        return text, unet, lambda: self.decoder.decode(latents, tiled=tiled)

    def release(self, component: str) -> None:
        """In low-memory mode only one model is loaded at a time, during the component timings too."""
        if self.low_memory:
            models = self.pipe.models
            if component == "unet":
                for unet in (self.denoiser.unet, self.denoiser.deep, self.denoiser.shallow):
                    if unet is not None:
                        unet.session.close()
            elif component == "text_encoder":
                for encoder in models.prompt_encoder.encoders:
                    encoder.session.close()
            else:
                self.decoder.session.close()


class DiffusersLikePeer:
    """diffusers' StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL) and Optimum's subclasses of it (ONNX Runtime,
    OpenVINO)."""

    def __init__(self, spec: dict):
        kind, opts = spec["kind"], spec["options"]
        self.sdxl = spec["run"].get("pipeline") == "sdxl"
        t0 = time.perf_counter()
        import numpy as np
        import torch

        module, prefix = PIPELINE_CLASSES[kind]
        cls = getattr(importlib.import_module(module), prefix + ("StableDiffusionXLPipeline" if self.sdxl else "StableDiffusionPipeline"))
        self.np, self.torch = np, torch
        self.import_s = time.perf_counter() - t0
        if opts.get("num_threads"):
            torch.set_num_threads(int(opts["num_threads"]))
        run = spec["run"]
        t0 = time.perf_counter()
        # SDXL pipelines add an invisible watermark (invisible-watermark installed); leansd only when asked: off here.
        extra = {"add_watermarker": False} if self.sdxl else {}
        if kind == "diffusers":
            no_checker = {} if self.sdxl else {"safety_checker": None, "requires_safety_checker": False}  # SDXL has none
            pipe = cls.from_pretrained(spec["folder"], torch_dtype=torch.float32, **no_checker, **extra)
        elif kind == "optimum-ort":
            pipe = cls.from_pretrained(spec["folder"], **extra)
        else:
            # What Optimum Intel's documentation recommends for CPU: load, reshape to the static size, compile.
            # With a cache folder, OpenVINO keeps the compiled models there (Optimum Intel's `ov_config`).
            ov_config = {"CACHE_DIR": opts["cache_dir"]} if opts.get("cache_dir") else {}
            if opts.get("inference_precision"):  # unset: OpenVINO's default, bf16 on CPUs with native bf16
                ov_config["INFERENCE_PRECISION_HINT"] = opts["inference_precision"]
            pipe = cls.from_pretrained(spec["folder"], compile=False, **({"ov_config": ov_config} if ov_config else {}), **extra)
            if opts.get("static", True):
                pipe.reshape(batch_size=1, height=run["height"], width=run["width"], num_images_per_prompt=1)
            pipe.compile()
        pipe.set_progress_bar_config(disable=True)
        if run.get("scheduler"):  # the same scheduler leansd is asked for, from the model's scheduler config
            import diffusers

            classes = {"lcm": "LCMScheduler", "euler": "EulerDiscreteScheduler"}
            if run["scheduler"] not in classes:
                raise ValueError(f"the benchmark sets only {', '.join(classes)} on diffusers-like peers, not {run['scheduler']!r}")
            overrides = run.get("scheduler_config") or {}  # e.g. SDXL-Turbo's trailing timesteps
            pipe.scheduler = getattr(diffusers, classes[run["scheduler"]]).from_config(pipe.scheduler.config, **overrides)
        self.load_s = time.perf_counter() - t0
        self.pipe = pipe
        self.unet_timer = CallTimer(pipe.unet.forward)
        pipe.unet.forward = self.unet_timer

    def threads(self) -> dict:
        return {"torch_threads": self.torch.get_num_threads()}

    def precision(self) -> dict:
        """What OpenVINO computes in (Optimum Intel peers): the compiled UNet's inference precision."""
        request = getattr(getattr(self.pipe, "unet", None), "request", None)
        if request is None or not hasattr(request, "get_property"):
            return {}
        try:
            value = request.get_property("INFERENCE_PRECISION_HINT")
            return {"precision": value.to_string() if hasattr(value, "to_string") else str(value)}
        except Exception:  # noqa: BLE001 - only informative
            return {}

    def image(self, run: dict, seed: int):
        torch = self.torch
        generator = torch.Generator("cpu").manual_seed(seed)
        with torch.inference_mode():
            out = self.pipe(
                PROMPT,
                num_inference_steps=run["steps"],
                guidance_scale=run["guidance_scale"],
                height=run["height"],
                width=run["width"],
                generator=generator,
                output_type="np",
            )
        return self.np.asarray(out.images, dtype=self.np.float32)

    def micro(self, run: dict):
        torch, pipe = self.torch, self.pipe
        if self.sdxl:  # both encoders, as the pipeline runs them (tokenizing included, as leansd's SDXL timing)
            def text():
                return pipe.encode_prompt(PROMPT, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False)
        else:
            tok = pipe.tokenizer
            ids = tok(PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids

            def text():
                return (pipe.text_encoder(ids)[0],)
        with torch.inference_mode():
            encoded = text()
        batch = int(run.get("unet_batch", 2))  # 1 for LCM-distilled UNets, which take guidance as an input
        emb2 = torch.cat([encoded[0]] * batch)
        added = {}
        if width := pipe.unet.config.get("time_cond_proj_dim"):  # the pipeline's own embedding of the scale
            added["timestep_cond"] = pipe.get_guidance_scale_embedding(torch.full((batch,), run["guidance_scale"] - 1.0), embedding_dim=width)
        if self.sdxl:  # the pooled embedding and the default micro-conditioning (original = target size, no crop)
            h, w = run["height"], run["width"]
            added = {"added_cond_kwargs": {"text_embeds": torch.cat([encoded[2], encoded[2]]),
                                           "time_ids": torch.tensor([[h, w, 0, 0, h, w]] * 2, dtype=torch.float32)}}
        f = pipe.vae_scale_factor
        gen = torch.Generator("cpu").manual_seed(0)
        sample = torch.randn((batch, pipe.unet.config.in_channels, run["height"] // f, run["width"] // f), generator=gen)
        latents = sample[:1] / pipe.vae.config.scaling_factor
        t = torch.tensor(500, dtype=torch.int64)
        unet = self.unet_timer.fn

        def inference(fn):
            def call():
                with torch.inference_mode():
                    return fn()

            return call

        return (
            inference(text),
            inference(lambda: unet(sample, t, encoder_hidden_states=emb2, **added)[0]),
            inference(lambda: pipe.vae.decode(latents, return_dict=False)[0]),
        )

    def release(self, component: str) -> None:
        pass


def time_calls(fn, repeats: int) -> list[float]:
    fn()  # warm-up: first-call allocations, lazy compilation, a low-memory reload
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------------- main
def process_start_time() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except ImportError:
        return T_MAIN


def measure(spec: dict, result: dict, spawn: float) -> None:
    run = spec["run"]
    out_dir = Path(spec["out_dir"])
    result["interpreter_start_s"] = T_MAIN - spawn
    peer = LeansdPeer(spec) if spec["kind"] == "leansd" else DiffusersLikePeer(spec)
    result["import_s"] = peer.import_s
    result["load_s"] = peer.load_s
    result["ready_s"] = time.time() - spawn
    result["rss_ready_mb"] = peak_rss_mb()
    result["threads"] = peer.threads()
    result.update(peer.precision())

    images = []
    for i in range(int(run.get("images", 1))):
        peer.unet_timer.times.clear()
        t0 = time.perf_counter()
        img = peer.image(run, seed=int(run.get("seed", 0)))
        elapsed = time.perf_counter() - t0
        images.append({"image_s": elapsed, "unet_calls": len(peer.unet_timer.times), "unet_call_s": list(peer.unet_timer.times)})
        if i == 0:
            result["cold_s"] = time.time() - spawn
            result["first_image_s"] = elapsed
            result["rss_first_image_mb"] = peak_rss_mb()
            import numpy as np

            np.save(out_dir / "image.npy", img)
            result["image_finite"] = bool(np.isfinite(img).all())
            result["image_mean"] = float(np.nanmean(img))
    result["images"] = images
    if len(images) > 1:
        result["warm_image_s"] = statistics.median(im["image_s"] for im in images[1:])
    if images:
        result["unet_calls_per_image"] = images[0]["unet_calls"]

    repeats = int(run.get("repeats", 0))
    if repeats > 0:
        text_fn, unet_fn, vae_fn = peer.micro(run)
        for name, fn, component in (
            ("text_encoder", text_fn, "text_encoder"),
            ("unet_step", unet_fn, "unet"),
            ("vae_decode", vae_fn, "vae_decoder"),
        ):
            times = time_calls(fn, repeats)
            if name == "unet_step":
                times = [t / getattr(peer, "unet_divisor", 1) for t in times]
            peer.release(component)
            result[f"{name}_samples_s"] = times
            result[f"{name}_s"] = statistics.median(times)
            result[f"peak_rss_after_{name}_mb"] = peak_rss_mb()  # which stage set the peak
    result["rss_self_peak_mb"] = peak_rss_mb()
    result["major_page_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_majflt  # weights read back from disk


def main(argv: list[str]) -> int:
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    spawn = float(argv[1]) if len(argv) > 1 else process_start_time()
    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"peer": spec["peer"], "ok": False, "pid": os.getpid()}
    code = 0
    try:
        measure(spec, result, spawn)
        result["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - reported in the table as one line
        traceback.print_exc()
        result["error"] = one_line(exc)
        code = 1
    result["wall_s"] = time.time() - spawn
    (out_dir / "result.json").write_text(json.dumps(result, indent=1))
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
