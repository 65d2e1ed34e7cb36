"""Print the max-abs image difference between leansd and diffusers for every scheduler and backend.

A tiny SD 1.x model with random weights, 20 steps, guidance 7.5, seed 42; txt2img at 32x32 and img2img at
strength 0.6. Run from the repository root with the development environment:

    .venv-dev/bin/python scripts/parity_report.py [WORK_DIR]
"""
import sys, tempfile
import numpy as np, torch, diffusers, leansd
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.tiny_models import build_tiny_sd
from leansd.export import export_model
root = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="leansd-parity-"))
src = root / "tiny"; out = root / "tiny-leansd"
if not src.exists(): build_tiny_sd(src)
if not out.exists(): export_model(src, out, progress=False)
S = {"ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {}), "euler": ("EulerDiscreteScheduler", {}),
     "euler_a": ("EulerAncestralDiscreteScheduler", {}), "dpm++2m": ("DPMSolverMultistepScheduler", {}),
     "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}), "lms": ("LMSDiscreteScheduler", {}), "lcm": ("LCMScheduler", {})}
pipes = {b: leansd.load(out, backend=b) for b in ("onnxruntime", "openvino")}
print("| scheduler | txt2img ORT | txt2img OV | img2img ORT | img2img OV |\n|---|---|---|---|---|")
init = np.random.default_rng(1).uniform(0, 1, (32, 32, 3)).astype(np.float32)
for name, (cls, extra) in S.items():
    row = [name]
    for img2img in (False, True):
        C = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
        ref = C.from_pretrained(src, safety_checker=None, requires_safety_checker=False); ref.set_progress_bar_config(disable=True)
        ref.scheduler = getattr(diffusers, cls).from_config(ref.scheduler.config, **extra)
        kw = dict(prompt="a red circle on a blue background", num_inference_steps=20, guidance_scale=7.5)
        if img2img: kw.update(image=init[None], strength=0.6)
        else: kw.update(height=32, width=32)
        with torch.no_grad(): e = ref(**kw, generator=torch.Generator("cpu").manual_seed(42), output_type="np").images
        if img2img: kw["image"] = init
        for b, p in pipes.items():
            g = p(**kw, seed=42, scheduler=name, output_type="np").images
            row.append(f"{np.abs(g - e).max():.1e}")
    print("| " + " | ".join(row) + " |", flush=True)
