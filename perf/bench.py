"""leansd against diffusers, Optimum ONNX Runtime and Optimum Intel, side by side, on the SD 1.5 architecture.

    python perf/bench.py --quick          # a reduced architecture at 256x256: checks the harness in minutes
    python perf/bench.py                  # SD 1.5 at 512x512, 20 steps: the real numbers (hours on 2 cores)

Steps, each in its own subprocess, each cached under perf/cache/<mode>/ and redone only when its inputs change:
  1. build the SD 1.5 architecture with seeded random weights and CLIP's real tokenizer (perf/build_model.py);
  2. export it with `sd-export --backend all` and with Optimum (`optimum-cli export onnx`,
     `optimum-cli export openvino` fp32 and int8 weight-only; hybrid int8 with --hybrid);
  3. measure each configuration in a fresh process (perf/worker.py): start -> ready, start -> first image,
     warm image, UNet step at batch 2, text encoder, VAE decode, peak RSS of the whole process;
  4. write perf/RESULTS.md (perf/RESULTS-quick.md in quick mode) and the raw numbers next to it as JSON.

A configuration that fails (package missing, export error, crash, timeout) becomes a table row with the reason.
See perf/README.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

PERF = Path(__file__).resolve().parent
REPO = PERF.parent
sys.path.insert(0, str(PERF))

import adopt  # noqa: E402
import ir_weights  # noqa: E402
import peers as registry  # noqa: E402
import report  # noqa: E402

CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent working since boot (/proc/stat: everything but idle and iowait)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def isa_cap_env(isa: str | None) -> dict:
    """The environment that caps oneDNN (OpenVINO's and PyTorch's kernels) at `isa` in a measuring process."""
    if not isa:
        return {}
    env = {"ONEDNN_MAX_CPU_ISA": isa.upper()}
    if isa.upper().startswith("AVX2"):  # PyTorch's own vector kernels and MKL's GEMMs take their own caps
        env.update(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    return env


def last_line(path: Path) -> str:
    """The last informative line of a log (for a one-line failure reason)."""
    try:
        lines = [l.strip() for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if not line.startswith(("warnings.warn", "  ", "^")):
            return line[:300]
    return lines[-1][:300] if lines else ""


def launch(argv: list[str], log_path: Path, timeout_s: float, stamp_time: bool = False, env_extra: dict | None = None) -> dict:
    """Run one subprocess in its own process group; return exit status, wall time and its peak RSS (wait4)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **CHILD_ENV, **(env_extra or {})}
    with open(log_path, "w") as logf:
        logf.write("$ " + shlex.join(argv) + "\n")
        logf.flush()
        start = time.time()
        busy0 = busy_cpu_seconds()
        if stamp_time:
            argv = [*argv, repr(start)]
        try:
            proc = subprocess.Popen(argv, stdout=logf, stderr=logf, cwd=REPO, env=env, start_new_session=True)
        except OSError as exc:
            return {"returncode": None, "error": f"cannot start {argv[0]}: {exc}", "wall_s": 0.0, "peak_rss_mb": None, "timed_out": False}
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() - start > timeout_s:
                timed_out = True
                os.killpg(proc.pid, signal.SIGTERM)
                for _ in range(50):
                    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        break
                    time.sleep(0.2)
                else:
                    os.killpg(proc.pid, signal.SIGKILL)
                    pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    wall = time.time() - start
    busy1 = busy_cpu_seconds()
    out = {"returncode": proc.returncode, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024.0, "timed_out": timed_out}
    if busy0 is not None and busy1 is not None and wall > 0:
        # The machine's CPU time minus the process's own: how many cores other work kept busy meanwhile.
        out["other_cpu_cores"] = max(0.0, (busy1 - busy0) - (usage.ru_utime + usage.ru_stime)) / wall
    if timed_out:
        out["error"] = f"timed out after {timeout_s:.0f} s"
    elif proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        out["error"] = f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    elif proc.returncode:
        out["error"] = last_line(log_path) or f"exit status {proc.returncode}"
    return out


def available_memory_gb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available / 2**30


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def folder_size_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


