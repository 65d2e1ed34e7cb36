"""`TorchCompatibleGenerator` against torch's CPU generator, and the noise sources' contracts.

What is guaranteed (and asserted here):
* `TorchCompatibleGenerator(seed)` picks the kernel torch uses on this CPU (`detect_kernel()`, asserted against
  `torch.backends.cpu.get_cpu_capability()`): "avx2" on x86-64 with AVX2 *or AVX-512* (torch has no AVX-512 normal
  kernel and falls back to its AVX2 one), "generic" otherwise.
* On x86-64 Linux (GCC-built torch, glibc) both kernels are bit-identical to torch on every shape and seed: "avx2"
  replays torch's FMA-contracted polynomials; "generic" calls the same C library `logf`/`sincosf` torch calls
  (checked in a child process forced to ATEN_CPU_CAPABILITY=default). Elsewhere we assert max-abs <= 1e-6.
* fewer than 16 values (torch's scalar double-precision path, with its cached second value): bit-identical.
The torch-free tests at the end check the Mersenne Twister stream against numpy's reference seeding, the CPU
detection (ATEN_CPU_CAPABILITY included), the agreement of the two kernels with each other, statistics and speed.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import pytest

from leansd.runtime import rng
from leansd.runtime.rng import NoiseSource, NumpyGenerator, TorchCompatibleGenerator, detect_kernel, make_noise_source

SEEDS = [0, 1, 42, 2**31 - 1, 2**32 + 7, 2**64 - 1, -3]
# One generator draws these in order: latents-sized draws, odd sizes, the < 16 / = 16 / 17 edges, and small
# draws between large ones (torch keeps the scalar path's cached value across them).
SHAPES = [(1, 4, 64, 64), (2, 4, 8, 8), (3, 5, 7), (1,), (5,), (15,), (16,), (17,), (3,), (33,), (0,), (2, 3),
          (1, 4, 64, 64)]


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _torch_draws(torch, seed: int) -> list[np.ndarray]:
    g = torch.Generator("cpu").manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float32).numpy() for shape in SHAPES]


def _agreement(ours: list[np.ndarray], ref: list[np.ndarray]) -> tuple[float, float]:
    """(max-abs difference, fraction of bit-identical values) over a list of draws."""
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and a.dtype == np.float32
    a = np.concatenate([x.ravel() for x in ours])
    b = np.concatenate([x.ravel() for x in ref])
    return float(np.abs(a - b).max()), float(np.mean(a.view(np.uint32) == b.view(np.uint32)))


def _assert_bit_identical(ours: list[np.ndarray], ref: list[np.ndarray]) -> None:
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))  # the sign of zeros too


def _torch_kernel(torch) -> str:
    """The kernel torch's own capability implies: AVX-512 CPUs run torch's AVX2 normal kernel."""
    return "avx2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "generic"


def _exact_expected(kernel: str) -> bool:
    """Where bit-identity is verified: x86-64 Linux (GCC-built torch, glibc, whose math functions we load)."""
    x86_linux = sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")
    return x86_linux and (kernel == "avx2" or rng._libm() is not None)


def _assert_matches(ours: list[np.ndarray], ref: list[np.ndarray], kernel: str) -> None:
    if _exact_expected(kernel):
        _assert_bit_identical(ours, ref)
    else:  # another compiler or C library: the same formulas, rounded differently
        assert _agreement(ours, ref)[0] <= 1e-6


@pytest.mark.parametrize("seed", SEEDS)
def test_matches_torch_randn_call_after_call(torch, seed):
    ours = TorchCompatibleGenerator(seed)  # the kernel detected for this CPU, which must be torch's
    assert ours.kernel == _torch_kernel(torch)
    _assert_matches([ours.randn(s) for s in SHAPES], _torch_draws(torch, seed), ours.kernel)


def test_detected_kernel_matches_torch_capability(torch):
    assert detect_kernel() == _torch_kernel(torch)
    if platform.machine().lower() in ("x86_64", "amd64") and sys.platform.startswith("linux"):
        assert rng._x86_capability() == torch.backends.cpu.get_cpu_capability()


def test_small_draws_are_bit_identical(torch):
    # Sizes < 16 use torch's double-precision path: exact whatever the CPU.
    g = torch.Generator("cpu").manual_seed(7)
    ours = TorchCompatibleGenerator(7, kernel="generic")
    for n in [1, 2, 3, 15, 7, 1, 4]:
        np.testing.assert_array_equal(ours.randn((n,)), torch.randn(n, generator=g).numpy())


def test_generic_kernel_matches_torch_default_capability(torch, tmp_path, monkeypatch):
    # torch picks its CPU kernels once per process: run it in a child forced to the generic ones.
    script = (
        "import json, sys, numpy as np, torch\n"
        "shapes, seeds = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n"
        "out = {}\n"
        "for s in seeds:\n"
        "    g = torch.Generator().manual_seed(s)\n"
        "    for i, shape in enumerate(shapes):\n"
        "        out[f'{s}_{i}'] = torch.randn(tuple(shape), generator=g).numpy()\n"
        "np.savez(sys.argv[3], capability=torch.backends.cpu.get_cpu_capability(), **out)\n"
    )
    seeds = [0, 42, 2**32 + 7]
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    subprocess.run([sys.executable, "-c", script, json.dumps(SHAPES), json.dumps(seeds), str(tmp_path / "ref.npz")],
                   env=env, check=True, timeout=120)
    ref = np.load(tmp_path / "ref.npz")
    assert str(ref["capability"]) == "DEFAULT"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # our detection follows the same variable
    ours, theirs = [], []
    for s in seeds:
        gen = TorchCompatibleGenerator(s)
        assert gen.kernel == "generic"
        ours += [gen.randn(shape) for shape in SHAPES]
        theirs += [ref[f"{s}_{i}"] for i in range(len(SHAPES))]
    _assert_matches(ours, theirs, "generic")


def test_seed_range_follows_torch(torch):
    for seed in (-(2**63), 2**64 - 1):
        torch.Generator().manual_seed(seed)  # torch accepts the bounds...
        TorchCompatibleGenerator(seed)  # ...and so do we
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError):
            torch.Generator().manual_seed(seed)
        with pytest.raises(ValueError, match="out of range"):
            TorchCompatibleGenerator(seed)


# ---- torch-free ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 42, 2**31 - 1, 2**32 - 1])
def test_mersenne_twister_stream_is_the_reference_one(seed):
    # numpy's legacy RandomState seeds mt19937 with the reference init_genrand, as torch does; a full-range
    # uint32 draw returns the raw outputs. 16 + 1 uniforms consume exactly 17 outputs.
    expected = np.random.RandomState(seed).randint(0, 2**32, size=2000, dtype=np.uint32)
    ours = TorchCompatibleGenerator(seed)
    raw = ours._bitgen.random_raw(2000)
    np.testing.assert_array_equal(raw.astype(np.uint32), expected)


def test_seeds_use_the_low_32_bits_like_torch():
    a = TorchCompatibleGenerator(5).randn((4, 8))
    np.testing.assert_array_equal(TorchCompatibleGenerator(5 + 2**32).randn((4, 8)), a)
    # Negative seeds wrap modulo 2**64: -1 is 2**64 - 1, whose low 32 bits are 2**32 - 1.
    b = TorchCompatibleGenerator(2**32 - 1).randn((4, 8))
    np.testing.assert_array_equal(TorchCompatibleGenerator(-1).randn((4, 8)), b)


@pytest.mark.parametrize(
    ("env", "flags", "capability"),
    [
        ("default", frozenset({"avx2", "fma", "avx512vl", "avx512bw", "avx512dq"}), "DEFAULT"),
        ("avx2", frozenset(), "AVX2"),
        ("avx512", frozenset(), "AVX512"),
        (None, frozenset({"avx2", "fma", "avx512f", "avx512vl", "avx512bw", "avx512dq"}), "AVX512"),
        (None, frozenset({"avx2", "fma", "avx512f"}), "AVX2"),  # AVX-512 needs VL, BW and DQ as well
        ("AVX2", frozenset({"avx", "sse4_2"}), "DEFAULT"),  # torch ignores (with a warning) unknown values
        (None, frozenset({"avx2"}), "DEFAULT"),  # torch's AVX2 kernels need FMA too
        (None, None, "AVX2"),  # no /proc/cpuinfo: assumed
    ],
)
def test_cpu_detection_follows_aten(monkeypatch, env, flags, capability):
    monkeypatch.setattr(rng.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(rng, "_cpu_flags", lambda: flags)
    if env is None:
        monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    else:
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", env)
    assert rng._x86_capability() == capability
    kernel = "generic" if capability == "DEFAULT" else "avx2"
    assert detect_kernel() == kernel
    assert TorchCompatibleGenerator(0).kernel == kernel == make_noise_source(0).kernel
    assert TorchCompatibleGenerator(0, kernel="generic").kernel == "generic"  # an explicit kernel wins


def test_non_x86_cpus_use_the_generic_kernel(monkeypatch):
    monkeypatch.setattr(rng.platform, "machine", lambda: "aarch64")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert rng._x86_capability() is None and detect_kernel() == "generic"


def test_avx2_argument_reduction_is_fused():
    # 2 pi * 0.75 rounds next to 3 pi / 2: the reduced argument cancels to ~1e-8 and the last, inexact
    # `x + y * DP3` step must be one FMA as in torch. Pinned from torch (seed 987654321, 3rd draw, index 27058).
    u1 = np.array([0x3DFE48A0], dtype=np.uint32).view(np.float32)
    cos, _ = rng._box_muller_avx2(u1, np.array([0.75], dtype=np.float32))
    assert cos.view(np.uint32)[0] == 0x32D13C0C


def test_generic_kernel_without_c_library_is_close(monkeypatch):
    exact = TorchCompatibleGenerator(11, kernel="generic").randn((4, 32, 32))
    monkeypatch.setattr(rng, "_libm", lambda: None)
    approx = TorchCompatibleGenerator(11, kernel="generic").randn((4, 32, 32))
    assert np.abs(exact - approx).max() <= 2e-6


def test_kernels_agree_to_a_few_ulps_and_are_normal():
    avx2 = TorchCompatibleGenerator(3, kernel="avx2").randn((4, 256, 256))
    generic = TorchCompatibleGenerator(3, kernel="generic").randn((4, 256, 256))
    assert np.abs(avx2 - generic).max() <= 5e-6  # two independent evaluations of the same formulas
    assert abs(float(avx2.mean())) < 0.01 and abs(float(avx2.std()) - 1) < 0.01
    assert np.isfinite(avx2).all()


def test_shapes_dtypes_and_errors():
    g = TorchCompatibleGenerator(0)
    assert g.randn((2, 0, 3)).shape == (2, 0, 3)
    assert g.randn(5).shape == (5,)
    assert g.randn(()).shape == () and g.randn(()).dtype == np.float32
    with pytest.raises(ValueError):
        TorchCompatibleGenerator(0, kernel="sse")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        TorchCompatibleGenerator(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        TorchCompatibleGenerator(True)


def test_make_noise_source_and_numpy_generator():
    chosen = make_noise_source(None)
    assert isinstance(chosen, TorchCompatibleGenerator) and 0 <= chosen.seed < 2**32
    again = make_noise_source(chosen.seed)
    np.testing.assert_array_equal(chosen.randn((2, 4, 8, 8)), again.randn((2, 4, 8, 8)))
    fast = make_noise_source(9, kind="numpy")
    assert isinstance(fast, NumpyGenerator) and isinstance(fast, NoiseSource)
    np.testing.assert_array_equal(fast.randn((3, 3)), NumpyGenerator(9).randn((3, 3)))
    assert fast.randn((3, 3)).dtype == np.float32
    with pytest.raises(ValueError):
        make_noise_source(1, kind="cuda")  # type: ignore[arg-type]


@pytest.mark.parametrize(("kernel", "limit"), [("avx2", 0.05), ("generic", 0.1)])
def test_latent_sized_draw_is_fast(kernel, limit):
    g = TorchCompatibleGenerator(0, kernel=kernel)
    g.randn((1, 4, 64, 64))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        g.randn((1, 4, 64, 64))
        times.append(time.perf_counter() - t0)
    assert sorted(times)[2] < limit  # measured ~2 ms (avx2) and ~5 ms (generic: one C call per value)
