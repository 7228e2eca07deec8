"""Part 1 of ``benchmarks/merge.py``: wall time and peak memory of ``deltatune merge`` vs ``mergekit-yaml``.

Workload (merging.md §B): a random ``LlamaForCausalLM`` base (seed 0; 105.8 M parameters at the full
size) and three "fine-tunes" ``ft_i = base + N(0, std²)`` (std 1e-3, generator seeds 100 + i), all bf16
single-file safetensors checkpoints, generated once and cached.  Each method's mergekit YAML (§B's
``ties.yml`` / ``ta.yml`` / ``dare_ties.yml``, absolute paths) is run by both tools, each in its own
process:

* ``mergekit-yaml CFG OUT --no-copy-tokenizer --random-seed 0``
* ``deltatune merge CFG --out OUT``  (the same YAML: deltatune reads it with mergekit semantics)

Measurement: wall time from ``Popen`` to ``wait4``; peak RSS = GNU ``time``'s "maximum resident set
size" (``%M``, as in §B); peak ``RssAnon`` (heap) and
``RssFile`` (mmap'd inputs, page cache) from ``/proc/<pid>/status`` sampled every 0.1 s (summed over
the process and its descendants).  Before *every* timed run all input files are read once, so every
run starts with the inputs in the page cache (warm cache for everyone: the numbers compare merging,
not the disk).  The tools' order alternates per method and per repeat.

The I/O floor is a third process that imports torch + safetensors (the start-up every tool pays),
loads every tensor of the four inputs (``safetensors.torch.load_file``) and writes one checkpoint of
the same size (``save_file``, no fsync: mergekit does not fsync either); ``vs_io_floor`` divides a
tool's wall time by that process's wall time.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from merge_settings import SPEED_METHODS, TARGETS, SpeedSettings

_BIN = Path(sys.executable).parent
GNU_TIME = "/usr/bin/time"


# --- model generation ----------------------------------------------------------------------------------
def _generate_child(llama: dict[str, Any], out: str, n_models: int, std: float, base_seed: int) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(base_seed)
    model = LlamaForCausalLM(LlamaConfig(**llama)).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(Path(out) / "base", safe_serialization=True)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i in range(n_models):
        gen = torch.Generator().manual_seed(100 + i)
        noisy = {k: (v.float() + torch.randn(v.shape, generator=gen) * std).to(v.dtype) for k, v in base.items()}
        model.load_state_dict(noisy)
        model.save_pretrained(Path(out) / f"ft{i}", safe_serialization=True)
    return {"params": n_params, "tensors": len(base), "generate_s": round(time.perf_counter() - t0, 1)}


def ensure_models(work: Path, s: SpeedSettings, log=print) -> dict[str, Any]:
    """Base + fine-tunes under ``work/models-<size>`` (generated once; ``done.json`` marks completion)."""
    from _common import run_isolated

    tag = f"h{s.llama['hidden_size']}-l{s.llama['num_hidden_layers']}-v{s.llama['vocab_size']}"
    root = (Path(work) / f"models-{tag}").resolve()
    done = root / "done.json"
    want = {"llama": s.llama, "n_models": s.n_models, "noise_std": s.noise_std, "base_seed": s.base_seed}
    if done.is_file() and json.loads(done.read_text()).get("settings") == want:
        info = json.loads(done.read_text())
    else:
        shutil.rmtree(root, ignore_errors=True)
        log(f"generating base + {s.n_models} fine-tunes ({tag}) under {root}")
        info = {"settings": want, **run_isolated(_generate_child, s.llama, str(root), s.n_models, s.noise_std,
                                                 s.base_seed, preload=("torch", "transformers"))}
        done.write_text(json.dumps(info, indent=1))
    info["root"] = str(root)
    info["base"] = str(root / "base")
    info["models"] = [str(root / f"ft{i}") for i in range(s.n_models)]
    info["bytes_per_model"] = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
    return info


def write_yaml(path: Path, method: str, base: str, models: list[str]) -> Path:
    """mergekit YAML of merging.md §B for ``method`` (absolute model paths, bf16)."""
    spec = SPEED_METHODS[method]

    def val(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)

    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for m in models:
        params = ", ".join(f"{k}: {val(v)}" for k, v in spec["model"].items())
        lines += [f"  - model: {m}", f"    parameters: {{{params}}}"]
    if spec["global"]:
        lines += ["parameters:"] + [f"  {k}: {val(v)}" for k, v in spec["global"].items()]
    lines.append("dtype: bfloat16")
    path.write_text("\n".join(lines) + "\n")
    return path


# --- measurement ---------------------------------------------------------------------------------------
def _status_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _tree(pid: int) -> list[int]:
    try:
        import psutil

        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - the process may be gone between two samples
        return [pid]


def run_measured(cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
                 interval: float = 0.1) -> dict[str, Any]:
    """Run ``cmd`` (output to ``log_path``): wall time, peak RSS and sampled peak RssAnon / RssFile.

    Peak RSS is GNU time's "maximum resident set size" (``/usr/bin/time``, as merging.md §B): the
    ``ru_maxrss`` of a child forked from the tiny ``time`` process.  (``wait4`` on a child of *this*
    process would not do: Linux carries the pre-exec RSS of the forked Python parent into the child's
    ``ru_maxrss``.)  Without GNU time it falls back to the largest ``VmHWM`` sampled.  RssAnon / RssFile
    are summed over the measured process and its descendants (GNU time itself excluded).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    time_file = log_path.with_suffix(".time")
    wrapped = Path(GNU_TIME).is_file()
    full = [GNU_TIME, "-f", "MAXRSS_KB %M", "-o", str(time_file), *cmd] if wrapped else cmd
    peak = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            sums = {k: 0 for k in peak}
            tree = _tree(proc.pid)
            for p in tree[1:] if wrapped else tree:
                st = _status_kb(p)
                for k in sums:
                    sums[k] += st.get(k, 0)
            for k in peak:
                peak[k] = max(peak[k], sums[k])
            time.sleep(interval)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    maxrss_kb = None
    if wrapped and time_file.is_file():
        for line in time_file.read_text().splitlines():
            if line.startswith("MAXRSS_KB "):
                maxrss_kb = int(line.split()[1])
    return {"wall_s": round(wall, 3), "peak_mb": round((maxrss_kb or peak["VmHWM"]) / 1024, 1),
            "peak_source": "GNU time %M" if maxrss_kb else "sampled VmHWM",
            "peak_hwm_sampled_mb": round(peak["VmHWM"] / 1024, 1),
            "peak_anon_mb": round(peak["RssAnon"] / 1024, 1), "peak_file_mb": round(peak["RssFile"] / 1024, 1),
            "user_s": round(usage.ru_utime, 2), "sys_s": round(usage.ru_stime, 2), "rc": proc.returncode}