class Bench:
    def __init__(self, args, config: dict, cache: Path):
        self.args = args
        self.config = config
        self.cache = cache
        self.run_dir = cache / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stamps = cache / "stamps"
        self.stamps.mkdir(exist_ok=True)
        self.source_info: dict = {}
        self.exports: dict[str, dict] = {}
        self.image_reference = "diffusers PyTorch fp32"

    # --------------------------------------------------------------------------------------- source model
    def source(self) -> Path | None:
        key = self.source_key()
        stamp = self.stamps / "source.json"
        saved = json.loads(stamp.read_text()) if stamp.is_file() else {}
        self.source_info["command"] = f"python perf/build_model.py perf/configs/{self.config['name']}.json SRC"
        if self.args.adopt_source and (saved.get("path") != str(self.args.adopt_source.resolve()) or saved.get("key") != key):
            try:
                saved = adopt.source(stamp, self.args.adopt_source, key, self.source_info["command"].replace("SRC", str(self.args.adopt_source)))
            except adopt.AdoptError as exc:
                raise SystemExit(f"bench.py: {exc}") from exc
            for old in self.stamps.glob("export-*.json"):  # new weights: every export is stale
                old.unlink()
            log(f"adopted the source model {saved['path']} ({saved['built_outside']})")
        # An adopted folder stays where it was built; a stale one is never rebuilt in place (it is someone else's).
        src = Path(saved["path"]) if saved.get("path") and saved.get("key") == key else self.cache / "source"
        config_file = self.run_dir / "model-config.json"
        config_file.write_text(json.dumps(self.config, indent=1))
        cmd = [sys.executable, str(PERF / "build_model.py"), str(config_file), str(src)]
        if src.is_dir() and saved.get("key") == key and not self.args.rebuild:
            self.source_info.update(saved, cached=True)
        else:
            log(f"building the {self.config['name']} model with random weights -> {src}")
            res = launch(cmd, self.run_dir / "build.log", self.args.export_timeout)
            if res.get("error"):
                self.source_info.update(ok=False, error=res["error"])
                log(f"  build FAILED: {res['error']}")
                return None
            for old in self.stamps.glob("export-*.json"):  # new weights: every export is stale
                old.unlink()
            info = {"key": key, "wall_s": res["wall_s"], "peak_rss_mb": res["peak_rss_mb"], "built_at": datetime.now().isoformat(timespec="seconds")}
            stamp.write_text(json.dumps(info))
            self.source_info.update(info, cached=False)
            log(f"  built in {res['wall_s']:.0f} s, peak RSS {res['peak_rss_mb'] / 1024:.1f} GB")
        width = {"float16": 2, "bfloat16": 2}.get(self.config.get("save_dtype"), 4)  # bytes per stored parameter
        parts = [c for c in ("unet", "text_encoder", "text_encoder_2", "vae") if (src / c).is_dir()]
        sizes = {c: sum(f.stat().st_size for f in (src / c).glob("*.safetensors")) / width / 1e6 for c in parts}
        self.source_info["params"] = ", ".join(f"{c} {n:.0f} M" for c, n in sizes.items())
        self.source_info["ok"] = True
        return src

    def source_key(self) -> str:
        """What the random-weight model is built from: the config's model sections (SDXL: the shipped configs it names,
        with their content, its overrides and the dtype it is stored in) and the libraries that build it."""
        keys = ("seed", "unet", "vae", "text_encoder", "scheduler", "scheduler_class", "pipeline", "configs", "save_dtype", "overrides")
        sections = {k: self.config[k] for k in keys if k in self.config}
        if "configs" in self.config:
            shipped = sorted(p for p in (REPO / self.config["configs"]).rglob("*.json"))
            sections["configs_content"] = digest({str(p.relative_to(REPO)): p.read_text() for p in shipped})
        versions = report.versions()
        return digest({"model": sections, "torch": versions["torch"], "diffusers": versions["diffusers"], "transformers": versions["transformers"]})

    def tiny_vae_source(self) -> Path | None:
        """A seeded random TAESD-architecture `AutoencoderTiny` folder (built once, ~10 MB)."""
        out = self.cache / "taesd"
        if not (out / "config.json").is_file():
            log(f"building a tiny VAE with random weights -> {out}")
            res = launch([sys.executable, str(PERF / "build_model.py"), "--tiny-vae", str(out)], self.run_dir / "build-taesd.log", 600)
            if res.get("error"):
                log(f"  tiny VAE build FAILED: {res['error']}")
                return None
        return out

    # --------------------------------------------------------------------------------------- exports
    def export(self, key: str, src: Path | None) -> dict:
        if key in self.exports:
            return self.exports[key]
        exp = registry.exports_for(self.config.get("pipeline"))[key]
        out = self.cache / key
        entry = {"label": exp.label, "display": exp.display(), "ok": False, "path": str(out)}
        self.exports[key] = entry
        if src is None:
            entry["error"] = f"no source model ({self.source_info.get('error', 'build failed')})"
            return entry
        stamp = self.stamps / f"export-{key}.json"
        versions = {k: v for k, v in report.versions().items() if k != "leansd"}
        want = {"source": self.source_info["key"], "command": exp.display(), "versions": versions}
        if key.startswith("leansd") and not self.args.reuse_exports:  # the exporter is being developed: re-export when its code changes
            want["exporter_code"] = digest([f.read_text() for f in sorted((REPO / "leansd" / "export").glob("*.py"))])
        if key in self.args.adopt_export:
            folder, log_path = self.args.adopt_export[key]
            try:
                adopt.export(stamp, folder, log_path, {k: v for k, v in want.items() if k != "exporter_code"}, exp.display())
            except adopt.AdoptError as exc:
                entry["error"] = str(exc)
                log(f"  cannot adopt the {key} export: {exc}")
                return entry
        saved = json.loads(stamp.read_text()) if stamp.is_file() else {}
        out = Path(saved.get("path") or out)  # an adopted export stays where it was made
        entry["path"] = str(out)
        if out.is_dir() and saved and not self.args.reexport:
            saved_inputs = dict(saved.get("inputs") or {})
            if self.args.reuse_exports or saved.get("adopted"):  # an adopted export is never redone for a code change
                saved_inputs.pop("exporter_code", None)
                want.pop("exporter_code", None)
            if digest(saved_inputs) == digest(want):
                entry.update(ok=True, cached=True, wall_s=saved.get("wall_s"), peak_rss_mb=saved.get("peak_rss_mb"),
                             measured_at=saved.get("measured_at"), size_gb=folder_size_gb(out), adopted=saved.get("adopted"),
                             weights=ir_weights.summary(out))  # fmt: skip
                return entry
        out = self.cache / key
        taesd = self.tiny_vae_source() if exp.needs_tiny_vae else None
        if exp.needs_tiny_vae and taesd is None:
            entry["error"] = "could not build the tiny VAE"
            return entry
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        log(f"exporting: {exp.display()}")
        res = launch(exp.argv(src, staging, taesd), self.run_dir / f"export-{key}.log", self.args.export_timeout)
        entry.update(wall_s=res["wall_s"], peak_rss_mb=res["peak_rss_mb"])
        if res.get("error") or not staging.is_dir():
            entry["error"] = res.get("error") or "the exporter wrote nothing"
            shutil.rmtree(staging, ignore_errors=True)
            log(f"  export FAILED: {entry['error']}")
            return entry
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        entry.update(ok=True, size_gb=folder_size_gb(out), weights=ir_weights.summary(out))
        stamp.write_text(json.dumps({"inputs": want, "wall_s": res["wall_s"], "peak_rss_mb": res["peak_rss_mb"],
                                     "measured_at": datetime.now().isoformat(timespec="seconds")}))  # fmt: skip
        log(f"  done in {res['wall_s']:.0f} s, peak RSS {res['peak_rss_mb'] / 1024:.1f} GB, {entry['size_gb']:.2f} GB on disk")
        return entry

    # --------------------------------------------------------------------------------------- peers
    def opted_in(self, peer: registry.Peer) -> bool:
        return peer.opt_in is None or bool(getattr(self.args, peer.opt_in.lstrip("-").replace("-", "_")))

    def skip_reason(self, peer: registry.Peer, folder: Path | None) -> str | None:
        if peer.slot:
            return peer.slot
        if not self.opted_in(peer):
            return f"opt-in: pass {peer.opt_in} (offline NNCF calibration, slow)"
        if peer.needs_precision and folder is not None:
            try:
                manifest = json.loads((folder / "leansd.json").read_text())
            except (OSError, ValueError):
                return "the leansd export has no readable leansd.json"
            backend = {"onnxruntime": "onnx", "openvino": "openvino"}[peer.options["backend"]]
            have = manifest.get("components", {}).get("unet", {}).get(backend, {})
            if peer.needs_precision not in have:
                return f"sd-export wrote no {peer.needs_precision} UNet for {backend} (has: {', '.join(sorted(have)) or 'none'})"
        return None

    def measure(self, peer: registry.Peer, src: Path | None) -> dict:
        row = {"name": peer.name, "label": peer.label, "kind": peer.kind, "folder_key": peer.export, "options": dict(peer.options)}
        folder = src
        if peer.slot is None and self.opted_in(peer):
            if peer.export is not None:
                exp = self.export(peer.export, src)
                if not exp["ok"]:
                    row.update(status="failed", reason=f"export failed: {exp.get('error')}")
                    return row
                folder = Path(exp["path"])
            elif src is None:
                row.update(status="failed", reason=f"no source model ({self.source_info.get('error')})")
                return row
        reason = self.skip_reason(peer, folder)
        if reason:
            row.update(status="not run", reason=reason)
            return row
        out_dir = self.run_dir / peer.name
        options = dict(peer.options)
        if options.get("cache_dir") == "@fresh":
            options["cache_dir"] = str(out_dir / "compile-cache")
            row["options"]["cache_dir"] = "<fresh folder>"
        run = {**self.config["run"], "seed": 0, "repeats": self.args.repeats, "images": self.args.images, "pipeline": self.config.get("pipeline")}
        if peer.prime:
            # The same generation as the measured one: a shorter one may compile other shapes (a guidance cutoff
            # switches batch sizes), leaving the measured process to compile and write those blobs itself.
            prime = self._spawn(peer, folder, options, {**run, "images": 1, "repeats": 0}, out_dir / "prime")
            row["prime"] = {k: prime.get(k) for k in ("status", "reason", "peak_rss_mb")} | {"cold_s": (prime.get("result") or {}).get("cold_s"), "steps": run["steps"]}
            if prime["status"] != "ok":
                row.update(status="failed", reason=f"priming run failed: {prime.get('reason')}")
                return row
        row["run"] = {k: run[k] for k in ("steps", "height", "width", "guidance_scale", "repeats", "images")}
        row.update(self._spawn(peer, folder, options, run, out_dir))
        if self.args.processes > 1 and row["status"] == "ok" and run["images"] > 0:
            self._more_cold_processes(peer, folder, options, run, out_dir, row)
        if options.get("cache_dir") and peer.options.get("cache_dir") == "@fresh":
            shutil.rmtree(options["cache_dir"], ignore_errors=True)  # compiled blobs are as big as the model
        return row

    def _more_cold_processes(self, peer: registry.Peer, folder: Path, options: dict, run: dict, out_dir: Path, row: dict) -> None:
        """Start the configuration again in fresh processes that only make the cold image: the first image of a process
        is the noisiest figure here, so the row reports the median of all processes (and the largest peak RSS)."""
        colds, peaks = [row["result"]["cold_s"]], [row["peak_rss_mb"]]
        for i in range(1, self.args.processes):
            extra = self._spawn(peer, folder, options, {**run, "images": 1, "repeats": 0}, out_dir / f"process{i + 1}")
            if extra["status"] != "ok":
                row.update(status="failed", reason=f"process {i + 1} of {self.args.processes}: {extra.get('reason')}")
                return
            colds.append(extra["result"]["cold_s"])
            peaks.append(extra["peak_rss_mb"])
        row["result"].update(cold_s=statistics.median(colds), cold_runs_s=colds)
        row["peak_rss_mb"], row["peak_rss_runs_mb"] = max(peaks), peaks

    def _spawn(self, peer: registry.Peer, folder: Path, options: dict, run: dict, out_dir: Path) -> dict:
        out_dir.mkdir(parents=True, exist_ok=True)
        spec = {"peer": peer.name, "kind": peer.kind, "folder": str(folder), "options": options, "run": run, "out_dir": str(out_dir)}
        spec_path = out_dir / "spec.json"
        row: dict = {"loadavg": loadavg(), "command": f"python perf/worker.py {spec_path.relative_to(REPO) if spec_path.is_relative_to(REPO) else spec_path}"}

        spec_path.write_text(json.dumps(spec, indent=1))
        argv = [sys.executable, str(PERF / "worker.py"), str(spec_path)]
        # The spawn time goes last on the command line, stamped just before the fork.
        res = launch(argv, out_dir / "worker.log", self.config["run"].get("timeout_s", 3600) if self.args.timeout is None else self.args.timeout,
                     stamp_time=True, env_extra=isa_cap_env(self.args.cap_isa))  # fmt: skip
        row["peak_rss_mb"] = res["peak_rss_mb"]
        row["other_cpu_cores"] = res.get("other_cpu_cores")
        result_path = out_dir / "result.json"
        result = json.loads(result_path.read_text()) if result_path.is_file() and not res.get("timed_out") else None
        row["result"] = result
        if result is not None and result.get("ok"):
            row["status"] = "ok"
        else:
            row["status"] = "failed"
            row["reason"] = (result or {}).get("error") or res.get("error") or "no result written"
        return row

    # --------------------------------------------------------------------------------------- comparison
    def compare_images(self, rows: list[dict]) -> None:
        import numpy as np

        def image_path(row: dict) -> Path:  # rows kept from an earlier run (--add-to) live in that run's folder
            return (REPO / row["run_dir"] if row.get("run_dir") else self.run_dir) / row.get("peer", row["name"]) / "image.npy"

        # diffusers is the reference; without it, leansd's own fp32 run (itself within ~1e-6 of diffusers). Only rows
        # that made an image count (an earlier run's folder may have been cleaned up, a row may time components only).
        # Images are compared at equal step counts (rows of another --steps run have their own reference).
        def steps(row: dict) -> int | None:
            return (row.get("run") or {}).get("steps")

        refs: dict = {}
        for name in ("diffusers-pt-fp32", "leansd-ov-fp32", "leansd-ort-fp32", "leansd-ort-fp32-static-export"):
            for r in rows:
                if r.get("peer", r["name"]) == name and r.get("status") == "ok" and image_path(r).is_file():
                    refs.setdefault(steps(r), r)
        if not refs:
            return
        self.image_reference = " / ".join(dict.fromkeys(r["label"] for r in refs.values()))
        for r in rows:
            path = image_path(r)
            if r.get("status") == "ok" and path.is_file() and steps(r) in refs:
                ref = np.load(image_path(refs[steps(r)]))
                img = np.load(path)
                if img.shape == ref.shape:
                    r["max_abs_diff"] = float(np.abs(img - ref).max())
                    r["mean_abs_diff"] = float(np.abs(img - ref).mean())
                    rms = float(np.sqrt(np.mean((img - ref) ** 2)))
                    r["psnr_db"] = float(20 * np.log10(1.0 / rms)) if rms > 0 else None


