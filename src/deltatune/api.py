"""High-level operations shared by the CLI and Python users: evaluate, apply, export, describe.

Each takes a delta directory (or a :class:`Delta`) and a local base-model folder; when the folder
is omitted, the one recorded at training time (or the embedded MiniLM) is used.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.delta import Delta
from deltatune.errors import ConfigError, NonFiniteError
from deltatune.io import outputs
from deltatune.io.delta_format import load_delta
from deltatune.io.shards import parse_size, write_sharded
from deltatune.model import DEFAULT
from deltatune.train.config import TrainConfig, check_max_length, default_model_path


def as_delta(delta: Delta | str | Path, verify: bool = True) -> Delta:
    """A :class:`Delta`, or a folder holding a deltatune delta or a PEFT LoRA adapter.

    ``verify=False`` skips the content-digest check of a folder (faster; CLI ``--no-verify``)."""
    if isinstance(delta, Delta):
        return delta
    if (Path(delta) / "adapter_config.json").is_file():
        from deltatune.io.peft_format import load_peft_adapter

        return load_peft_adapter(delta, verify=verify)
    return load_delta(delta, verify=verify)


def recorded_train_config(delta: Delta) -> dict[str, Any]:
    return dict(delta.provenance.train or {})


def recorded_max_length(delta: Delta) -> int:
    """Tokens per input the delta was trained with (its recorded ``max_length``; 128, the training default, for a
    delta that records none: a PEFT import, a delta attached in Python).  ``eval`` and ``predict`` truncate inputs
    to it, as training did."""
    value = recorded_train_config(delta).get("max_length")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 128


def base_model_path(delta: Delta, model: str | None) -> str:
    return model or delta.provenance.base or default_model_path()


def load_base_for(delta: Delta, model: str | None = None) -> nn.Module:
    """The base architecture the delta needs: a classifier when it carries a head, else causal LM/encoder."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from deltatune.train.tasks import _quiet_transformers, with_head

    _quiet_transformers()
    path = base_model_path(delta, model)
    if not Path(path).is_dir():
        raise ConfigError(f"model {path!r} is not a local folder")
    head = next((h for h in ("classifier", "score") if h in delta.heads), None)
    if head is not None:
        weight = delta.heads[head].get("weight")
        num_labels = int(weight.shape[0]) if weight is not None else 2
        if (delta.provenance.task or {}).get("task") == "tokens":
            from transformers import AutoModelForTokenClassification

            return with_head(AutoModelForTokenClassification, path, num_labels)
        return with_head(AutoModelForSequenceClassification, path, num_labels)
    config = AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return AutoModelForCausalLM.from_pretrained(path)
    with torch.device("meta"):
        bare = AutoModel.from_config(config)
    if not _holds_modules(bare, delta):  # parts named as the folder's own class names them (``bert.encoder…``)
        from deltatune.algebra.checkpoint import meta_architecture

        named = meta_architecture(path)
        if named is not None and _holds_modules(named, delta):
            return type(named).from_pretrained(path)
    return AutoModel.from_pretrained(path)  # where it lacks a module too, attaching names it


def _holds_modules(model: nn.Module, delta: Delta) -> bool:
    """Whether ``model`` has a module for every part of ``delta`` (model-level parts aside)."""
    names = {n for n, _ in model.named_modules()}
    return all(not name or name in names for name in delta.parts)


def evaluate_delta(delta: Delta | str | Path, model: str | None = None, task: str | None = None,
                   data: str | None = None, limit: int | None = None, batch_size: int = 64,
                   with_base: bool = False, verify: bool = True) -> dict[str, dict[str, float | None]]:
    """Task metrics of base + delta (and of the bare base when ``with_base``).

    For a ``classify``/``regress`` delta, ``data`` is the file to evaluate; the task, columns and label map
    come from the delta's ``task_info`` (without ``data``: the recorded eval file, else the recorded seeded
    hold-out of the training file, refused when that file changed since training:
    :func:`~deltatune.train.run_record.check_data_unchanged`).  A NaN or infinite loss is an error, not a result
    (:class:`NonFiniteError` names it and the row); a metric undefined on finite outputs (Pearson or Spearman of
    constant targets or predictions, of one row) is ``None`` (:func:`check_finite_metrics`).
    """
    from deltatune.train.evaluate import evaluate

    d = as_delta(delta, verify=verify)
    built = _eval_task(d, model, task, data, limit)
    torch.manual_seed(0)
    net = built.load_model()
    results = {}
    if with_base:
        results["base"] = evaluate(net, built, batch_size, torch.device("cpu"))
    from deltatune.train.stacking import attach_for_use

    attach_for_use(net, d, DEFAULT, where=str(delta) if not isinstance(delta, Delta) else "delta")
    results["delta"] = evaluate(net, built, batch_size, torch.device("cpu"))
    return check_finite_metrics(results, str(delta) if not isinstance(delta, Delta) else "the delta")


