"""kill -9 at random moments in every writing command: nothing partial, nothing lost, no leftovers.

Each trial runs one command (``train``, ``apply``, ``merge``, ``compress``, ``export``) as a separate
process (forked from a pre-warmed zygote, see ``kill9_zygote.py``) and sends SIGKILL either at a random
time within the command's usual duration or a random few milliseconds after its first temporary folder
appears (inside the write).  Then:

* the output is absent or complete: byte-identical to a reference run's (for ``train``: the delta's
  tensors equal the reference's, and a checkpoint seen before the kill still loads);
* an earlier output in the same place (every other trial starts with one, made from other inputs) is
  still there, intact, unless the new one replaced it completely;
* the command's next run succeeds, writes the reference output (``train --resume``: bit-exact against
  an uninterrupted run) and leaves no ``.tmp-*`` / ``.old-*`` temporaries behind.

Default tier: 2 trials per command; slow tier (``-m slow``): 20.  Trials are seeded: a failure names
the command, trial, seed, the kill strategy and moment.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import randomize_delta

SEED = 0
ZYGOTE = Path(__file__).resolve().parent / "kill9_zygote.py"
COMMANDS = ["train", "apply", "merge", "compress", "export"]
STALE = (".tmp-", ".old-")


class Zygote:
    """The pre-warmed process that forks one CLI command at a time."""

    def __init__(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen([sys.executable, str(ZYGOTE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env)
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buf = b""
        ready = self._read(300)
        assert ready == {"ready": True}, f"kill -9 zygote did not start: {ready}"

    def _read(self, timeout: float) -> dict[str, Any] | None:
        """The next message, or ``None`` after ``timeout`` seconds."""
        import select

        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            select.select([self.proc.stdout], [], [], left)
            try:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
            except BlockingIOError:
                continue
            if not chunk:
                raise RuntimeError(f"kill -9 zygote died (exit code {self.proc.wait()})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def start(self, argv: list[str], cwd: Path, log: Path) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"argv": argv, "cwd": str(cwd), "log": str(log)}) + "\n").encode())
        self.proc.stdin.flush()
        msg = self._read(60)
        assert msg is not None and "pid" in msg, msg
        return int(msg["pid"])

    def poll(self, timeout: float) -> int | None:
        msg = self._read(timeout)
        return None if msg is None else int(msg["code"])

    def run(self, argv: list[str], cwd: Path, log: Path, timeout: float = 600) -> tuple[int, float]:
        t0 = time.monotonic()
        self.start(argv, cwd, log)
        code = self.poll(timeout)
        assert code is not None, f"deltatune {' '.join(argv)} did not finish in {timeout} s"
        return code, time.monotonic() - t0

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# --- comparing outputs ---------------------------------------------------------------------------
def tree(path: Path) -> dict[str, str]:
    """Relative file path → SHA-256 of its bytes."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def tree_diff(a: dict[str, str], b: dict[str, str]) -> str:
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return f"files differ: {differ[:5]}"


def delta_tensors(path: Path) -> dict[str, Any]:
    """A delta's part and head tensors, flattened to comparable leaves (metrics hold paths and times)."""
    from fuzz.snapshot import flatten

    from deltatune.io.delta_format import load_delta

    d = load_delta(path)
    return flatten({"parts": d.parts, "heads": d.heads})


def stale(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if any(s in p.name for s in STALE))


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-1500:] if log.exists() else "(no log)"


# --- the commands ---------------------------------------------------------------------------------
@dataclass
class Env:
    root: Path
    lm: Path
    data: Path
    a: Path
    b: Path
    refs: dict[str, dict[str, Any]]


def command(env: Env, name: str, out: Path, which: str) -> list[str]:
    """The argv of ``name`` writing ``out`` from the ``prev`` or the ``new`` inputs."""
    src = env.a if which == "prev" else env.b
    if name == "apply":
        return ["apply", str(src), "--out", str(out), "--model", str(env.lm), "--shard-size", "3MB"]
    if name == "export":
        return ["export", str(src), "--out", str(out)]
    if name == "compress":
        return ["compress", str(src), "--method", "compeft", "--density", "0.2", "--alpha", "1", "--out", str(out)]
    if name == "merge":
        return ["merge", str(env.root / f"merge-{which}.yaml"), "--out", str(out), "--no-progress"]
    if name == "train":
        return ["train", "--method", "sparse", "--task", "jsonl", "--model", str(env.lm), "--data", str(env.data),
                "--out", str(out), "--steps", "4", "--lr", "0.01", "--batch-size", "4",
                *[f"--set={k}={v}" for k, v in TRAIN_SETS.items()], f"--set=eval_data={env.data}"]
    raise KeyError(name)


TRAIN_SETS = {"checkpoint_every": 1, "eval_every": 0, "eval_before": "false", "progress": "false", "max_length": 24,
              "eval_limit": 4, "num_tunable": 2000, "reselection_steps": 2, "accumulation_steps": 1}
