"""The search space of ``deltatune search``: methods with their budget choices, layers and modules.

A ``search:`` YAML file restricts it (every key optional)::

    train: {task: mrpc, max_steps: 200, eval_every: 50}   # fixed for every trial (TrainConfig fields)
    search:
      methods: {lora: {r: [2, 4, 8]}, ia3: {}}            # method → {config field: [choices]}
      layers: [all, "top:3", "0,1"]                       # which blocks get parts (methods with `targets`)
      modules: [default, [query, value]]                  # target lists (default: the method's own)
      objectives: [metric, params, step_time]
      max_params: 200000                                  # configs with more trainable scalars are invalid
      trials: 20
      minutes: null
      pruner: median

Without ``methods`` every registered method is searched, each over the budget choices of
:data:`DEFAULT_BUDGETS` (a method missing there is tried with its defaults).  The layout follows AutoPEFT's
per-layer on/off and per-module size choices (Zhou et al., TACL 2024, §3), discretised.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from deltatune.config import brief, require, seed_option
from deltatune.errors import ConfigError

#: method → {config field: choices}: the budget axis searched when the YAML names the method without choices
DEFAULT_BUDGETS: dict[str, dict[str, list[Any]]] = {
    "lora": {"r": [1, 2, 4, 8, 16]},
    "dora": {"r": [1, 2, 4, 8]},
    "adapter": {"bottleneck": [2, 4, 8, 16, 32]},
    "sparse": {"density": [0.0005, 0.001, 0.003, 0.01]},
    "random-sparse": {"density": [0.0005, 0.001, 0.003, 0.01]},
    "lt-sft": {"density": [0.001, 0.003, 0.01]},
    "sara": {"fraction": [0.001, 0.003, 0.01]},
    "lift": {"lora_rank": [1, 2, 4, 8]},
    "dsee": {"r": [2, 4, 8], "num_sparse": [16, 64]},
    "mixlora": {"r": [2, 4, 8]},
    "prompt_tuning": {"num_virtual_tokens": [5, 10, 20]},
    "s2ft": {"d_ratio": [0.01, 0.02, 0.05]},
    "lisa": {"layers": [1, 2]},
}
OBJECTIVES = ("metric", "params", "step_time", "peak_memory")
PRUNERS = ("median", "hyperband", "none")
DEFAULT_MODULES = "default"


class EmptySearchSpace(ConfigError):
    """No configuration of the search space is valid (every one fails its method's checks, matches no module,
    or exceeds ``max_params``); the message says why for the first few."""


class StudyMismatch(ConfigError):
    """The optuna storage holds a study written by another search (its space fingerprint differs)."""


@dataclass
class SearchSpace:
    methods: dict[str, dict[str, list[Any]]] = field(default_factory=dict, metadata={
        "help": "method name → {config field: [choices]}; empty: every registered method over DEFAULT_BUDGETS"})
    layers: list[str] = field(default_factory=lambda: ["all"], metadata={
        "help": "layer choices: 'all', 'top:K', 'bottom:K' or comma-separated block indices"})
    modules: list[Any] = field(default_factory=lambda: [DEFAULT_MODULES], metadata={
        "help": "module choices: 'default' (the method's own targets) or a list of target patterns"})
    objectives: list[str] = field(default_factory=lambda: ["metric", "params"], metadata={
        "help": "metric (maximised), params (minimised), optionally step_time, peak_memory (minimised)"})
    max_params: int | None = field(default=None, metadata={"help": "configs with more trainable scalars are invalid"})
    trials: int | None = field(default=20, metadata={"help": "total trials of the study (resumed ones count)"})
    minutes: float | None = field(default=None, metadata={"help": "wall-clock budget of this invocation"})
    pruner: str = field(default="median", metadata={"help": "median, hyperband or none (on intermediate evals)"})
    seed: int = seed_option("seed of the sampler")

    def __post_init__(self) -> None:
        require(isinstance(self.methods, dict), f"search.methods must be a mapping, got {brief(self.methods)}")
        for name, choices in self.methods.items():
            require(isinstance(choices, dict) or choices is None,
                    f"search.methods.{name} must map config fields to lists of choices, got {brief(choices)}")
            for key, values in (choices or {}).items():
                require(isinstance(values, list) and len(values) > 0,
                        f"search.methods.{name}.{key} must be a non-empty list of choices, got {brief(values)}")
        require(len(self.layers) > 0, "search.layers must list at least one choice")
        for spec in self.layers:
            parse_layers(spec)  # raises on bad syntax
        require(len(self.modules) > 0, "search.modules must list at least one choice")
        for spec in self.modules:
            require(spec == DEFAULT_MODULES or (isinstance(spec, list) and spec and all(isinstance(t, str)
                                                                                        for t in spec)),
                    f"search.modules: each choice is 'default' or a list of target patterns, got {brief(spec)}")
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        require(not bad, f"search.objectives: unknown {bad}; choose from {list(OBJECTIVES)}")
        require("metric" in self.objectives and "params" in self.objectives,
                f"search.objectives must include 'metric' and 'params', got {self.objectives}")
        require(len(set(self.objectives)) == len(self.objectives), "search.objectives lists one twice")
        require(self.max_params is None or self.max_params >= 1, f"search.max_params must be ≥ 1, got "
                                                                 f"{self.max_params}")
        require(self.trials is None or self.trials >= 1, f"search.trials must be ≥ 1, got {self.trials}")
        require(self.minutes is None or self.minutes > 0, f"search.minutes must be > 0, got {self.minutes}")
        require(self.trials is not None or self.minutes is not None, "search needs a budget: trials or minutes")
        require(self.pruner in PRUNERS, f"search.pruner must be one of {list(PRUNERS)}, got {self.pruner!r}")

    def method_choices(self) -> dict[str, dict[str, list[Any]]]:
        """Method → {field: choices}, defaulted from the registry and :data:`DEFAULT_BUDGETS`; fields are checked
        against each method's config class."""
        from deltatune.methods.registry import METHODS, get_method

        get_method("lora")  # imports the built-in methods
        names = list(self.methods) or sorted(METHODS)
        out: dict[str, dict[str, list[Any]]] = {}
        for name in names:
            method = get_method(name)
            given = self.methods.get(name)
            known = {f.name for f in fields(method.config_cls)}
            choices = dict(given) if given else {k: v for k, v in DEFAULT_BUDGETS.get(name, {}).items() if k in known}
            unknown = sorted(set(choices) - known)
            if unknown:
                raise ConfigError(f"search.methods.{name}: unknown field(s) {unknown}; {name} has {sorted(known)}")
            out[name] = choices
        return out

    def budget(self) -> dict[str, Any]:
        return {"trials": self.trials, "minutes": self.minutes}

    def fingerprint(self, train: dict[str, Any]) -> str:
        """SHA-256 of what defines the study: the resolved space, the fixed train fields and the objectives (the
        budget is left out: a resumed search may be given more trials)."""
        space = {k: v for k, v in asdict(self).items() if k not in ("trials", "minutes")}
        space["methods"] = self.method_choices()
        blob = json.dumps({"space": space, "train": train}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def parse_layers(spec: Any) -> tuple[str, int] | tuple[str, list[int]]:
    """``'all'`` → ("all", 0); ``'top:K'`` / ``'bottom:K'`` → (side, K); ``'0,2,5'`` or ``3`` → ("list", [...])."""
    text = str(spec).strip()
    if text == "all":
        return "all", 0
    if text.startswith(("top:", "bottom:")):
        side, _, k = text.partition(":")
        if not k.isdigit() or int(k) < 1:
            raise ConfigError(f"search.layers: {text!r} needs a positive count, like 'top:3'")
        return side, int(k)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise ConfigError(f"search.layers: {brief(spec)} is not 'all', 'top:K', 'bottom:K' or block indices '0,1'")
    return "list", sorted({int(p) for p in parts})


def layer_indices(spec: Any, num_layers: int) -> list[int] | None:
    """The block indices ``spec`` selects in a model of ``num_layers`` blocks (None: all)."""
    kind, value = parse_layers(spec)
    if kind == "all":
        return None
    if kind == "top":
        return list(range(max(0, num_layers - value), num_layers))
    if kind == "bottom":
        return list(range(min(value, num_layers)))
    return [i for i in value if i < num_layers] if isinstance(value, list) else None


def modules_label(spec: Any) -> str:
    """A categorical label for optuna (its choices must be scalars)."""
    return DEFAULT_MODULES if spec == DEFAULT_MODULES else ",".join(spec)