def warm_cache(dirs: list[str]) -> float:
    """Read every file under ``dirs`` once (puts the inputs in the page cache); returns seconds."""
    t0 = time.perf_counter()
    for d in dirs:
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(1 << 23):
                        pass
    return time.perf_counter() - t0


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


_FLOOR = r"""
import json, sys, time
t0 = time.perf_counter()
import torch  # noqa: F401 - the start-up cost every tool pays
from safetensors.torch import load_file, save_file
t1 = time.perf_counter()
out, files = sys.argv[1], sys.argv[2:]
loaded = [load_file(f) for f in files]
nbytes = sum(t.numel() * t.element_size() for sd in loaded for t in sd.values())
t2 = time.perf_counter()
save_file(loaded[-1], out, metadata={"format": "pt"})
t3 = time.perf_counter()
print("FLOOR " + json.dumps({"import_s": t1 - t0, "read_s": t2 - t1, "write_s": t3 - t2, "bytes_read": nbytes}))
"""


def io_floor(models: dict[str, Any], out_dir: Path, log: Path, env: dict[str, str]) -> dict[str, Any]:
    """The I/O floor process (see the module docstring): wall time, peaks and its import/read/write split."""
    files = [str(f) for d in [models["base"], *models["models"]] for f in sorted(Path(d).glob("*.safetensors"))]
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    res = run_measured([sys.executable, "-c", _FLOOR, str(out_dir / "model.safetensors"), *files], log, env)
    for line in _tail(log, 4000).splitlines():
        if line.startswith("FLOOR "):
            res.update({k: round(v, 3) if isinstance(v, float) else v for k, v in json.loads(line[6:]).items()})
    return res


