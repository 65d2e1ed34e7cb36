"""Scheduler parity: leansd's numpy schedulers against diffusers, step by step.

Both sides run the same analytic "UNet" (a numpy function of the scaled sample and the timestep) from the
same initial noise; timesteps must match exactly, samples and clean-sample estimates to 1e-5 relative at
every step. Schedulers that draw noise inside step() get a torch generator on the diffusers side and the
same draws from an identically seeded generator on ours.
"""
from __future__ import annotations

import dataclasses
import inspect
import json

import numpy as np
import pytest

pytestmark = [pytest.mark.needs_torch, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from leansd.runtime.schedulers import SCHEDULER_ALIASES, UnsupportedSchedulerOption, get_scheduler, scheduler_names  # noqa: E402
from leansd.runtime.schedulers.common import torch_linspace_f32  # noqa: E402

diffusers.utils.logging.set_verbosity_error()  # from_config warns about every foreign key

SD15 = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "_class_name": "PNDMScheduler",
}
SHAPE = (2, 4, 8, 8)
TOL = 1e-5
# Zero terminal SNR starts at sigma 4096 (alphas_cumprod floored at 2**-24): the reference's float32 arithmetic
# loses more there, and how much depends on which kernels torch picks for this CPU (1.26e-5 measured on an
# AVX-512 machine, under 1e-5 on AVX2). leansd computes in float64, so the difference is the reference's rounding.
TOL_ZERO_SNR = 3e-5
ALIAS_EXTRAS = {"dpm++2m_karras": {"use_karras_sigmas": True}, "plms": {"skip_prk_steps": True}}


def fake_unet(x: np.ndarray, t: float) -> np.ndarray:
    t = float(t)
    return (x * np.float32(t / (t + 1)) + np.float32(0.05) * np.sin(np.float32(3) * x)).astype(np.float32)


def start_arrays() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)


def run_diffusers(name: str, cfg: dict, n: int, strength: float, seed: int, eta: float):
    class_name = SCHEDULER_ALIASES.get(name, name)
    sched = getattr(diffusers, class_name).from_config({**cfg, **ALIAS_EXTRAS.get(name, {})})
    sched.set_timesteps(n)
    timesteps = sched.timesteps
    noise, clean = start_arrays()
    if strength < 1:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        t_start = max(n - min(int(n * strength), n), 0)  # diffusers' scheduler.order is 1 for every scheduler here
        timesteps = timesteps[t_start:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start)
        latents = sched.add_noise(torch.from_numpy(clean), torch.from_numpy(noise), timesteps[:1])
    else:
        latents = torch.from_numpy(noise) * sched.init_noise_sigma
    params = inspect.signature(sched.step).parameters
    kwargs = {"generator": torch.Generator("cpu").manual_seed(seed)} if "generator" in params else {}
    if eta:
        kwargs["eta"] = eta
    steps = []
    for t in timesteps:
        out = torch.from_numpy(fake_unet(sched.scale_model_input(latents, t).numpy(), t.item()))
        res = sched.step(out, t, latents, **kwargs)
        if getattr(res, "pred_original_sample", None) is not None:
            denoised = res.pred_original_sample.numpy()
        elif getattr(res, "denoised", None) is not None:
            denoised = res.denoised.numpy()
        elif hasattr(sched, "model_outputs"):  # DPM-Solver keeps its clean estimates
            denoised = sched.model_outputs[-1].numpy()
        else:  # PNDM reports none: the estimate this UNet call implies
            a = float(sched.alphas_cumprod[t])
            x, e = latents.double().numpy(), out.double().numpy()
            v = cfg.get("prediction_type") == "v_prediction"
            denoised = a**0.5 * x - (1 - a) ** 0.5 * e if v else (x - (1 - a) ** 0.5 * e) / a**0.5
        latents = res.prev_sample
        steps.append((latents.numpy().copy(), denoised.copy()))
    return timesteps.numpy(), float(sched.init_noise_sigma), steps