def select_peers(args) -> list[registry.Peer]:
    if args.peers in (None, "all"):
        chosen = list(registry.PEERS)
    else:
        names = [n.strip() for n in args.peers.split(",") if n.strip()]
        unknown = [n for n in names if n not in {p.name for p in registry.PEERS}]
        if unknown:
            raise SystemExit(f"bench.py: unknown configuration(s) {unknown}; see --list")
        chosen = [registry.peer_by_name(n) for n in names]
    # diffusers first: its image is the reference the others are compared with.
    return sorted(chosen, key=lambda p: p.name != "diffusers-pt-fp32")


def default_output(mode: str) -> Path:
    return PERF / ("RESULTS.md" if mode == "full" else f"RESULTS-{mode}.md")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="perf/bench.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="reduced architecture at 256x256, 10 steps (minutes, not SD 1.5 numbers)")
    p.add_argument("--config", type=Path, help="a model/run config JSON instead of perf/configs/{full,quick}.json")
    p.add_argument("--repeats", type=int, help="timed calls per component, after one warm-up (default: from the config: 5 full, 3 quick)")
    p.add_argument("--processes", type=int, default=1,
                   help="fresh processes per configuration: the cold image (start -> 1st image) is their median (default: 1)")
    p.add_argument("--images", type=int, help="whole images per process; the first is the cold one (default: 2)")
    p.add_argument("--peers", help="comma-separated configurations to run (default: all; see --list)")
    p.add_argument("--hybrid", action="store_true", help="also export and run Optimum Intel's hybrid int8 (slow NNCF calibration)")
    p.add_argument("--timeout", type=float, help="seconds per measuring process (default: from the config)")
    p.add_argument("--export-timeout", type=float, default=None, help="seconds per build/export process (default: 3 h full, 30 min quick)")
    p.add_argument("--reuse-exports", action="store_true",
                   help="keep cached leansd exports although leansd's exporter code changed since (when the change does not touch these files)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the random-weight model (and so every export)")
    p.add_argument("--reexport", action="store_true", help="redo the exports even if the cached ones are current")
    p.add_argument("--output", type=Path, help="report path (default: perf/RESULTS.md, or perf/RESULTS-quick.md with --quick)")
    p.add_argument("--prepare-only", action="store_true",
                   help="build the model and the exports the selected configurations need, then stop (prepare on a busy machine, measure on an idle one)")
    p.add_argument("--add-to", type=Path, metavar="RESULTS_JSON",
                   help="measure the chosen configurations and merge them into an earlier run's results (its other rows are kept)")
    p.add_argument("--steps", type=int, help="denoising steps of each whole image (default: from the config)")
    p.add_argument("--adopt-source", type=Path, metavar="DIR",
                   help="use this diffusers folder, built outside the benchmark with perf/build_model.py and this config, as the model")
    p.add_argument("--adopt-export", action="append", default=[], metavar="KEY=DIR,LOG",
                   help="use DIR as export KEY, made outside the benchmark with the command --list shows for KEY and timed by "
                        "/usr/bin/time -v into LOG (its wall time and peak RSS go into the report)")
    p.add_argument("--row-suffix", metavar="TEXT",
                   help="name this run's rows CONFIGURATION@TEXT and add ', TEXT' to their labels, so that with --add-to they sit beside "
                        "the earlier rows of the same configurations (e.g. 'whole image', '4 steps') instead of replacing them")
    p.add_argument("--cap-isa", metavar="ISA",
                   help="run the measuring processes with oneDNN capped to this instruction set (ONEDNN_MAX_CPU_ISA, e.g. AVX2): "
                        "a proxy for an older CPU on a newer one, marked as such in the report. MLAS matrix products (ONNX "
                        "Runtime's, and OpenVINO's fully connected layers) ignore the cap; on a bf16 CPU OpenVINO's default "
                        "precision fails to compile under it, so pick f32 rows")
    p.add_argument("--list", action="store_true", help="list the configurations and exports, then exit")
    p.add_argument("--render", type=Path, metavar="RESULTS_JSON", help="only rewrite the report from a saved results JSON")
    args = p.parse_args(argv)
    adopted = {}
    if args.processes < 1:
        p.error("--processes must be at least 1")
    for item in args.adopt_export:
        key, _, rest = item.partition("=")
        folder, _, log_path = rest.partition(",")
        if not key or not folder or not log_path:
            p.error(f"--adopt-export {item!r}: expected KEY=DIR,LOG")
        adopted[key] = (Path(folder), Path(log_path))
    args.adopt_export = adopted
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        for peer in registry.PEERS:
            extra = f" [slot: {peer.slot}]" if peer.slot else f" [opt-in: {peer.opt_in}]" if peer.opt_in else ""
            print(f"{peer.name:26s} {peer.label}{extra}")
        print()
        for e in registry.EXPORTS.values():
            print(f"export {e.key:18s} {e.display()}" + (f" [opt-in: {e.opt_in}]" if e.opt_in else ""))
        for e in registry.SDXL_EXPORTS.values():
            print(f"export {e.key:18s} {e.display()} [SDXL configs]")
        return 0
    if args.render:
        data = json.loads(args.render.read_text())
        output = args.output or default_output(data["mode"])
        output.write_text(report.render(data))
        log(f"wrote {output}")
        return 0
    config_path = args.config or PERF / "configs" / ("quick.json" if args.quick else "full.json")
    config = json.loads(config_path.read_text())
    mode = config["name"]
    if args.steps is not None:
        config["run"]["steps"] = args.steps
    args.repeats = config["run"]["repeats"] if args.repeats is None else args.repeats
    args.images = config["run"].get("images", 2) if args.images is None else args.images
    if args.export_timeout is None:
        args.export_timeout = 1800.0 if mode.endswith("quick") else 3 * 3600.0
    output = args.output or default_output(mode)
    cache = PERF / "cache" / config.get("cache", mode)  # configs of one model (SDXL and SDXL-Turbo) share its exports
    cache.mkdir(parents=True, exist_ok=True)

    started = datetime.now().isoformat(timespec="seconds")
    load0 = loadavg()
    log(f"mode {mode}{' (QUICK: reduced architecture, not SD 1.5 numbers)' if mode == 'quick' else ''}; cache {cache}")
    if load0 > 1.0:
        log(f"warning: load average {load0:.2f}: other work is using the CPU, timings will be inflated")
    free_gb = available_memory_gb()
    if free_gb is not None and free_gb < (4 if mode.endswith("quick") else 14):
        log(f"warning: only {free_gb:.1f} GB of memory available; the full-size exports need about 11 GB")
    bench = Bench(args, config, cache)
    src = bench.source()
    if args.prepare_only:
        for key in dict.fromkeys(p.export for p in select_peers(args) if p.export and bench.opted_in(p)):
            entry = bench.export(key, src)
            if not entry.get("ok"):
                return 1
        log("prepared; run again without --prepare-only to measure")
        return 0
    if args.add_to and not args.add_to.is_file():
        raise SystemExit(f"bench.py: --add-to {args.add_to}: no such results file; run once without --add-to (with --output) to start one")
    previous = json.loads(args.add_to.read_text()) if args.add_to else None
    if previous is not None and previous.get("mode") != mode:
        raise SystemExit(f"bench.py: {args.add_to} is a {previous.get('mode')} run, this is {mode}")
    cap = args.cap_isa.upper() if args.cap_isa else None
    if previous is not None and previous.get("isa_cap") != cap:
        raise SystemExit(f"bench.py: {args.add_to} ran with ISA cap {previous.get('isa_cap')}, this run with {cap}: keep them apart")
    rows = []
    for peer in select_peers(args):
        log(f"{peer.name}: ...")
        row = bench.measure(peer, src)
        row["run_dir"] = str(bench.run_dir.relative_to(REPO))
        if args.row_suffix:  # rows of their own beside the same configurations' earlier rows (--add-to)
            row.update(peer=peer.name, name=f"{peer.name}@{args.row_suffix}", label=f"{peer.label}, {args.row_suffix}")
        rows.append(row)
        r = row.get("result") or {}
        if row["status"] == "ok":
            log(f"  cold {r.get('cold_s', float('nan')):.1f} s, UNet step {r.get('unet_step_s', float('nan')):.3f} s, "
                f"peak RSS {row['peak_rss_mb'] / 1024:.2f} GB")  # fmt: skip
        else:
            log(f"  {row['status']}: {row.get('reason')}")
    this_command = "python perf/bench.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    this_run = {"started": started, "command": this_command.rstrip(), "run_dir": str(bench.run_dir.relative_to(REPO)),
                "peers": [r["name"] for r in rows]}
    runs = [this_run]
    if previous is not None:
        fresh = {r["name"] for r in rows}
        kept = [{**r, "run_dir": r.get("run_dir") or previous["run_dir"]} for r in previous["peers"] if r["name"] not in fresh]
        order = {p.name: i for i, p in enumerate(registry.PEERS)}
        rows = sorted(kept + rows, key=lambda r: (r.get("peer", r["name"]) != "diffusers-pt-fp32", order.get(r.get("peer", r["name"]), len(order)),
                                                  r["name"]))
        earlier = previous.get("runs") or [{"started": previous["started"], "command": previous["command"],
                                            "run_dir": previous["run_dir"], "peers": [r["name"] for r in kept]}]
        runs = earlier + [this_run]
        bench.exports = {**previous.get("exports", {}), **bench.exports}
        started = previous["started"]
        load0 = min(load0, previous.get("loadavg_start", load0))
    bench.compare_images(rows)
    calls = {r["result"].get("unet_calls_per_image") for r in rows if r.get("status") == "ok" and r.get("result")} - {None}
    data = {
        "mode": mode,
        "config": previous["config"] if previous else config,  # the first run's settings; --row-suffix rows name theirs
        "started": started,
        "finished": datetime.now().isoformat(timespec="seconds"),
        "loadavg_start": load0,
        "loadavg_end": loadavg(),
        "available_memory_gb_start": free_gb,
        "machine": report.machine(),
        "isa_cap": cap,
        "versions": report.versions(),
        "command": this_command,
        "repeats": previous["repeats"] if previous else args.repeats,
        "images": previous["images"] if previous else args.images,
        "source": bench.source_info,
        "exports": bench.exports,
        "peers": rows,
        "image_reference": bench.image_reference,
        "unet_calls_per_image": next(iter(calls)) if len(calls) == 1 else sorted(c for c in calls if c is not None) or "?",
        "run_dir": str(bench.run_dir.relative_to(REPO)),
        "runs": runs,
    }
    data["command"] = data["command"].rstrip()
    for e in data["exports"].values():
        if os.path.isabs(e["path"]):  # rows merged from an earlier run are relative already
            e["path"] = os.path.relpath(e["path"], REPO)
    output.write_text(report.render(data))
    output.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    (bench.run_dir / "results.json").write_text(json.dumps(data, indent=1, default=str))
    log(f"wrote {output} and {output.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