def _eval_task(d: Delta, model: str | None, task: str | None, data: str | None, limit: int | None):
    """The :class:`~deltatune.train.tasks.Task` to evaluate ``d`` on, as recorded at training time."""
    from deltatune.train.tasks import _say, build_task
    from deltatune.train.user_data import USER_TASKS

    rec = recorded_train_config(d)
    name = task or rec.get("task")
    if name is None:  # a PEFT import, a delta attached in Python: the embedded default, said
        name = "sst2"
        _say("the delta records no task; evaluating on sst2 (pass --task to choose another)")
    common = dict(model=base_model_path(d, model), task=name, eval_limit=limit, max_length=recorded_max_length(d))
    check_max_length(common["max_length"], common["model"], "the delta's recorded max_length")  # before any data
    if data is None and (name == "text" or (name in USER_TASKS and not rec.get("eval_data"))):
        _check_held_out_source(rec)
    if name == "jsonl":  # --data is the file to evaluate (its held-out rows come only from an eval file)
        cfg = TrainConfig(data=rec.get("data") or data, eval_data=data or rec.get("eval_data"), train_limit=1,
                          **common)
        built = build_task(cfg)
        if built.eval is None:
            raise ConfigError("the jsonl delta records no eval file: pass --data FILE.jsonl to evaluate on")
        return built
    if name not in USER_TASKS:
        cfg = TrainConfig(data=data or rec.get("data"), eval_data=rec.get("eval_data"), train_limit=1, **common)
        return build_task(cfg)
    info = d.provenance.task
    if not isinstance(info, dict) or info.get("task") != name:
        raise ConfigError(f"the delta records no {name!r} task_info (columns and label map); it was trained on "
                          f"task {rec.get('task')!r}")
    cfg = TrainConfig(data=rec.get("data") or data, eval_data=data or rec.get("eval_data"),
                      seed=int(rec.get("seed", 0)), **common)
    return build_task(cfg, recorded={k: v for k, v in info.items() if k != "name"})


@torch.no_grad()
def classification_report(delta: Delta | str | Path, data: str | None = None, model: str | None = None,
                          limit: int | None = None, batch_size: int = 64,
                          verify: bool = True) -> dict[str, dict[str, float]]:
    """Per-class ``{label name: {precision, recall, f1, support}}`` of a ``classify`` delta on ``data`` (default:
    its recorded eval rows), label names as in the training file."""
    from deltatune.train.evaluate import eval_outputs
    from deltatune.train.metrics import per_class_report

    d = as_delta(delta, verify=verify)
    if (d.provenance.task or {}).get("task") != "classify":
        raise ConfigError(f"{str(delta)[:80]}: a per-class report needs a delta trained with --task classify")
    built = _eval_task(d, model, "classify", data, limit)
    torch.manual_seed(0)
    net = built.load_model()
    from deltatune.train.stacking import attach_for_use

    attach_for_use(net, d, DEFAULT, where=str(delta) if not isinstance(delta, Delta) else "delta")
    logits, labels, _ = eval_outputs(net, built, batch_size, torch.device("cpu"))
    names = [str(n) for n in d.provenance.task["label_names"]]
    return per_class_report(logits, labels, names)


def _check_held_out_source(rec: dict[str, Any]) -> None:
    """:class:`~deltatune.errors.DataError` naming the training file when ``eval`` would rebuild the delta's
    held-out rows (a seeded 10 % of ``data``; ``text``: its last blocks) from a file whose content changed since
    training: they would be other rows, some of them trained on."""
    from deltatune.train.run_record import check_data_unchanged

    check_data_unchanged(rec.get("data"), rec.get("data_fingerprint"), "the delta was trained",
                         "its held-out rows cannot be rebuilt from it (they would include rows it trained on); "
                         "pass --data FILE to evaluate on a file of your own")


def check_finite_metrics(results: dict[str, dict[str, float]], where: str) -> dict[str, dict[str, float | None]]:
    """``results`` with every metric that is undefined on these outputs as ``None``; :class:`NonFiniteError` naming
    the metric and model row when the outputs themselves are not finite.

    The witness of the outputs is the ``loss`` (the mean over every labelled row or token of its cross-entropy or
    squared error, NaN or +Inf as soon as one output is): a NaN/±Inf loss, or any ±Inf metric, is an error.  A NaN
    metric beside a finite loss is undefined, not damage: Pearson ``cov(x, y) / (σx σy)`` and Spearman are 0/0 when
    the targets or the predictions are constant (a file of one score, ``--limit 1``).  A row without a ``loss``
    has no witness: every NaN there is an error, as before."""
    checked: dict[str, dict[str, float | None]] = {}
    for row, metrics in results.items():
        witnessed = isinstance(metrics.get("loss"), numbers.Real)
        for key, value in metrics.items():
            if isinstance(value, numbers.Real) and not math.isfinite(value) and (
                    key == "loss" or not witnessed or math.isinf(value)):
                raise NonFiniteError(f"evaluating {where[:80]}: metric {key!r} of model {row!r} is {value}; "
                                     "the model's outputs are not finite (a damaged or diverged delta?)")
        checked[row] = {k: None if isinstance(v, numbers.Real) and math.isnan(v) else v for k, v in metrics.items()}
    return checked