MERGE = """method: task_arithmetic
inputs:
  - {{path: {a}, weight: {wa}}}
  - {{path: {b}, weight: {wb}}}
params: {{lambda: 1.0}}
output: dense
"""


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory, zygote) -> Env:
    """A tiny causal LM, a few JSONL rows, two LoRA deltas on the LM, merge recipes and each command's
    reference outputs (from complete runs through the zygote, timed)."""
    from fuzz.originals import tiny_jsonl, tiny_lm
    from transformers import LlamaForCausalLM

    import deltatune as dt

    root = tmp_path_factory.mktemp("kill9")
    lm = tiny_lm(root / "tiny-lm")
    data = tiny_jsonl(root / "train.jsonl")
    for name, seed in (("A", 1), ("B", 2)):
        model = LlamaForCausalLM.from_pretrained(lm)
        randomize_delta(model, dt.LoRAConfig(r=2, targets=["q_proj", "v_proj", "down_proj"]), seed, 0.02).save(
            root / name)
    for which, (wa, wb) in (("prev", (1.0, 0.5)), ("new", (0.3, 0.7))):
        (root / f"merge-{which}.yaml").write_text(MERGE.format(a=root / "A", b=root / "B", wa=wa, wb=wb))
    e = Env(root, lm, data, root / "A", root / "B", {})
    for name in COMMANDS:
        ref: dict[str, Any] = {}
        for which in ("prev", "new") if name != "train" else ("new",):
            out = root / "refs" / f"{name}-{which}" / ("run" if name == "train" else "out")
            out.parent.mkdir(parents=True)
            log = out.parent / "log.txt"
            code, seconds = zygote.run(command(e, name, out, which), out.parent, log)
            assert code == 0, f"reference run of {name} failed:\n{log_tail(log)}"
            ref[which] = out
            ref[f"{which}_s"] = seconds
        if name == "train":
            ref["tensors"] = delta_tensors(ref["new"] / "delta")
        else:
            ref["prev_tree"], ref["new_tree"] = tree(ref["prev"]), tree(ref["new"])
            assert ref["prev_tree"] != ref["new_tree"], f"{name}: the two reference outputs should differ"
        e.refs[name] = ref
    return e


# --- one trial -------------------------------------------------------------------------------------
def kill_run(zygote: Zygote, argv: list[str], cwd: Path, log: Path, watch: Path, rng: random.Random,
             usual_s: float, strategy: str, checkpoint: Path | None = None, writes: int = 1) -> dict[str, Any]:
    """Start ``argv`` and SIGKILL it: ``time`` (a random moment of its usual duration) or ``write`` (0–10 ms
    after the n-th temporary, n random in 1..``writes``, appears in ``watch``); returns what happened."""
    kill_after = rng.uniform(0.0, 0.95) * usual_s
    delay = rng.uniform(0.0, 0.01)
    nth = rng.randint(1, writes)
    pid = zygote.start(argv, cwd, log)
    t0 = time.monotonic()
    first_tmp = None
    temporaries: set[str] = set()
    seen_checkpoint = False
    while True:
        code = zygote.poll(0.002)
        if code is not None:
            return {"killed": False, "code": code, "strategy": strategy, "seen_checkpoint": seen_checkpoint}
        now = time.monotonic()
        if checkpoint is not None and not seen_checkpoint and checkpoint.is_dir():
            seen_checkpoint = True
        if first_tmp is None and strategy == "write":
            with contextlib.suppress(FileNotFoundError):
                temporaries |= {n for n in os.listdir(watch) if ".tmp-" in n}
            if len(temporaries) >= nth:
                first_tmp = now
        due = (now - t0 >= kill_after) if strategy == "time" else (first_tmp is not None and now - first_tmp >= delay)
        if due:
            os.kill(pid, signal.SIGKILL)
            code = zygote.poll(60)
            what = f"{now - t0:.3f} s after start" if strategy == "time" else \
                f"{(now - first_tmp) * 1000:.1f} ms after temporary #{nth} appeared"
            return {"killed": code == -signal.SIGKILL, "code": code, "strategy": strategy, "when": what,
                    "seen_checkpoint": seen_checkpoint}


def _recover(out: Path) -> bool:
    """Complete or roll back an interrupted swap of ``out`` the way the next run would; ``True`` if it did."""
    try:
        from deltatune.io.atomic import recover_dir
    except ImportError:
        return False
    existed = out.exists()
    recover_dir(out)
    return out.exists() and not existed