# --- output agreement ------------------------------------------------------------------------------------
def _tensor_files(d: Path) -> dict[str, Path]:
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            where.update({k: f for k in fh.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return where


def _compare_child(a: str, b: str, base: str) -> dict[str, Any]:
    """Element agreement of two merged checkpoints (and how many elements each changed vs the base)."""
    from safetensors import safe_open

    fa, fb, f0 = _tensor_files(Path(a)), _tensor_files(Path(b)), _tensor_files(Path(base))
    missing = sorted(set(fa) ^ set(fb))
    n = equal = changed_a = changed_b = 0
    max_diff = 0.0
    for name in sorted(set(fa) & set(fb)):
        with safe_open(str(fa[name]), "pt") as ha, safe_open(str(fb[name]), "pt") as hb:
            ta, tb = ha.get_tensor(name), hb.get_tensor(name)
        if ta.shape != tb.shape:
            missing.append(f"{name} (shape {tuple(ta.shape)} vs {tuple(tb.shape)})")
            continue
        n += ta.numel()
        equal += int((ta == tb).sum())
        max_diff = max(max_diff, float((ta.float() - tb.float()).abs().max()))
        if name in f0:
            with safe_open(str(f0[name]), "pt") as h0:
                t0 = h0.get_tensor(name)
            changed_a += int((ta != t0).sum())
            changed_b += int((tb != t0).sum())
        del ta, tb
    return {"agree": round(equal / max(n, 1), 6), "max_abs_diff": max_diff,
            "changed_mergekit": round(changed_a / max(n, 1), 4), "changed_deltatune": round(changed_b / max(n, 1), 4),
            "mismatched_tensors": missing[:10]}


# --- the benchmark ---------------------------------------------------------------------------------------
def tool_commands(cfg: Path, out: Path) -> dict[str, list[str]]:
    mergekit = shutil.which("mergekit-yaml") or str(_BIN / "mergekit-yaml")
    deltatune = shutil.which("deltatune") or str(_BIN / "deltatune")
    return {"mergekit": [mergekit, str(cfg), str(out), "--no-copy-tokenizer", "--random-seed", "0"],
            "deltatune": [deltatune, "merge", str(cfg), "--out", str(out)]}


def available(tool: str) -> str | None:
    """None when the tool's executable exists, else why not."""
    exe = tool_commands(Path("x"), Path("y"))[tool][0]
    return None if Path(exe).is_file() else f"{Path(exe).name} not found (looked in PATH and {_BIN})"


def run_speed(work: Path, s: SpeedSettings, log=print) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All rows of part 1 (one per method × tool, plus the I/O floor) and the part's metadata."""
    from _common import run_isolated

    work = Path(work).resolve()
    models = ensure_models(work, s, log)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    speed_dir = work / f"speed-{Path(models['root']).name}"
    inputs = [models["base"], *models["models"]]
    (speed_dir / "configs").mkdir(parents=True, exist_ok=True)
    cfgs = {m: write_yaml(speed_dir / "configs" / f"{m}.yml", m, models["base"], models["models"])
            for m in SPEED_METHODS}
    missing = {t: available(t) for t in ("mergekit", "deltatune")}
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    floors: list[dict[str, Any]] = []
    for rep in range(s.repeats):
        warm_cache(inputs)
        floors.append(io_floor(models, speed_dir / "out" / "io_floor", speed_dir / "logs" / f"io_floor-{rep}.log", env))
        log(f"[speed] repeat {rep + 1}/{s.repeats}: I/O floor {floors[-1]['wall_s']:.2f} s")
        for i, method in enumerate(SPEED_METHODS):
            order = ("mergekit", "deltatune") if (i + rep) % 2 == 0 else ("deltatune", "mergekit")
            for tool in order:
                if missing[tool]:
                    continue
                out = speed_dir / "out" / f"{tool}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                warm_cache(inputs)
                cmd = tool_commands(cfgs[method], out)[tool]
                res = run_measured(cmd, speed_dir / "logs" / f"{tool}-{method}-{rep}.log", env)
                if res["rc"] != 0:
                    res["error"] = _tail(speed_dir / "logs" / f"{tool}-{method}-{rep}.log", 600)
                runs.setdefault((method, tool), []).append(res)
                log(f"[speed]   {method:16s} {tool:9s} {res['wall_s']:7.2f} s  peak {res['peak_mb']:7.1f} MB "
                    f"(anon {res['peak_anon_mb']:.1f})" + ("  FAILED" if res["rc"] else ""))

    floor_wall = statistics.median(f["wall_s"] for f in floors)
    rows: list[dict[str, Any]] = [{
        "part": "speed", "method": "io_floor", "tool": "safetensors", "wall_s": floor_wall,
        "peak_mb": max(f["peak_mb"] for f in floors), "peak_anon_mb": max(f["peak_anon_mb"] for f in floors),
        "peak_file_mb": max(f["peak_file_mb"] for f in floors),
        "import_s": statistics.median(f.get("import_s", 0.0) for f in floors),
        "read_s": statistics.median(f.get("read_s", 0.0) for f in floors),
        "write_s": statistics.median(f.get("write_s", 0.0) for f in floors), "vs_io_floor": 1.0,
        "wall_runs": [f["wall_s"] for f in floors]}]
    for method in SPEED_METHODS:
        ref = _summary(runs.get((method, "mergekit")))
        for tool in ("mergekit", "deltatune"):
            row: dict[str, Any] = {"part": "speed", "method": method, "tool": tool}
            if missing[tool]:
                rows.append({**row, "error": missing[tool]})
                continue
            summ = _summary(runs.get((method, tool)))
            row.update(summ)
            ok = not summ.get("error")
            row["vs_mergekit_time"] = _ratio(summ.get("wall_s"), ref.get("wall_s")) if ok else None
            row["vs_mergekit_peak"] = _ratio(summ.get("peak_mb"), ref.get("peak_mb")) if ok else None
            row["vs_mergekit_anon"] = _ratio(summ.get("peak_anon_mb"), ref.get("peak_anon_mb")) if ok else None
            row["vs_io_floor"] = _ratio(summ.get("wall_s"), floor_wall) if ok else None
            if tool == "deltatune":
                row["target"], row["meets_target"] = _target(method, row)
            rows.append(row)
        if not missing["mergekit"] and not missing["deltatune"] and _both_ok(runs, method) and method != "dare_ties":
            cmp = run_isolated(_compare_child, str(speed_dir / "out" / f"mergekit-{method}"),
                               str(speed_dir / "out" / f"deltatune-{method}"), models["base"], preload=("torch",))
            rows[-1].update({"agree_with_mergekit": cmp["agree"], "max_abs_diff": cmp["max_abs_diff"],
                             "changed_frac": cmp["changed_deltatune"], "mergekit_changed_frac": cmp["changed_mergekit"],
                             "mismatched_tensors": cmp["mismatched_tensors"]})
    meta = {"models": {k: v for k, v in models.items() if k != "settings"}, "llama_config": s.llama,
            "noise_std": s.noise_std, "repeats": s.repeats, "io_floor_runs": floors,
            "commands": {t: " ".join(c) for t, c in tool_commands(Path("CFG.yml"), Path("OUT")).items()},
            "configs": {m: str(p) for m, p in cfgs.items()},
            "yaml": {m: Path(p).read_text() for m, p in cfgs.items()},
            "tools_missing": {t: v for t, v in missing.items() if v},
            "protocol": "each run in its own process; all inputs read once before every timed run (warm page "
                        "cache for every tool); tool order alternates per method and per repeat; wall = median "
                        "over repeats, peaks = max over repeats; peak_mb = GNU time %M (max RSS); "
                        "peak_anon_mb / peak_file_mb = max of /proc/PID/status RssAnon / RssFile sampled every 0.1 s"}
    return rows, meta


def _summary(runs: list[dict[str, Any]] | None) -> dict[str, Any]:
    if not runs:
        return {}
    good = [r for r in runs if r["rc"] == 0]
    if not good:
        return {"error": runs[-1].get("error", "failed"), "rc": runs[-1]["rc"]}
    return {"wall_s": round(statistics.median(r["wall_s"] for r in good), 3),
            "peak_mb": max(r["peak_mb"] for r in good), "peak_anon_mb": max(r["peak_anon_mb"] for r in good),
            "peak_file_mb": max(r["peak_file_mb"] for r in good),
            "user_s": round(statistics.median(r["user_s"] for r in good), 2),
            "wall_runs": [r["wall_s"] for r in good], "failed_runs": len(runs) - len(good)}


def _both_ok(runs: dict[tuple[str, str], list[dict[str, Any]]], method: str) -> bool:
    return all(runs.get((method, t)) and runs[(method, t)][-1]["rc"] == 0 for t in ("mergekit", "deltatune"))


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def _target(method: str, row: dict[str, Any]) -> tuple[str, bool | None]:
    want = TARGETS.get(method, {})
    text = ", ".join(f"{k.removeprefix('vs_')} ≤ {v:g}" for k, v in want.items())
    vals = [row.get(k) for k in want]
    if any(v is None for v in vals):
        return text, None
    return text, all(row[k] <= v for k, v in want.items())