def apply_to_checkpoint(delta: Delta | str | Path, out: str | Path, model: str | None = None,
                        shard_size: str | int = "2GB", force: bool = False,
                        dtype: torch.dtype | None = None, overwrite: bool = False, verify: bool = True) -> list[str]:
    """Write base + delta as a full sharded safetensors checkpoint (config and tokenizer included).

    The config records the class written (``architectures``: ``BertForSequenceClassification`` for a delta with a
    classifier head) and the label names of the delta's task (``id2label``/``label2id``), so
    ``AutoModelForSequenceClassification.from_pretrained(out)`` gives the classifier with its labels.  A merged
    delta that keeps several tasks' heads is refused (pick one with
    :func:`deltatune.algebra.task_heads.for_task`).
    Tied tensors are written once (``transformers`` re-ties them on load).  Biases the delta adds to bias-free
    modules (BitFit on Llama) turn on the config's flag that creates them, or raise
    :class:`~deltatune.errors.NotMergeable` before anything is written where no flag can
    (:func:`deltatune.algebra.delta_checkpoint.express_added_biases`).  An existing ``out`` must be an
    earlier checkpoint output unless ``overwrite`` (:class:`~deltatune.errors.OutputExists`).
    """
    from deltatune.algebra.checkpoint import config_with_dtype
    from deltatune.algebra.delta_checkpoint import express_added_biases
    from deltatune.algebra.labels import describe_classifier
    from deltatune.algebra.task_heads import require_one_task
    from deltatune.io.outputs import CHECKPOINT_KIND, guard_output
    from deltatune.parts.capabilities import require_capability
    from deltatune.train.stacking import merge_for_use

    guard_output(out, CHECKPOINT_KIND, overwrite)  # before the base model is loaded and merged
    d = as_delta(delta, verify=verify)
    where = str(delta) if not isinstance(delta, Delta) else "delta"
    require_capability(d, "additive", "apply with merging")  # before the base model is loaded
    require_one_task(d, f"apply {where}")
    net = load_base_for(d, model)
    merge_for_use(net, d, force=force, where=where)  # a stacked delta with the deltas it was trained on beneath it
    describe_classifier(net, d.provenance.task)  # a classifier comes back as one, with its label names
    express_added_biases(net, f"apply {where}")  # so the checkpoint loads the biases BitFit added
    seen: set[int] = set()

    def tensors():
        for name, t in net.state_dict().items():
            key = t.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            yield name, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)

    extra = [("config.json", config_with_dtype(net.config.to_json_string().encode(), dtype))]
    extra += _tokenizer_files(base_model_path(d, model))
    return write_sharded(out, tensors(), parse_size(shard_size), extra, overwrite=overwrite)


def _tokenizer_files(path: str) -> list[tuple[str, bytes]]:
    """The base's ``generation_config.json`` and every tokenizer artifact
    (:func:`deltatune.algebra.checkpoint.tokenizer_files`)."""
    from deltatune.algebra.checkpoint import tokenizer_files

    generation = Path(path) / "generation_config.json"
    found = [(generation.name, generation.read_bytes())] if generation.is_file() else []
    return found + tokenizer_files(path)


def describe(delta: Delta | str | Path, verify: bool = True) -> dict[str, Any]:
    """What ``deltatune info`` prints: method, counts, bytes, fingerprint, metrics, per-layer rows.

    ``bytes`` is the tensors' size as loaded (every part and head tensor, ``numel × element size``); ``disk_bytes``
    the saved folder's files (:func:`deltatune.io.outputs.folder_bytes`; ``None`` for a delta object): the two
    differ by the headers and manifest, and for a compact or compressed delta by its encoding."""
    d = as_delta(delta, verify=verify)
    return {
        "method": d.method,
        "config": d.config,
        "parts": len(d.parts),
        "part_kinds": d.part_kinds(),
        "trainable": d.trainable_count,
        "head_params": d.head_count,
        "bytes": d.nbytes,
        "disk_bytes": outputs.folder_bytes(delta) if isinstance(delta, str | Path) and Path(delta).is_dir() else None,
        "base_params": (d.fingerprint or {}).get("num_params"),
        "density": d.trainable_count / (d.fingerprint or {}).get("num_params", 0)
        if (d.fingerprint or {}).get("num_params") else None,
        "fingerprint": d.fingerprint,
        "metrics": {k: v for k, v in d.metrics.items() if k in ("before", "final", "best", "steps", "world_size",
                                                               "task")},
        "layers": d.layer_rows(),
    }
