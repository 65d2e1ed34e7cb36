"""Noise sources. The default reproduces PyTorch's CPU generator in numpy, so a seed gives the same image as diffusers.

`TorchCompatibleGenerator(seed).randn(shape)` returns what `torch.randn(shape, generator=g)` returns for
`g = torch.Generator("cpu").manual_seed(seed)`, call after call (diffusers' `randn_tensor` with a CPU generator
is exactly that call). How torch draws float32 normals on the CPU (ATen `normal_kernel`, torch 2.x):

* The engine is the 32-bit Mersenne Twister (mt19937) with the reference initialisation from the seed's low
  32 bits (torch accepts seeds in [-2**63, 2**64) and wraps negatives modulo 2**64).
* 16 or more values: every value first becomes a uniform float `(draw & 0xffffff) * 2**-24`; then Box-Muller
  runs on blocks of 16 (`u1 = 1 - data[j]`, `u2 = data[j + 8]`, cosine into slot j, sine into slot j + 8).
  When the count is not a multiple of 16, 16 fresh uniforms are drawn and the last 16 values recomputed.
  The transform is float32 arithmetic, and which code does it depends on the CPU capability torch picked
  (`detect_kernel()` works that out without torch; see its docstring):

  - ``kernel="avx2"``: x86-64 CPUs with AVX2 and FMA, *including AVX-512 ones*: `normal_stub` is registered
    with `REGISTER_DISPATCH`, which leaves the AVX-512 slot empty, so ATen's dispatcher falls back to the AVX2
    kernel (libtorch_cpu.so has no AVX-512 `normal_kernel`). torch evaluates log, sin and cos with the
    Cephes-derived polynomials of `avx_mathfun.h`, compiled (on Linux, by GCC) with multiply-adds fused into
    FMAs (the argument reduction of sin/cos included). We replay those exact float32 operations, with exactly
    rounded FMAs: bit-identical (checked on 4e7 values; an AVX-512 CPU runs the very same code).
  - ``kernel="generic"``: the scalar `NormalFill16` (x86-64 forced to ATEN_CPU_CAPABILITY=default or without
    AVX2, ARM including Apple Silicon): `radius = sqrtf(-2 * logf(u1))`, `theta = (float)(2 * pi * (double)u2)`,
    `radius * cos`, `radius * sin` in float32, with GCC merging sinf and cosf into one `sincosf` call. Those C
    library functions are not correctly rounded and differ between C libraries, so we call the very functions
    of the process's C library through ctypes (glibc picks the same FMA variant for us as for torch):
    bit-identical with glibc (checked on x86-64). Without C library math we fall back to correctly rounded float64,
    which stays within 3 float32 ulps of glibc.
* Fewer than 16 values: a scalar double-precision Box-Muller on 53-bit uniforms built from pairs of draws; the
  sine half of each pair is cached in the generator and returned by the next such call (torch keeps that cache
  across calls, even across larger draws in between). Rounding to float32 makes this exact in practice.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import operator
import os
import platform
import secrets
from typing import Callable, Literal, Protocol, runtime_checkable

import numpy as np

__all__ = ["NoiseSource", "TorchCompatibleGenerator", "NumpyGenerator", "detect_kernel", "make_noise_source"]

Kernel = Literal["avx2", "generic"]

_F32 = np.float32
_F64 = np.float64


@runtime_checkable
class NoiseSource(Protocol):
    """Anything that draws standard-normal float32 arrays; the pipeline calls it once per noise tensor."""

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        """Return a float32 array of `shape` with standard-normal values."""


def _check_seed(seed: int) -> int:
    """Validate a seed the way torch's `manual_seed` does and return it as an unsigned 64-bit value."""
    if isinstance(seed, bool) or not hasattr(type(seed), "__index__"):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    value = operator.index(seed)
    if not -(2**63) <= value < 2**64:
        raise ValueError(f"seed {value} is out of range: torch accepts seeds in [-2**63, 2**64)")
    return value % 2**64


