#!/usr/bin/env bash
# Run a command as if on an AVX2-only CPU (AMD Zen 3), on a newer x86-64 machine: for checking that the tests pass
# where there is no AVX-512, VNNI or bf16, not for timing (emulated code runs several times slower).
#
#   scripts/as-avx2-cpu.sh .venv-dev/bin/python -m pytest -q tests/parity/test_pipeline.py
#
# How: QEMU's user-mode emulator runs the command with the CPUID of its EPYC-Milan model, so numpy, PyTorch,
# ONNX Runtime and OpenVINO dispatch to their AVX2 kernels, and a private mount namespace shows the command a
# /proc/cpuinfo without the AVX-512, VNNI, AMX, bf16 and GFNI flags, so leansd's own CPU detection agrees.
# Needs root (for the mount namespace) and QEMU 10 or newer (Debian 12: `apt-get install -t bookworm-backports qemu-user`).
# Limit: programs the command starts run natively (QEMU follows no exec), so keep to in-process tests.
set -euo pipefail
if [ $# -eq 0 ]; then
  echo "usage: $0 COMMAND [ARGS...]   or   $0 --check (exit 0 when commands can run here, else say why)" >&2
  exit 2
fi
if [ "$(uname -m)" != x86_64 ]; then
  echo "$0 emulates an x86-64 CPU on an x86-64 machine; this one is $(uname -m)" >&2
  exit 2
fi
if ! command -v qemu-x86_64 >/dev/null 2>&1; then
  echo "qemu-x86_64 not found; install QEMU 10 or newer (Debian 12: apt-get install -t bookworm-backports qemu-user)" >&2
  exit 2
fi
# QEMU 7.2 (Debian 12's own) mis-emulates AVX2 code OpenVINO generates: a static-shape Tanh came out wrong by up to
# 0.9, or crashed. 10.0 computes it right; versions in between were not checked.
qemu_major=$(qemu-x86_64 --version | sed -n 's/^qemu-x86_64 version \([0-9]*\)\..*/\1/p' | head -n 1)
if [ "${qemu_major:-0}" -lt 10 ]; then
  echo "$(qemu-x86_64 --version | head -n 1) is older than 10.0, the first QEMU seen to run OpenVINO's AVX2 code right (7.2 got it wrong); install QEMU 10 or newer (Debian 12: apt-get install -t bookworm-backports qemu-user)" >&2
  exit 2
fi
if [ "$(id -u)" != 0 ]; then
  echo "$0 needs root (it mounts a private /proc/cpuinfo); run it as root" >&2
  exit 2
fi
# Some containers forbid new mount namespaces even to root; then the CPU flags cannot be hidden.
if ! unshare -m true 2>/dev/null; then
  echo "$0 cannot make a mount namespace here (unshare -m fails, or unshare is missing), so it cannot hide the CPU flags" >&2
  exit 2
fi
if [ "$1" = --check ]; then
  exit 0
fi
program=$(command -v "$1") || { echo "$1: no such program" >&2; exit 2; }
shift
if [ "$(head -c 4 "$program" | od -An -c | tr -d ' ')" != '177ELF' ]; then
  echo "$program is not a native executable (a script?); name its interpreter, e.g. .venv-dev/bin/python -m pytest" >&2
  exit 2
fi
cpuinfo=$(mktemp)
trap 'rm -f "$cpuinfo"' EXIT
sed -E '/^flags/ s/ (avx512[a-z0-9_]*|avx_vnni[a-z0-9_]*|amx[a-z0-9_]*|gfni)\b//g' /proc/cpuinfo > "$cpuinfo"
# QEMU warns once per feature its emulator lacks (xsaves); the command's own output is kept.
unshare -m sh -c 'mount --bind "$0" /proc/cpuinfo && exec qemu-x86_64 -cpu EPYC-Milan "$@"' "$cpuinfo" "$program" "$@" \
  2> >(grep -v "TCG doesn't support requested feature" >&2)