def run_leansd(name: str, cfg: dict, n: int, strength: float, seed: int, eta: float):
    sched = get_scheduler(name, cfg, eta=eta)
    plan = sched.plan(n, strength)
    noise, clean = start_arrays()
    latents = sched.add_noise(plan, clean, noise) if strength < 1 else (noise * np.float32(plan.init_noise_sigma)).astype(np.float32)
    gen = torch.Generator("cpu").manual_seed(seed)
    state, steps = None, []
    for i, t in enumerate(plan.timesteps):
        out = fake_unet(sched.scale_model_input(plan, i, latents), t)
        step_noise = torch.randn(latents.shape, generator=gen).numpy() if sched.uses_noise else None
        res = sched.step(plan, i, out, latents, state, step_noise)
        assert res.prev_sample.dtype == np.float32 and res.denoised.dtype == np.float32
        latents, state = res.prev_sample, res.state
        steps.append((latents, res.denoised))
    return plan.timesteps, plan.init_noise_sigma, steps


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(ref.astype(np.float64) - got).max() / max(1.0, np.abs(ref).max()))


def check_parity(name: str, cfg: dict, n: int, strength: float = 1.0, seed: int = 0, eta: float = 0.0) -> float:
    ref_t, ref_sigma, ref_steps = run_diffusers(name, cfg, n, strength, seed, eta)
    t, sigma, steps = run_leansd(name, cfg, n, strength, seed, eta)
    assert t.dtype.kind == ref_t.dtype.kind and t.shape == ref_t.shape
    if cfg.get("use_karras_sigmas") or cfg.get("use_exponential_sigmas") or cfg.get("timestep_type") == "continuous":
        # timesteps derived from sigmas: torch's float32 sqrt is not correctly rounded, so allow 1 ulp
        np.testing.assert_allclose(t, ref_t, rtol=1e-6, atol=0)
    else:
        np.testing.assert_array_equal(t, ref_t)
    assert sigma == pytest.approx(ref_sigma, rel=1e-6)
    errors = [max(rel_err(rx, x), rel_err(rd, d)) for (rx, rd), (x, d) in zip(ref_steps, steps, strict=True)]
    tol = TOL_ZERO_SNR if cfg.get("rescale_betas_zero_snr") else TOL
    assert max(errors) < tol, f"relative error per step: {np.array(errors)}"
    return max(errors)


MATRIX = [  # every alias x prediction type x spacing x (steps, strength), from SD 1.x's config
    pytest.param(alias, {**SD15, "prediction_type": pred, "timestep_spacing": spacing, **({"_class_name": "LCMScheduler"} if alias == "lcm" else {})},
                 n, strength, id=f"{alias}-{pred}-{spacing}-{n}-{strength}")
    for alias in ("ddim", "pndm", "euler", "euler_a", "dpm++2m", "dpm++2m_karras", "lms", "lcm")
    for pred in ("epsilon", "v_prediction")
    for spacing in ("leading", "linspace", "trailing")
    for n, strength in ((4, 1.0), (25, 1.0), (20, 0.6))
]