def kill_strategy(i: int) -> str:
    """Trials 0, 1, 2, 3 … kill by write, time, time, write …: both strategies over both starting states."""
    return "write" if (i + i // 2) % 2 == 0 else "time"


def trial_writer(zygote: Zygote, env: Env, name: str, i: int, work: Path) -> tuple[list[str], bool]:
    """One kill -9 trial of ``apply``/``merge``/``compress``/``export``; returns the problems found and
    whether the process was killed (rather than finishing first)."""
    rng = random.Random(f"{SEED}:{name}:{i}")
    ref = env.refs[name]
    work.mkdir(parents=True)
    out = work / "out"
    with_prev = i % 2 == 0
    if with_prev:
        shutil.copytree(ref["prev"], out)
    log = work / "killed.log"
    r = kill_run(zygote, command(env, name, out, "new"), work, log, work, rng, ref["new_s"], kill_strategy(i))
    tag = f"{name} trial {i} (seed '{SEED}:{name}:{i}', {'over an earlier output' if with_prev else 'fresh'}, " \
          f"kill by {r['strategy']}: {r.get('when', 'not killed, it finished first')})"
    problems = []
    if not r["killed"] and r["code"] != 0:
        problems.append(f"{tag}: exit code {r['code']}:\n{log_tail(log)}")
    allowed = {"new": ref["new_tree"], **({"previous": ref["prev_tree"]} if with_prev else {})}
    if not out.exists() and with_prev and _recover(out):
        tag += " [the earlier output came back only through recover_dir]"
    if out.exists():
        got = tree(out)
        if got not in allowed.values():
            problems.append(f"{tag}: the output is neither complete nor the earlier one: "
                            f"{tree_diff(got, ref['new_tree'])}")
    elif with_prev:
        problems.append(f"{tag}: the earlier output is gone")
    log = work / "next.log"
    code, _ = zygote.run(command(env, name, out, "new"), work, log)
    if code != 0:
        problems.append(f"{tag}: the next run failed with exit code {code}:\n{log_tail(log)}")
    elif tree(out) != ref["new_tree"]:
        problems.append(f"{tag}: the next run's output differs from the reference: "
                        f"{tree_diff(tree(out), ref['new_tree'])}")
    if stale(work):
        problems.append(f"{tag}: temporaries left after the next run: {stale(work)}")
    return problems, r["killed"]


def trial_train(zygote: Zygote, env: Env, i: int, work: Path) -> tuple[list[str], bool]:
    """One kill -9 trial of ``train`` then ``train --resume`` (bit-exact against the uninterrupted run)."""
    from deltatune.train.checkpoint import load_checkpoint

    rng = random.Random(f"{SEED}:train:{i}")
    ref = env.refs["train"]
    work.mkdir(parents=True)
    run = work / "run"
    argv = command(env, "train", run, "new")
    log = work / "killed.log"
    r = kill_run(zygote, argv, work, log, run, rng, ref["new_s"], kill_strategy(i), checkpoint=run / "checkpoint",
                 writes=3)  # a checkpoint per step: kill inside the first, second or third
    tag = f"train trial {i} (seed '{SEED}:train:{i}', kill by {r['strategy']}: " \
          f"{r.get('when', 'not killed, it finished first')})"
    problems = []
    if not r["killed"] and r["code"] != 0:
        problems.append(f"{tag}: exit code {r['code']}:\n{log_tail(log)}")
    if (run / "delta").exists():
        try:
            if delta_tensors(run / "delta") != ref["tensors"]:
                problems.append(f"{tag}: a partial or different delta was left in {run / 'delta'}")
        except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
            problems.append(f"{tag}: the delta left behind does not load: {type(exc).__name__}: {exc}")
    if r["seen_checkpoint"]:
        try:
            load_checkpoint(run / "checkpoint")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{tag}: a checkpoint existed before the kill, now it does not load: "
                            f"{type(exc).__name__}: {exc}")
    resume = r["seen_checkpoint"] or (run / "checkpoint").exists()
    log = work / "next.log"
    code, _ = zygote.run(argv + (["--resume"] if resume else ["--overwrite"]), work, log)
    if code != 0:
        problems.append(f"{tag}: the next run ({'--resume' if resume else 'fresh'}) failed with exit code {code}:\n"
                        f"{log_tail(log)}")
    elif delta_tensors(run / "delta") != ref["tensors"]:
        problems.append(f"{tag}: the {'resumed' if resume else 'rerun'} delta differs from the uninterrupted run's")
    if stale(work):
        problems.append(f"{tag}: temporaries left after the next run: {stale(work)}")
    return problems, r["killed"]


def _trials(zygote: Zygote, env: Env, name: str, n: int, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    problems: list[str] = []
    killed = ran = 0
    for i in range(3 * n):  # past n only while no trial was killed yet (a fast command may beat its kill)
        if i >= n and killed:
            break
        work, ran = tmp_path / f"{name}-{i}", i + 1
        found, was_killed = trial_train(zygote, env, i, work) if name == "train" else \
            trial_writer(zygote, env, name, i, work)
        problems += found
        killed += was_killed
    assert not problems, f"{len(problems)} problem(s) in {ran} kill -9 trials of {name}:\n" + "\n".join(problems)
    assert killed, f"none of the {ran} trials of {name} was killed before it finished: the test tested nothing"


@pytest.mark.parametrize("name", COMMANDS)
def test_kill9_default_tier(zygote, env, name, tmp_path):
    _trials(zygote, env, name, 2, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_kill9_slow_tier(zygote, env, name, tmp_path):
    _trials(zygote, env, name, 20, tmp_path)
