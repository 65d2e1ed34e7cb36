"""Machine and version facts, and the Markdown report (perf/RESULTS.md) built from a results dict."""
from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = (
    "torch", "diffusers", "transformers", "tokenizers", "accelerate", "numpy", "onnx", "onnxruntime", "openvino",
    "nncf", "optimum", "optimum-onnx", "optimum-intel", "huggingface_hub", "safetensors",
)  # fmt: skip


def machine() -> dict:
    info: dict = {"platform": platform.platform(), "python": platform.python_version(), "logical_cpus": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        for line in cpuinfo.splitlines():
            if line.startswith("model name") and "cpu_model" not in info:
                info["cpu_model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags") and "isa" not in info:
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")
                info["isa"] = {f: f in flags for f in wanted}
    except OSError:
        pass
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        try:
            kib = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
            info["ram_gb"] = round(kib / 2**20, 1)
        except (OSError, StopIteration):
            pass
    return info


def versions() -> dict:
    out = {}
    for name in DISTRIBUTIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["leansd"] = leansd_revision()
    return out


def leansd_revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "leansd"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{metadata.version('leansd')} @ {head}" + (" + uncommitted changes under leansd/" if dirty else "")


# ------------------------------------------------------------------------------------------------ markdown
METRICS = (
    # key, header, unit scale, format
    ("ready_s", "start → ready s", 1.0, "{:.1f}"),
    ("cold_s", "start → 1st image s (cold)", 1.0, "{:.1f}"),
    ("warm_image_s", "image s (warm)", 1.0, "{:.1f}"),
    ("unet_step_s", "UNet step s (batch 2)", 1.0, "{:.3f}"),
    ("text_encoder_s", "text encoder s", 1.0, "{:.3f}"),
    ("vae_decode_s", "VAE decode s", 1.0, "{:.3f}"),
    ("peak_rss_mb", "peak RSS GB", 1 / 1024, "{:.2f}"),
)


SHORT = {
    "cold_s": "start → 1st image", "warm_image_s": "image (warm)", "unet_step_s": "UNet step", "text_encoder_s": "text encoder",
    "vae_decode_s": "VAE decode", "peak_rss_mb": "peak RSS",
}  # fmt: skip
BUSY_LOAD = 1.0  # 1-minute load average above which a row is marked as measured on a busy machine (older runs)
BUSY_OTHER_CORES = 0.2  # average cores used by other processes during a row above which it is marked busy


def unet_batch(data: dict) -> int:
    """The UNet batch of the run's micro-timing: 2 (guidance's two halves), 1 for UNets that take guidance as an input."""
    return int(data.get("config", {}).get("run", {}).get("unet_batch", 2))


def header(data: dict, metric: tuple) -> str:
    return metric[1].replace("(batch 2)", f"(batch {unet_batch(data)})")


def _fmt(value, scale, fmt) -> str:
    return "–" if value is None else fmt.format(value * scale)


def _status(peer: dict) -> str:
    if peer["status"] == "ok":
        return "ok"
    return f"{peer['status']}: {peer.get('reason', '')}".replace("|", "/")


def results_table(data: dict) -> list[str]:
    by_cpu = any(p.get("other_cpu_cores") is not None for p in data["peers"])
    headers = ["configuration"] + [header(data, m) for m in METRICS] + ["image Δ vs reference: max abs / PSNR dB",
                                                             "other work (cores)" if by_cpu else "load avg", "status"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for peer in data["peers"]:
        r = peer.get("result") or {}
        values = [_fmt(peer.get("peak_rss_mb") if key == "peak_rss_mb" else r.get(key), scale, fmt) for key, _, scale, fmt in METRICS]
        diff = peer.get("max_abs_diff")
        psnr = peer.get("psnr_db")
        diff_text = "–" if diff is None else f"{diff:.1e} / " + ("∞" if psnr is None else f"{psnr:.1f}")
        busy = _other(peer.get("other_cpu_cores")) if by_cpu else _load(peer.get("loadavg"))
        label = peer["label"] + (f" — computes in {r['precision']}" if r.get("precision") else "")
        lines.append(
            "| " + " | ".join([label] + values + [diff_text, busy, _status(peer)]) + " |"
        )
    return lines


def _other(cores) -> str:
    if cores is None:
        return "–"
    return f"**{cores:.2f}** (busy)" if cores > BUSY_OTHER_CORES else f"{cores:.2f}"


def _load(load) -> str:
    if load is None:
        return "–"
    return f"**{load:.2f}** (busy)" if load > BUSY_LOAD else f"{load:.2f}"


def ratio_table(data: dict) -> list[str]:
    ok = [p for p in data["peers"] if p["status"] == "ok"]
    metrics = [m for m in METRICS if m[0] != "ready_s"]
    best = {}
    for key, *_ in metrics:
        values = [(_value(p, key), p["label"]) for p in ok if _value(p, key) is not None]
        if values:
            best[key] = min(values)
    headers = ["configuration"] + [SHORT[m[0]] for m in metrics]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for p in ok:
        cells = []
        for key, *_ in metrics:
            v = _value(p, key)
            cells.append("–" if v is None or key not in best or not best[key][0] else f"{v / best[key][0]:.2f}×")
        lines.append("| " + " | ".join([p["label"]] + cells) + " |")
    lines.append("| **best (1.00×)** | " + " | ".join(best[k][1] if k in best else "–" for k, *_ in metrics) + " |")
    return lines


def _value(peer: dict, key: str):
    if key == "peak_rss_mb":
        return peer.get("peak_rss_mb")
    return (peer.get("result") or {}).get(key)


def leansd_summary(data: dict) -> list[str]:
    """Each leansd row against the best non-leansd peer, per metric."""
    ok = [p for p in data["peers"] if p["status"] == "ok"]
    others = [p for p in ok if p["kind"] != "leansd"]
    lines = []
    for metric in METRICS[1:]:
        key = metric[0]
        cands = [(_value(p, key), p["label"]) for p in others if _value(p, key) is not None]
        if not cands:
            continue
        ref, ref_label = min(cands)
        parts = [f"{p['label']} {_value(p, key) / ref:.2f}×" for p in ok if p["kind"] == "leansd" and _value(p, key) is not None and ref]
        if parts:
            lines.append(f"- **{header(data, metric)}** vs best peer ({ref_label}): " + "; ".join(parts))
    return lines


def consistency_notes(data: dict, tolerance: float = 1.5) -> list[str]:
    """Rows whose UNet calls inside the images disagree with the separately timed UNet step: a sign of contention."""
    import statistics

    notes = []
    for p in data["peers"]:
        r = p.get("result") or {}
        # The first call of each image is left out: it may include lazy compilation (or, in low-memory mode, a reload).
        calls = [t for im in r.get("images", []) for t in im.get("unet_call_s", [])[1:]]
        step = r.get("unet_step_s")
        if (p.get("options") or {}).get("deep_cache"):
            continue  # full and shallow steps differ by design
        if p.get("status") != "ok" or not calls or not step:
            continue
        fastest, slowest = min(calls), max(calls)
        in_image = statistics.median(calls)
        if max(in_image, step) / min(in_image, step) > tolerance or slowest / fastest > 2 * tolerance:
            notes.append(
                f"`{p['name']}`: UNet calls inside the images took {fastest:.2f}–{slowest:.2f} s (median {in_image:.2f} s) against"
                f" {step:.2f} s timed alone: the CPU was contended during part of this process; its image times are unreliable."
            )
    return notes


def exports_table(data: dict) -> list[str]:
    lines = ["| export | wall s | peak RSS GB | size on disk GB | status |", "|---|---|---|---|---|"]
    for key, e in data["exports"].items():
        wall = "–" if e.get("wall_s") is None else f"{e['wall_s']:.0f}"
        rss = "–" if e.get("peak_rss_mb") is None else f"{e['peak_rss_mb'] / 1024:.2f}"
        size = "–" if e.get("size_gb") is None else f"{e['size_gb']:.2f}"
        status = "ok" if e["ok"] else f"failed: {e.get('error', '')}".replace("|", "/")
        if e.get("adopted"):
            status += f" ({e['adopted']}, finished {e.get('measured_at', 'earlier')})"
        elif e.get("cached"):
            status += f" (reused from cache, measured {e.get('measured_at', 'earlier')})"
        for ir, kinds in (e.get("weights") or {}).items():
            status += f"; `{ir}` weights: " + ", ".join(f"{kind} {gb:.2f} GB" for kind, gb in kinds.items())
        lines.append(f"| {e['label']} | {wall} | {rss} | {size} | {status} |")
    return lines


def render(data: dict) -> str:
    cfg, run, m = data["config"], data["config"]["run"], data["machine"]
    quick = data["mode"].endswith("quick")
    out = []
    family = cfg.get("title", "Stable Diffusion 1.5 architecture")
    title = f"leansd benchmark — QUICK MODE (reduced architecture: not {family} numbers)" if quick else f"leansd benchmark — {family}"
    out += [f"# {title}", ""]
    if quick:
        out += [
            f"> **Quick mode.** A narrow model with the {family}'s block structure at a small size. It checks that every",
            "> configuration builds, exports and runs, and shows start-up and memory overheads; the speed ratios",
            "> say little about the full model, whose compute is dominated by wide convolutions and attention.",
            "",
        ]
    if data.get("isa_cap"):
        out += [
            f"> **ISA capped to {data['isa_cap']}: a proxy, not a machine limited to {data['isa_cap']}.** Every measuring process",
            f"> ran with `ONEDNN_MAX_CPU_ISA={data['isa_cap']}`, so oneDNN's kernels (OpenVINO's convolutions and most of its",
            "> other ops; PyTorch's convolutions) use only that instruction set, on the CPU named under Setup (an AVX2 cap",
            "> also caps PyTorch's and MKL's own kernels). MLAS matrix products ignore the cap: ONNX Runtime's, and OpenVINO's",
            "> fully connected layers, still use the CPU's widest vectors. The figures estimate an older CPU's ratios; they",
            "> are not that CPU's.",
            "",
        ]
    others = [p["other_cpu_cores"] for p in data["peers"] if p.get("other_cpu_cores") is not None]
    loads = [p["loadavg"] for p in data["peers"] if p.get("loadavg") is not None] + [data["loadavg_start"], data["loadavg_end"]]
    if others and max(others) > BUSY_OTHER_CORES:
        out += [
            f"> **Busy machine.** Other processes used up to {max(others):.2f} cores on average while a configuration ran",
            "> (rows marked busy). Their timings are inflated, PyTorch's OpenMP threads most of all. Memory figures are not affected.",
            "",
        ]
    elif not others and max(loads) > BUSY_LOAD:
        out += [
            f"> **Busy machine.** Other jobs shared the CPU during this run (1-minute load average up to {max(loads):.1f} on",
            f"> {data['machine'].get('logical_cpus')} CPUs). Timings are inflated by different amounts from row to row, PyTorch's",
            "> OpenMP threads most of all; compare rows only loosely. Memory figures are not affected.",
            "",
        ]
    out += [
        f"Written by `perf/bench.py` on {data['finished']} (run started {data['started']}).",
        "",
        *([f"Rows come from {len(data['runs'])} consecutive runs on this machine (`--add-to`), each listed under Commands.", ""]
          if len(data.get("runs") or []) > 1 else []),
        "## Setup",
        "",
        f"- **Machine:** {m.get('cpu_model', 'unknown CPU')}; {m.get('logical_cpus')} logical CPUs"
        f" ({m.get('physical_cores', '?')} physical cores);"
        f" {m.get('ram_gb', '?')} GB RAM; ISA: {', '.join(k for k, v in m.get('isa', {}).items() if v) or 'unknown'};"
        f" not present: {', '.join(k for k, v in m.get('isa', {}).items() if not v) or 'none'}; {m.get('platform')}; Python {m.get('python')}.",
        f"- **Load average** (1 min) at start {data['loadavg_start']:.2f}, at the end {data['loadavg_end']:.2f};"
        + (" `other work` is the CPU time the rest of the machine used while a configuration ran (all processes' busy time from"
           " /proc/stat minus the configuration's own), in cores: about 0 on an idle machine; above"
           f" {BUSY_OTHER_CORES} a row is marked busy."
           if others else " each row shows it at the moment its process started. Above 1.0 (marked busy) other work"
           " shared the CPU and the timings are inflated."),
        f"- **Model:** {cfg['description']}. Seed {cfg.get('seed', 0)}; parameters: {data.get('source', {}).get('params', '?')}.",
        f"- **Generation:** {run['height']}×{run['width']}, {run['steps']} steps of "
        + (f"the {run['scheduler']} scheduler" if run.get("scheduler") else "the model's scheduler (PNDM")
        + f"{', which' if run.get('scheduler') else ', which'} calls the UNet {data.get('unet_calls_per_image', '?')} times"
        + ("" if run.get("scheduler") else ")")
        + (f", guidance {run['guidance_scale']} (embedded in the UNet, batch 1)" if unet_batch(data) == 1 else
           f", guidance {run['guidance_scale']} (UNet batch {2 if run['guidance_scale'] > 1 else 1})") + ", seed 0, one prompt.",
        f"- **Repeats:** component timings are the median of {data['repeats']} calls after 1 warm-up, on the peer's own component"
        f" objects with the inputs its pipeline feeds them; {data['images']} whole image(s) per process, the first is the cold one"
        " (process spawn → first image, imports and compilation included) and `image (warm)` is the median of the rest.",
        "- **Peak RSS:** the kernel's maximum resident set of the whole process (`wait4` rusage, the figure `/usr/bin/time -v` prints),"
        " each configuration in its own fresh process. Memory-mapped weight files count once touched.",
        "- **Threads:** each library's default (all cores); no thread environment variables are set.",
        "",
        "## Results",
        "",
    ]
    out += results_table(data)
    out += [
        "",
        f"`image Δ vs reference`: the first image (values in [0, 1]) against {data.get('image_reference', 'diffusers PyTorch fp32')}'s"
        " for the same seed: a wiring check for exact modes, the quality cost for approximate ones (int8, deep cache)."
        " Rows with the tiny VAE decoder decode with a different network (TAESD's architecture, random weights here), so their"
        " Δ says nothing about quality: with real weights TAESD's fidelity is its authors' to state. `–`: not measured.",
        "",
        "### Ratios (1.00× = the best configuration in each column; lower is better)",
        "",
    ]
    out += ratio_table(data)
    summary = leansd_summary(data)
    if summary:
        out += ["", "### leansd against the best other configuration", ""] + summary
    out += ["", "## Exports", ""] + exports_table(data)
    out += [
        "",
        "## Versions",
        "",
        ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".",
        "",
        "## Commands",
        "",
        "```bash",
        *([data["command"]] if len(data.get("runs") or []) < 2 else
          [f"{run['command']}    # {run['started']}: {', '.join(run['peers'])}" for run in data["runs"]]),
        "```",
        "",
        f"The model is built by `{data.get('source', {}).get('command', 'python perf/build_model.py CONFIG SRC')}`"
        + (f" ({data['source']['built_outside']}; SRC = {data['source']['path']})" if data.get("source", {}).get("built_outside") else "")
        + ", then exported with:",
        "",
        "```bash",
    ]
    for e in data["exports"].values():
        out.append(e["display"])
    out += [
        "```",
        "",
        "Each configuration is measured by `python perf/worker.py SPEC.json` in a fresh process; its options:",
        "",
    ]
    for p in data["peers"]:
        out.append(f"- `{p['name']}`: {p['kind']} on `{p.get('folder_key') or 'SRC'}`, options `{p.get('options', {})}`")
    out += [
        "",
        "Subprocesses run with `HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false` (nothing is downloaded).",
        "",
        "## Caveats",
        "",
        "- One run per configuration; medians reduce but do not remove the noise of a shared machine (see load average).",
        "- \"Cold\" means a fresh process with the model files in the OS page cache (they were just written or read);"
        " a first run after a reboot reads them from disk as well.",
        "- Random weights: speed and memory do not depend on the values, image quality is meaningless here.",
        "- Optimum Intel compiles the models at load (reshape + compile), leansd's OpenVINO backend compiles each model"
        " on its first call at the requested size, so compare `start → 1st image`, not `start → ready`, across them.",
    ]
    for line in consistency_notes(data):
        out.append(f"- {line}")
    for p in data["peers"]:
        colds = (p.get("result") or {}).get("cold_runs_s")
        if colds:
            rss = ", ".join(f"{m / 1024:.2f}" for m in p.get("peak_rss_runs_mb") or [])
            out.append(
                f"- `{p['name']}`: start → 1st image is the median of {len(colds)} fresh processes"
                f" ({', '.join(f'{c:.1f}' for c in colds)} s, in order); peak RSS the largest of theirs ({rss} GB)."
            )
        prime = p.get("prime")
        if prime and prime.get("cold_s") is not None:
            out.append(
                f"- `{p['name']}`: a first process filled the compile cache ({prime.get('steps', 1)} step(s), start → image {prime['cold_s']:.1f} s,"
                f" peak RSS {prime['peak_rss_mb'] / 1024:.2f} GB); the row is the second process, which reads it."
            )
    notes = [*(cfg.get("notes") or []), *(data.get("notes") or [])]
    out += [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"