LINEAR = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
DPM, LCM, PRK = "DPMSolverMultistepScheduler", {"_class_name": "LCMScheduler"}, {"skip_prk_steps": False}
EXTRAS = [
    ("pndm", PRK, 10, 1.0), ("pndm", PRK, 25, 1.0), ("pndm", {**PRK, "prediction_type": "v_prediction"}, 20, 0.6), ("plms", PRK, 10, 1.0),
    ("pndm", {}, 1, 1.0), ("ddim", {}, 1, 1.0), ("euler", {}, 1, 1.0), ("dpm++2m", {}, 1, 1.0), ("lms", {}, 1, 1.0),
    ("ddim", {"set_alpha_to_one": True, "steps_offset": 0}, 20, 1.0), ("ddim", LINEAR, 20, 0.6), ("ddim", ZERO_SNR, 20, 1.0),
    ("ddim", {"beta_schedule": "squaredcos_cap_v2"}, 20, 1.0), ("ddim", {"prediction_type": "sample", "clip_sample": True}, 20, 1.0),
    ("ddim", {"trained_betas": [float(b) for b in np.linspace(0.0001, 0.02, 1000)]}, 10, 1.0),
    ("euler", {"use_karras_sigmas": True}, 25, 1.0), ("euler", {"use_karras_sigmas": True, "timestep_spacing": "leading"}, 20, 0.6),
    ("euler", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, 20, 1.0),
    ("euler", {"use_exponential_sigmas": True}, 20, 1.0), ("euler", {"final_sigmas_type": "sigma_min"}, 20, 1.0),
    ("euler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}, 20, 1.0),
    ("euler", {"steps_offset": 0, "timestep_spacing": "leading"}, 20, 1.0), ("euler", ZERO_SNR, 20, 1.0),
    ("euler_a", ZERO_SNR, 20, 1.0), ("euler_a", LINEAR, 20, 0.6),
    ("lms", {"use_karras_sigmas": True}, 25, 1.0), ("lms", {"use_exponential_sigmas": True}, 20, 0.6),
    (DPM, {"solver_order": 3}, 25, 1.0), (DPM, {"solver_order": 3, "lower_order_final": False}, 10, 0.6),
    (DPM, {"solver_type": "heun"}, 20, 1.0), (DPM, {"final_sigmas_type": "sigma_min"}, 20, 1.0),
    (DPM, {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True}, 10, 1.0),
    (DPM, {"euler_at_final": True, "final_sigmas_type": "sigma_min"}, 20, 1.0), (DPM, {"lambda_min_clipped": -5.1}, 20, 1.0),
    (DPM, {"use_exponential_sigmas": True}, 20, 1.0), (DPM, {"prediction_type": "sample"}, 20, 1.0), (DPM, ZERO_SNR, 20, 1.0),
    (DPM, {"algorithm_type": "deis", "solver_type": "logrho", "final_sigmas_type": "sigma_min"}, 10, 1.0),
    ("dpm++2m", {"timestep_spacing": "leading", "steps_offset": 0}, 20, 0.6), ("dpm++2m_karras", {}, 50, 0.6),
    ("dpm++2m_karras", LINEAR, 20, 1.0), ("lcm", LCM, 1, 1.0), ("lcm", LCM, 8, 0.6),
    ("lcm", {**LCM, "set_alpha_to_one": False, "original_inference_steps": 20, "timestep_scaling": 5.0}, 6, 1.0),
    ("lcm", {**LCM, "prediction_type": "sample", "clip_sample": True}, 4, 1.0),
]


def _extras():
    for name, extra, n, strength in EXTRAS:
        label = "-".join(f"{k}={v}" for k, v in extra.items() if k != "trained_betas") or "sd15"
        yield pytest.param(name, {**SD15, **extra}, n, strength, id=f"{name}-{label}-{n}-{strength}")


@pytest.mark.parametrize("name, cfg, n, strength", [*MATRIX, *_extras()])
def test_step_parity(name, cfg, n, strength):
    check_parity(name, cfg, n, strength)


@pytest.mark.parametrize("eta, strength", [(0.5, 1.0), (1.0, 0.6)])
def test_ddim_eta_draws_noise_like_diffusers(eta, strength):
    assert get_scheduler("ddim", SD15, eta=eta).uses_noise
    check_parity("ddim", SD15, 20, strength, seed=3, eta=eta)


@pytest.mark.parametrize("name", sorted(set(SCHEDULER_ALIASES.values())))
def test_config_fields_are_diffusers_init_parameters(name):
    params = inspect.signature(getattr(diffusers, name).__init__).parameters
    expected = {k: p.default for k, p in params.items() if k != "self"}
    config = get_scheduler(name, {}).config
    assert {f.name: f.default for f in dataclasses.fields(config)} == expected


@pytest.mark.parametrize("name", sorted(set(SCHEDULER_ALIASES.values())))
@pytest.mark.parametrize("source", ["memory", "disk"])
def test_from_config_picks_the_same_values(name, source, tmp_path):
    """`_use_default_values` of an in-memory config lets the target class's defaults win; a saved config does not."""
    original = diffusers.PNDMScheduler.from_config(SD15)
    if source == "disk":
        original.save_config(tmp_path)
        raw = json.loads((tmp_path / "scheduler_config.json").read_text())
        assert "_use_default_values" not in raw
    else:
        raw = dict(original.config)
        assert "timestep_spacing" in raw["_use_default_values"]
    theirs = getattr(diffusers, name).from_config(raw).config
    ours = get_scheduler(name, raw).config
    for field in dataclasses.fields(ours):
        assert getattr(ours, field.name) == theirs[field.name], field.name
    if name == "EulerDiscreteScheduler":  # the case that changes SD 1.x images
        assert ours.timestep_spacing == ("leading" if source == "disk" else "linspace")
    check_parity(name, raw, 10)


@pytest.mark.parametrize("extra", [{}, LINEAR, {"beta_schedule": "squaredcos_cap_v2"}, {"rescale_betas_zero_snr": True}])
def test_alphas_cumprod_bit_exact(extra):
    cfg = {**SD15, **extra}
    ours = get_scheduler("ddim", cfg).plan(10).alphas_cumprod
    theirs = diffusers.DDIMScheduler.from_config(cfg).alphas_cumprod.numpy()
    if extra.get("rescale_betas_zero_snr"):  # goes through torch's float32 sqrt, which is not correctly rounded
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-12)
    else:
        np.testing.assert_array_equal(ours.astype(np.float32), theirs)


