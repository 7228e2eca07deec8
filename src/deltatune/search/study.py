"""Run the multi-objective search: optuna study, trials that train with the normal loop, pruning, resume.

Objectives (AutoPEFT, Zhou et al. TACL 2024 §3.2): the task's main metric on the eval rows (maximised, or
minimised for a loss-like metric) and the delta's trainable scalars (minimised); optionally seconds per
optimiser step and peak memory (minimised; CUDA allocator peak, or on CPU the peak resident set above the start,
see :mod:`deltatune.search.peak`).  The sampler is optuna's multi-objective TPE.

Pruning: optuna's ``Trial.report``/``should_prune`` are single-objective only, so each trial has a twin in a
companion single-objective study (same storage, name ``<study>:pruning``) that receives the intermediate eval
metric after every ``eval_every`` steps; the configured optuna pruner (median, hyperband) decides there.

Repeats: TPE may sample a configuration it has already trained (same method, budget, layers and modules
resolve to the same config).  Such a trial is not trained again: it records ``duplicate_of`` and returns the
earlier trial's values, and it does not count toward ``trials``; neither does a draw that is not a valid
configuration (or exceeds ``max_params``), which trains nothing.  At most ``3 × trials`` samples are drawn, so a
space with fewer distinct valid configurations than ``trials`` ends early, with a message.  A search runs in one
process at a time: on resume, trials left RUNNING by a killed search are marked FAIL and
do not count toward ``trials``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from deltatune.errors import ConfigError, DeltaTuneError
from deltatune.search.candidates import Candidate, Resolver, check_space
from deltatune.search.peak import PeakMemory, cpu_peak_supported
from deltatune.search.space import SearchSpace, StudyMismatch, modules_label

STUDY = "deltatune-search"
FINGERPRINT_ATTR = "deltatune_space_fingerprint"
ABANDONED_ATTR = "deltatune_abandoned_trials"


@dataclass
class SearchResult:
    study: optuna.Study
    directions: list[str]
    objectives: list[str]
    metric: str
    train: dict[str, Any]


def open_storage(path: str | Path) -> optuna.storages.BaseStorage:
    """``*.db``/``*.sqlite`` (or a ``sqlite:///`` URL): optuna's RDB storage; anything else a journal file."""
    text = str(path)
    if text.startswith("sqlite:///"):
        return optuna.storages.RDBStorage(text)
    try:
        Path(text).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{text}: cannot create the folder of the optuna storage ({exc.strerror})") from None
    if text.endswith((".db", ".sqlite", ".sqlite3")):
        return optuna.storages.RDBStorage(f"sqlite:///{Path(text).resolve()}")
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(text))


def load_study(storage: optuna.storages.BaseStorage, where: str, fingerprint: str, directions: list[str],
               seed: int, startup: int) -> optuna.Study:
    """Create the study, or resume it after checking that it was written by this same search."""
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    if names:
        if STUDY not in names:
            raise StudyMismatch(f"{where}: the optuna storage holds other studies ({names[:3]}), not a deltatune "
                                "search; give another --storage file")
        study = optuna.load_study(study_name=STUDY, storage=storage, sampler=sampler)
        if study.trials:  # a resume: the same seed would replay the random start-up draws of the first run
            study.sampler = optuna.samplers.TPESampler(seed=(seed * 1_000_003 + len(study.trials)) % 2**32,
                                                       n_startup_trials=startup)  # numpy takes seeds < 2³²
        stored = study.user_attrs.get(FINGERPRINT_ATTR)
        if stored != fingerprint:
            raise StudyMismatch(f"{where}: the stored study was made by another search (space fingerprint "
                                f"{str(stored)[:12]}…, this search {fingerprint[:12]}…): its task, train fields, "
                                "search space or objectives differ; give another --storage file")
        return study
    study = optuna.create_study(study_name=STUDY, storage=storage, directions=directions, sampler=sampler)
    study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
    return study


def _pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def counted_trials(study: optuna.Study) -> int:
    """Finished trials that count toward the budget (repeats and invalid configurations, which train nothing, do
    not)."""
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    abandoned = set(study.user_attrs.get(ABANDONED_ATTR, []))
    return sum("duplicate_of" not in t.user_attrs and "invalid" not in t.user_attrs and t.number not in abandoned
               for t in study.get_trials(deepcopy=False, states=done))