def _mt19937(seed: int) -> np.random.MT19937:
    """numpy's MT19937 holding the state torch's mt19937 has after `manual_seed(seed)`.

    Both are the reference Mersenne Twister, so `random_raw()` then yields torch's 32-bit stream. `MT19937(seed)`
    hashes the seed, but the legacy `RandomState` seeds a 32-bit integer with the reference `init_genrand`, as
    torch does with the seed's low 32 bits (numpy keeps that stream frozen), and leaves `pos = 624`, so the first
    draw regenerates the state, as torch's `left_ = 1` does. We copy that state.
    """
    bitgen = np.random.MT19937()
    bitgen.state = np.random.RandomState(seed & 0xFFFFFFFF).get_state(legacy=False)
    return bitgen


# ---- float32 arithmetic helpers -------------------------------------------------------------------------------

def _fma(a: np.ndarray, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    """float32 fused multiply-add `a * b + c` with one rounding, as the FMA instruction does.

    The product of two float32 values is exact in float64. The sum is computed in float64 and rounded to odd
    (TwoSum gives the exact error); a round-to-odd float64 (53 bits >= 24 + 2) then rounds to the correctly
    rounded float32, so no double-rounding error is possible.
    """
    p = np.multiply(a, b, dtype=_F64)
    c64 = np.asarray(c, dtype=_F64)
    s = p + c64
    bp = s - c64
    err = (p - bp) + (c64 - (s - bp))
    inexact_even = (err != 0) & ((s.view(np.uint64) & 1) == 0)
    if inexact_even.any():
        s = np.where(inexact_even, np.nextafter(s, np.copysign(np.inf, err)), s)
    return s.astype(_F32)


def _horner(x: np.ndarray, coefficients: tuple[float, ...]) -> np.ndarray:
    """Polynomial by Horner's rule, each step one FMA (as GCC contracts `y * x + c` in the AVX2 build)."""
    y = np.full_like(x, _F32(coefficients[0]))
    for c in coefficients[1:]:
        y = _fma(y, x, _F32(c))
    return y


# Cephes single-precision log and sin/cos coefficients, as used by torch's avx_mathfun.h.
_LOG_P = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
          -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)
_LOG_Q1 = _F32(-2.12194440e-4)
_LOG_Q2 = _F32(0.693359375)
_SQRT_HALF = _F32(0.707106781186547524)
_SIN_P = (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)
_COS_P = (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)
_FOUR_OVER_PI = _F32(1.27323954473516)
_DP = (_F32(-0.78515625), _F32(-2.4187564849853515625e-4), _F32(-3.77489497744594108e-8))


def _log_avx2(x: np.ndarray) -> np.ndarray:
    """Natural log of positive normal float32 values, operation for operation as torch's AVX2 `log256_ps`."""
    bits = x.view(np.uint32)
    e = ((bits >> 23).astype(np.int32) - 127).astype(_F32) + _F32(1)
    # Mantissa scaled into [0.5, 1).
    m = ((bits & np.uint32(0x807FFFFF)) | np.uint32(0x3F000000)).view(_F32)
    small = m < _SQRT_HALF
    # For m < sqrt(1/2) use 2m - 1 and one less in the exponent, else m - 1 (same order of operations as torch).
    extra = np.where(small, m, _F32(0))
    m = m - _F32(1)
    e = e - small.astype(_F32)
    m = m + extra
    z = m * m
    y = _horner(m, _LOG_P)
    y = y * m
    y = _fma(y, z, e * _LOG_Q1)
    y = y - z * _F32(0.5)  # z * 0.5 is exact, so fusing or not gives the same value
    m = m + y
    return m + e * _LOG_Q2  # e * Q2 is exact (small integer times a short constant)


def _sincos_avx2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sine and cosine of non-negative float32 values, operation for operation as torch's AVX2 `sincos256_ps`."""
    j = (x * _FOUR_OVER_PI).astype(np.int32)  # truncation, like cvttps
    j = (j + 1) & ~1
    y = j.astype(_F32)
    # Extended-precision reduction x - y * pi/4 in three parts, each fused (y * DP3 is not exact in float32).
    for dp in _DP:
        x = _fma(y, dp, x)
    sin_negative = (j & 4) != 0
    cos_negative = (~(j - 2) & 4) != 0
    use_sin_poly = (j & 2) == 0
    z = x * x
    yc = _horner(z, _COS_P) * z
    yc = _fma(yc, z, -(z * _F32(0.5)))
    yc = yc + _F32(1)
    ys = _horner(z, _SIN_P) * z
    ys = _fma(ys, x, x)
    sin = np.where(use_sin_poly, ys, yc)
    cos = np.where(use_sin_poly, yc, ys)
    return np.where(sin_negative, -sin, sin), np.where(cos_negative, -cos, cos)