def test_torch_linspace_emulation_is_bit_exact():
    for start, end, n in [(0.0001, 0.02, 1000), (0.00085**0.5, 0.012**0.5, 1000), (0.1, 0.7, 999), (0.3, 0.2, 7), (0.5, 0.9, 1)]:
        np.testing.assert_array_equal(torch_linspace_f32(start, end, n), torch.linspace(start, end, n, dtype=torch.float32).numpy())


def test_name_resolution_and_aliases():
    assert get_scheduler(None, SD15).name == "PNDMScheduler"
    assert get_scheduler("EulerDiscreteScheduler", SD15).name == "EulerDiscreteScheduler"
    assert get_scheduler("Euler_A", SD15).name == "EulerAncestralDiscreteScheduler"
    assert get_scheduler("dpm++2m_karras", SD15).config.use_karras_sigmas is True
    assert get_scheduler("dpm++2m", {**SD15, "use_karras_sigmas": True}).config.use_karras_sigmas is False
    assert get_scheduler("plms", {}).config.skip_prk_steps is True
    noisy = {n for n in scheduler_names() if get_scheduler(n, SD15).uses_noise}
    assert noisy == {"euler_a", "lcm", "EulerAncestralDiscreteScheduler", "LCMScheduler"}


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UnsupportedSchedulerOption, match="dpm\\+\\+2m_karras") as err:
        get_scheduler("heun", SD15)
    assert "EulerDiscreteScheduler" in str(err.value)
    with pytest.raises(UnsupportedSchedulerOption, match="_class_name"):
        get_scheduler(None, {"beta_start": 0.001})


@pytest.mark.parametrize("name, key, value", [
    (DPM, "algorithm_type", "sde-dpmsolver++"), ("ddim", "thresholding", True), ("euler", "timestep_spacing", "karras"),
    ("euler_a", "prediction_type", "sample"), ("euler", "use_beta_sigmas", True), ("lms", "beta_schedule", "cubic"),
    ("dpm++2m", "variance_type", "learned_range"), ("lcm", "prediction_type", "flow"), ("euler", "interpolation_type", "log_linear"),
])
def test_unsupported_value_names_key_value_and_choices(name, key, value):
    with pytest.raises(UnsupportedSchedulerOption) as err:
        get_scheduler(name, {**SD15, key: value})
    message = str(err.value)
    assert key in message and repr(value) in message and "supported values" in message


def test_strength_too_low_leaves_no_steps_and_bad_strength_raises():
    sched = get_scheduler("euler", SD15)
    assert len(sched.plan(4, 0.2).timesteps) == 0
    with pytest.raises(ValueError, match="strength"):
        sched.plan(4, 1.5)


def test_steps_are_pure_functions_of_their_arguments():
    sched = get_scheduler("dpm++2m", SD15)
    plan = sched.plan(6)
    x = start_arrays()[0]
    states, samples = [None], [x]
    for i, t in enumerate(plan.timesteps[:3]):
        res = sched.step(plan, i, fake_unet(x, t), samples[-1], states[-1])
        states.append(res.state)
        samples.append(res.prev_sample)
    again = sched.step(plan, 1, fake_unet(x, plan.timesteps[1]), samples[1], states[1])  # replay step 1
    np.testing.assert_array_equal(again.prev_sample, samples[2])