def _earlier_run(study: optuna.Study, config: dict[str, Any]) -> optuna.trial.FrozenTrial | None:
    """The first trial that trained exactly ``config`` (its resolved method config) to the end or until it was
    pruned, if any (not a repeat itself, nor a configuration refused before training)."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    for t in study.get_trials(deepcopy=False, states=states):
        if t.user_attrs.get("method_config") == config and not {"duplicate_of", "invalid"} & t.user_attrs.keys():
            return t
    return None


def abandon_stale(study: optuna.Study, say: Callable[[str], None]) -> int:
    """Mark trials left RUNNING by a killed search as FAIL; returns how many."""
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    if stale:
        study.set_user_attr(ABANDONED_ATTR, [*study.user_attrs.get(ABANDONED_ATTR, []), *(t.number for t in stale)])
    if stale:
        say(f"{len(stale)} trial(s) left running by an interrupted search marked failed: "
            f"{[t.number for t in stale]}")
    return len(stale)


def run_search(space: SearchSpace, train: dict[str, Any], out: Path, storage_path: str | Path,
               keep_runs: bool = False, say: Callable[[str], None] = print,
               on_trial: Callable[[int], None] | None = None) -> SearchResult:
    """Run (or resume) the study until ``space.trials`` trials have finished or ``space.minutes`` have passed."""
    from deltatune.config import parse_config
    from deltatune.train.config import TrainConfig
    from deltatune.train.loop import train as run_train
    from deltatune.train.tasks import build_task

    if "out_dir" in train or "resume" in train:
        raise ConfigError("search: the train section must not set out_dir or resume (each trial gets its own)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    probe = parse_config(TrainConfig, {**train, "out_dir": str(out / "trials" / "probe")}, "search train config")
    task = build_task(probe)
    resolver = Resolver(task.load_model().eval())
    check_space(space, resolver)
    if "peak_memory" in space.objectives and not (torch.cuda.is_available() or cpu_peak_supported()):
        raise ConfigError("search.objectives: peak_memory needs a CUDA device or Linux's /proc/self/clear_refs "
                          "(peak resident set); neither is available here")
    metric_dir = "maximize" if task.greater_is_better else "minimize"
    directions = [metric_dir if o == "metric" else "minimize" for o in space.objectives]
    storage = open_storage(storage_path)
    fingerprint = space.fingerprint(train)
    budget = space.trials or 10**9
    study = load_study(storage, str(storage_path), fingerprint, directions, space.seed,
                       startup=max(2, min(10, budget // 2)))
    prune_name = f"{STUDY}:pruning"
    prune_study = optuna.create_study(study_name=prune_name, storage=storage, direction=metric_dir,
                                      pruner=_pruner(space.pruner), load_if_exists=True)
    abandon_stale(study, say)
    abandon_stale(prune_study, lambda _: None)
    choices = space.method_choices()
    layer_labels = [str(x) for x in space.layers]
    module_by_label = {modules_label(m): m for m in space.modules}

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        method = trial.suggest_categorical("method", list(choices))
        budget_choice = {k: trial.suggest_categorical(f"{method}.{k}", v) for k, v in sorted(choices[method].items())}
        layers = trial.suggest_categorical("layers", layer_labels) if len(layer_labels) > 1 else layer_labels[0]
        labels = list(module_by_label)
        mod_label = trial.suggest_categorical("modules", labels) if len(labels) > 1 else labels[0]
        try:
            cand = resolver.resolve(method, budget_choice, layers, module_by_label[mod_label])
        except DeltaTuneError as exc:
            trial.set_user_attr("invalid", str(exc)[:300])
            say(f"trial {trial.number}: {method} {budget_choice} layers={layers} modules={mod_label} is not a "
                f"valid configuration ({str(exc)[:100]})")
            raise optuna.TrialPruned(f"invalid configuration: {str(exc)[:200]}") from None
        config = {"name": method, **cand.mapping}
        trial.set_user_attr("method_config", config)
        trial.set_user_attr("params", cand.params)
        earlier = _earlier_run(study, config)
        if earlier is not None:
            trial.set_user_attr("duplicate_of", earlier.number)
            for key in ("step_time", *(k for k in earlier.user_attrs if k.startswith("eval@"))):
                if key in earlier.user_attrs:
                    trial.set_user_attr(key, earlier.user_attrs[key])
            if earlier.state == optuna.trial.TrialState.PRUNED:  # its curve was cut: so is this one's, untrained
                say(f"trial {trial.number}: same configuration as trial {earlier.number}, pruned then; not trained "
                    "again")
                raise optuna.TrialPruned(f"same configuration as the pruned trial {earlier.number}")
            say(f"trial {trial.number}: same configuration as trial {earlier.number}, not trained again")
            return tuple(earlier.values)
        if space.max_params is not None and cand.params > space.max_params:
            trial.set_user_attr("invalid", f"{cand.params} > max_params {space.max_params}")
            raise optuna.TrialPruned(f"{cand.params} trainable parameters > max_params {space.max_params}")
        return _run_trial(trial, cand)

    def _run_trial(trial: optuna.Trial, cand: Candidate) -> tuple[float, ...]:
        twin = prune_study.ask()
        trial.set_user_attr("pruning_trial", twin.number)
        run_dir = out / "trials" / f"{trial.number:04d}"
        cfg = parse_config(TrainConfig, {**train, "out_dir": str(run_dir), "overwrite": True, "progress": False},
                           "search train config")

        def on_eval(step: int, metrics: dict[str, float | None]) -> None:
            value = metrics.get(task.main_metric)
            if value is None:
                return
            twin.report(float(value), step)
            trial.set_user_attr(f"eval@{step}", float(value))
            if step < cfg.max_steps and twin.should_prune():
                trial.set_user_attr("pruned", f"at step {step}: {task.main_metric} {value:.4f}")
                say(f"trial {trial.number}: {cand.method} pruned at step {step} ({task.main_metric} {value:.4f})")
                raise optuna.TrialPruned(f"pruned at step {step}: {task.main_metric} {value:.4f}")

        start = time.perf_counter()
        try:
            with PeakMemory() as peak:
                result = run_train(cfg, cand.config, on_eval=on_eval)
        except optuna.TrialPruned:
            prune_study.tell(twin, state=optuna.trial.TrialState.PRUNED)
            raise
        except BaseException:
            prune_study.tell(twin, state=optuna.trial.TrialState.FAIL)
            raise
        finally:
            if not keep_runs:
                shutil.rmtree(run_dir, ignore_errors=True)
        seconds = mean_step_seconds(result.history, time.perf_counter() - start)
        scores = result.best or result.final
        value = scores.get(task.main_metric)
        if value is None:
            prune_study.tell(twin, state=optuna.trial.TrialState.FAIL)
            raise DeltaTuneError(f"trial {trial.number}: no {task.main_metric} was measured ({scores})")
        prune_study.tell(twin, float(value))
        measured = {"metric": float(value), "params": float(cand.params), "step_time": seconds,
                    "peak_memory": float(peak.bytes)}
        trial.set_user_attr("step_time", seconds)
        trial.set_user_attr("peak_memory", peak.bytes)
        say(f"trial {trial.number}: {cand.method} {_short(cand.mapping)} → {task.main_metric} {value:.4f}, "
            f"{cand.params} params")
        return tuple(measured[o] for o in space.objectives)

    callbacks = [lambda st, _trial: on_trial(counted_trials(st))] if on_trial is not None else []
    if on_trial is not None:
        on_trial(counted_trials(study))
    if counted_trials(study) >= budget:
        say(f"the study already holds {counted_trials(study)} finished trial(s) of {budget}: nothing to run")
    deadline = time.monotonic() + space.minutes * 60 if space.minutes else None
    draws, max_draws = 0, 3 * (budget - counted_trials(study)) if space.trials else None
    while counted_trials(study) < budget and (deadline is None or time.monotonic() < deadline):
        if max_draws is not None and draws >= max_draws:
            say(f"stopped after {draws} draws: the search space seems to hold fewer distinct configurations "
                f"than trials ({counted_trials(study)} distinct trained)")
            break
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=callbacks, show_progress_bar=False)
        draws += 1
    return SearchResult(study, directions, list(space.objectives), task.main_metric, dict(train))


def mean_step_seconds(history: list[dict[str, Any]], total: float) -> float:
    """Mean wall time of one optimiser step: the steps' own ``step_s`` (the loop's records: method hooks,
    forward, backward and optimiser step, without model loading, evaluation or checkpoints) but the first (its
    warm-up: allocations, thread pools, kernel selection), or ``total`` over the step count for a history without
    them."""
    timed = [r["step_s"] for r in history if "step_s" in r]
    timed = timed[1:] if len(timed) > 1 else timed
    return sum(timed) / len(timed) if timed else total / max(1, len(history))


def _short(mapping: dict[str, Any]) -> str:
    shown = {k: (f"[{len(v)} modules]" if k == "targets" and isinstance(v, list) and len(v) > 3 else v)
             for k, v in mapping.items()}
    return str(shown)