def _box_muller_avx2(u1: np.ndarray, u2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    radius = np.sqrt(_F32(-2) * _log_avx2(u1))
    sin, cos = _sincos_avx2(_F32(2.0 * np.pi) * u2)
    return radius * cos, radius * sin


@functools.cache
def _libm() -> tuple[Callable[..., float], Callable[..., None]] | None:
    """The C library's `logf` and `sincosf`, the functions torch's generic kernel calls; None where not found."""
    name = ctypes.util.find_library("m")
    try:
        lib = ctypes.CDLL(name) if name else None
        logf, sincosf = lib.logf, lib.sincosf  # AttributeError where lib is None or lacks them
    except (OSError, AttributeError):
        return None
    logf.argtypes, logf.restype = [ctypes.c_float], ctypes.c_float
    sincosf.argtypes, sincosf.restype = [ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p], None
    return logf, sincosf


def _box_muller_generic(u1: np.ndarray, u2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # torch: float(2.0f * pi<double> * u2), in double, rounded once to float.
    theta = (2.0 * np.pi * u2.astype(_F64)).astype(_F32)
    libm = _libm()
    if libm is None:  # correctly rounded float64 results instead of the C library's (within 3 ulps of glibc)
        log = np.log(u1.astype(_F64)).astype(_F32)
        sin, cos = (f(theta.astype(_F64)).astype(_F32) for f in (np.sin, np.cos))
    else:  # one ctypes call per value and function: ~5 ms for a 4x64x64 latent, ~20 ms for 4x128x128
        logf, sincosf = libm
        log = np.array(list(map(logf, u1.ravel().tolist())), dtype=_F32).reshape(u1.shape)
        sin, cos = np.empty_like(theta), np.empty_like(theta)
        n, ps, pc = theta.size, sin.ctypes.data, cos.ctypes.data
        list(map(sincosf, theta.ravel().tolist(), range(ps, ps + 4 * n, 4), range(pc, pc + 4 * n, 4)))
    radius = np.sqrt(_F32(-2) * log)
    return radius * cos, radius * sin


_BOX_MULLER = {"avx2": _box_muller_avx2, "generic": _box_muller_generic}


def _normal_blocks(uniform: np.ndarray, kernel: Kernel) -> np.ndarray:
    """torch's `normal_fill_16` on consecutive blocks of 16 uniforms (length a multiple of 16)."""
    blocks = uniform.reshape(-1, 16)
    with np.errstate(all="ignore"):  # intermediate polynomial steps may be ±0; nothing invalid is produced
        cos, sin = _BOX_MULLER[kernel](_F32(1) - blocks[:, :8], blocks[:, 8:])
    # The final `fma(n, std, mean)` with mean 0 turns -0.0 into +0.0; adding 0 does the same.
    return np.concatenate([cos, sin], axis=1).reshape(-1) + _F32(0)


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    """The x86 feature flags the Linux kernel reports in /proc/cpuinfo; None where there is no such file."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def _x86_capability() -> str | None:
    """What `torch.backends.cpu.get_cpu_capability()` returns on this machine, without torch; None off x86-64.

    ATen's `compute_cpu_capability`: a valid ATEN_CPU_CAPABILITY ("avx512", "avx2", "default") wins; else
    AVX512 with AVX512VL+BW+DQ and FMA, AVX2 with AVX2 and FMA, DEFAULT otherwise. Without /proc/cpuinfo
    (Windows, macOS) we assume AVX2, which x86-64 CPUs have had since 2013-2015 (an AVX-512 CPU runs the same
    normal kernel anyway); a pure-Python CPUID is not available.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    forced = os.environ.get("ATEN_CPU_CAPABILITY", "")
    if forced in ("avx512", "avx2", "default"):
        return forced.upper()
    flags = _cpu_flags()
    if flags is None:
        return "AVX2"
    if {"avx512vl", "avx512bw", "avx512dq", "fma"} <= flags:
        return "AVX512"
    return "AVX2" if {"avx2", "fma"} <= flags else "DEFAULT"


def detect_kernel() -> Kernel:
    """The kernel torch's `randn` runs on this CPU: "avx2" on x86-64 with AVX2 or AVX-512, else "generic".

    AVX-512 CPUs run the AVX2 kernel because torch registers no AVX-512 `normal_kernel` (see module docstring).
    """
    return "avx2" if _x86_capability() in ("AVX2", "AVX512") else "generic"


class TorchCompatibleGenerator:
    """`torch.Generator("cpu").manual_seed(seed)` + `torch.randn(..., dtype=torch.float32)`, in numpy.

    Successive `randn` calls continue one stream, as successive `torch.randn` calls on one generator do.
    `kernel` picks which torch CPU code to reproduce (see the module docstring): "avx2" (x86-64 CPUs with AVX2
    or AVX-512) or "generic" (everything else); None (the default) picks the one torch uses here, `detect_kernel()`.
    """

    def __init__(self, seed: int, kernel: Kernel | None = None) -> None:
        kernel = detect_kernel() if kernel is None else kernel
        if kernel not in _BOX_MULLER:
            raise ValueError(f"kernel must be one of {', '.join(_BOX_MULLER)}, got {kernel!r}")
        self.seed = _check_seed(seed)
        self.kernel: Kernel = kernel
        self._bitgen = _mt19937(self.seed)
        # The second value of torch's scalar Box-Muller pair, kept for its next small draw.
        self._cached_normal: float | None = None

    def __repr__(self) -> str:
        return f"TorchCompatibleGenerator(seed={self.seed}, kernel={self.kernel!r})"

    def _uniform24(self, n: int) -> np.ndarray:
        """n float32 uniforms in [0, 1): the low 24 bits of each 32-bit draw, scaled (exact in float32)."""
        return (self._bitgen.random_raw(n) & 0xFFFFFF).astype(_F32) * _F32(2.0**-24)

    def _scalar_normal(self) -> float:
        """torch's `normal_distribution<double>`: 53-bit uniforms from two draws each, and a one-value cache."""
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        raw = self._bitgen.random_raw(4)
        # random64() puts the first 32-bit draw in the high half; uniform_real keeps the low 53 bits.
        u1, u2 = ((((int(raw[k]) << 32) | int(raw[k + 1])) & (2**53 - 1)) * 2.0**-53 for k in (0, 2))
        radius = np.sqrt(-2.0 * np.log1p(-u2))
        theta = 2.0 * np.pi * u1
        self._cached_normal = float(radius * np.sin(theta))
        return float(radius * np.cos(theta))

    def randn(self, shape: tuple[int, ...] | int) -> np.ndarray:
        """The next standard-normal float32 array of `shape`, equal to torch's next `torch.randn(shape)`."""
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"shape {shape} has a negative dimension")
        n = int(np.prod(shape, dtype=np.int64))
        if n < 16:
            return np.array([self._scalar_normal() for _ in range(n)], dtype=_F32).reshape(shape)
        out = _normal_blocks(self._uniform24(n)[: n - n % 16], self.kernel)
        if n % 16:
            # torch draws 16 fresh uniforms and overwrites the last 16 values (overlapping the last block).
            out = np.concatenate([out[: n - 16], _normal_blocks(self._uniform24(16), self.kernel)])
        return out.reshape(shape)


class NumpyGenerator:
    """numpy's PCG64 normals: fastest, reproducible within leansd, but not the images diffusers makes."""

    def __init__(self, seed: int) -> None:
        self.seed = operator.index(seed)
        self._rng = np.random.default_rng(self.seed)

    def __repr__(self) -> str:
        return f"NumpyGenerator(seed={self.seed})"

    def randn(self, shape: tuple[int, ...] | int) -> np.ndarray:
        """The next standard-normal float32 array of `shape`."""
        return self._rng.standard_normal(shape, dtype=_F32)


def make_noise_source(seed: int | None = None,
                      kind: Literal["torch", "numpy"] = "torch") -> TorchCompatibleGenerator | NumpyGenerator:
    """The noise source for `seed` ("torch": diffusers' images; "numpy": faster, leansd-only).

    With `seed=None` a random 32-bit seed is chosen; it is readable afterwards as `.seed`, so it can be recorded.
    """
    generators = {"torch": TorchCompatibleGenerator, "numpy": NumpyGenerator}
    if kind not in generators:
        raise ValueError(f"noise kind must be 'torch' or 'numpy', got {kind!r}")
    return generators[kind](secrets.randbelow(2**32) if seed is None else seed)
