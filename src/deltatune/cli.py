"""``deltatune <verb>``: train, eval, info, apply, export, methods, merge, compress, rebase.

Every flag maps onto a typed config (``TrainConfig`` or the method's dataclass); ``--set key=value``
reaches any field of either, and ``--config run.yaml`` loads ``{train: {...}, method: {name: ..., ...}}``.
Every command that writes refuses an existing folder that is not its own earlier output unless
``--overwrite``; every command that reads deltas checks their digests unless ``--no-verify``.  Any
failure ends with exit status 2 and one line on stderr (``deltatune --debug CMD`` prints the traceback;
see :mod:`deltatune.commands.failure`).
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Column, Table

from deltatune.commands.compose import compose_command
from deltatune.commands.compress import compress_command
from deltatune.commands.failure import report_failure, set_debug
from deltatune.commands.inspect import inspect_command
from deltatune.commands.merge import merge_command
from deltatune.commands.options import NoVerify, Overwrite
from deltatune.commands.rebase import rebase_command
from deltatune.commands.search import search_command
from deltatune.commands.serve import serve_command
from deltatune.config import brief, read_sections
from deltatune.errors import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Train, inspect, apply and export fine-tunings as deltas over a frozen base model.")
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="on error, print the full traceback "
                                                                  "(also DELTATUNE_DEBUG=1)")] = False) -> None:
    set_debug(debug)


def _split_sets(sets: list[str]) -> dict[str, str]:
    pairs = {}
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        pairs[key.strip()] = value.strip()
    return pairs


def _read_run_yaml(config_file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{train: {...}, method: {name: ..., ...}}`` from a bounded, safe YAML read (see ``config.read_yaml``)."""
    train, method = read_sections(config_file, ("train", "method"))
    return train, method


def _train_configs(method: str, config_file: Path | None, flags: dict[str, Any], sets: list[str]):
    from deltatune.config import parse_config
    from deltatune.methods import get_method
    from deltatune.train.config import TrainConfig

    train_map: dict[str, Any] = {}
    method_map: dict[str, Any] = {}
    if config_file is not None:
        train_map, method_map = _read_run_yaml(config_file)
    method = method_map.pop("name", None) or method
    if not isinstance(method, str):
        raise ConfigError(f"{config_file}: method.name must be a string, got {brief(method)}")
    train_map.update({k: v for k, v in flags.items() if v is not None})
    train_fields = {f.name for f in fields(TrainConfig)}
    for key, value in _split_sets(sets).items():
        (train_map if key in train_fields else method_map)[key] = value
    return parse_config(TrainConfig, train_map, "train config"), get_method(method).parse(method_map)


@app.command()
def train(
    method: Annotated[str, typer.Option(help="sparse, lora or full (see `deltatune methods`)")] = "sparse",
    task: Annotated[str | None, typer.Option(help="GLUE task name, 'text', 'jsonl', 'classify', "
                                                         "'regress', 'tokens' or 'chat'")] = None,
    model: Annotated[str | None, typer.Option(help="local base-model folder (default: embedded MiniLM)")] = None,
    data: Annotated[str | None, typer.Option(help="GLUE data folder, text/JSONL file, or the training file "
                                                  "(CSV, TSV, JSON, JSONL, Parquet, save_to_disk folder)")] = None,
    eval_data: Annotated[str | None, typer.Option(help="eval file (default for classify, regress and tokens: a "
                                                       "seeded 10% hold-out of --data)")] = None,
    text_column: Annotated[str | None, typer.Option(help="text column (default 'text'; tokens: 'tokens', chat: "
                                                         "'messages')")] = None,
    text_pair_column: Annotated[str | None, typer.Option(help="second text column, for sentence pairs")] = None,
    label_column: Annotated[str | None, typer.Option(help="label column (default 'label'; tokens: 'tags')")] = None,
    out_dir: Annotated[str | None, typer.Option("--out", help="output folder")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    head_lr: Annotated[float | None, typer.Option(help="learning rate of fresh task heads (default: 10 × lr, at "
                                                       "most 2e-2, never below lr)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="micro-batch size per process")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from OUT/checkpoint")] = False,
    config: Annotated[Path | None, typer.Option(help="YAML file with train: and method: sections")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value for any train or method field (lists "
                                                               "comma-separated, mappings as YAML flow: "
                                                               "'v_heads={0: [1, 3]}')")] = None,
    report_to: Annotated[list[str] | None, typer.Option(help="experiment tracker (repeatable): tensorboard, wandb, "
                                                             "mlflow; OUT/metrics.jsonl is always written")] = None,
    on: Annotated[list[str] | None, typer.Option("--on", help="delta folder to train on top of (repeatable): "
                                                             "merged into the base first, recorded with its digest")]
    = None,
    overwrite: Overwrite = False,
) -> None:
    """Train a delta; writes OUT/delta (final), OUT/best (best eval), OUT/checkpoint (resume) and
    OUT/metrics.jsonl (one line per step and per evaluation)."""
    from deltatune.train.loop import train as run

    flags = {"task": task, "model": model, "data": data, "eval_data": eval_data, "text_column": text_column,
             "text_pair_column": text_pair_column, "label_column": label_column, "out_dir": out_dir,
             "max_steps": steps, "lr": lr, "head_lr": head_lr, "batch_size": batch_size, "resume": resume or None,
             "overwrite": overwrite or None, "report_to": report_to or None, "on": on or None}
    train_cfg, method_cfg = _train_configs(method, config, flags, set_ or [])
    result = run(train_cfg, method_cfg)
    _end_process_group()
    if not result.is_main:
        return
    if result.before or result.final:
        key = next(iter(result.final or result.before))
        before, after = (f"{v:.4f}" if v is not None else "undefined"
                         for v in (result.before.get(key), result.final.get(key)))
        err.print(f"[bold]{key}[/bold]: before {before} → after {after}")
    out.print(str(result.delta_dir))


def _end_process_group() -> None:
    """Tear the process group down before the interpreter exits (a multi-process run whose gloo/MPI threads
    outlive it can abort at exit, after its work is done)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@app.command("eval")
def eval_(
    delta: Annotated[Path, typer.Argument(help="delta folder")],
    model: Annotated[str | None, typer.Option(help="base-model folder (default: as trained)")] = None,
    task: Annotated[str | None, typer.Option(help="task (default: as trained)")] = None,
    data: Annotated[str | None, typer.Option(help="data folder or file (default: as trained)")] = None,
    limit: Annotated[int | None, typer.Option(help="first N eval examples")] = None,
    base: Annotated[bool, typer.Option("--base", help="also evaluate the bare base model")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the delta's metrics as one JSON object keyed by "
                                                         "metric name (with --base, the base's under 'base')")] = False,
    verify: NoVerify = True,
) -> None:
    """Evaluate base + delta on the task's dev data with its official metric (a NaN loss is an error; a metric
    undefined on these rows, such as Pearson of constant scores, shows as undefined, null with --json).

    For a classify, regress, tokens or chat delta, --data is the file to evaluate; task, columns and label map are
    as trained."""
    from deltatune.api import evaluate_delta

    results = evaluate_delta(delta, model=model, task=task, data=data, limit=limit, with_base=base, verify=verify)
    if as_json:
        doc: dict[str, Any] = dict(results["delta"])
        if "base" in results:
            doc["base"] = results["base"]
        print(json.dumps(doc))
        return
    keys = sorted({k for r in results.values() for k in r})
    table = Table("model", *keys)
    for name, metrics in results.items():  # None: undefined on these outputs (a correlation of constant targets)
        table.add_row(name, *("undefined" if metrics.get(k) is None else f"{metrics[k]:.4f}" for k in keys))
    out.print(table)


@app.command()
def predict(
    delta: Annotated[list[Path] | None, typer.Argument(help="delta folder(s)")] = None,
    also: Annotated[list[Path] | None, typer.Option(
        "--delta", help="another delta (repeatable); all share one mixed batch, each row routed to its delta")] = None,
    data: Annotated[str, typer.Option(
        help="file of inputs (CSV, TSV, JSON, JSONL, Parquet, save_to_disk folder)")] = "",
    out: Annotated[Path | None, typer.Option(help="JSON Lines output (default: print to the terminal)")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="also list the k most probable labels")] = 1,
    model: Annotated[str | None, typer.Option(help="base-model folder (default: as trained)")] = None,
    batch_size: Annotated[int, typer.Option(help="rows per forward pass")] = 32,
    max_length: Annotated[int | None, typer.Option(help="tokens per input (default: each delta's, as trained)")]
    = None,
    verify: NoVerify = True,
) -> None:
    """Predict a label for every row of --data: one JSON line per input, in input order, with the label (spelled as
    in the training file) and its probability; the text columns and label map are as trained."""
    from deltatune.prediction import predict as run_predict

    deltas = [*(delta or []), *(also or [])]
    if not deltas:
        raise ConfigError("predict needs a delta folder (argument or --delta)")
    if not data:
        raise ConfigError("predict needs --data FILE")
    rows = run_predict(deltas, data, out=out, model=model, top_k=top_k, batch_size=batch_size, max_length=max_length,
                       verify=verify)
    if out is None:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        err.print(f"{len(rows)} predictions written to {out}")


@app.command()
def generate(
    delta: Annotated[list[Path] | None, typer.Argument(help="causal-LM delta folder(s)")] = None,
    also: Annotated[list[Path] | None, typer.Option(
        "--delta", help="another delta (repeatable); all share one batch, each row routed to its delta")] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="a prompt (repeatable)")] = None,
    prompts: Annotated[Path | None, typer.Option(help="a file of prompts, one per line")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate at most")] = 64,
    temperature: Annotated[float, typer.Option(help="0: greedy; > 0: sampling temperature")] = 0.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="sample from the k most probable tokens (0: all)")] = 0,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable); the text ends before it")] = None,
    model: Annotated[str | None, typer.Option(help="base-model folder (default: as trained)")] = None,
    proxy_tuned: Annotated[list[str] | None, typer.Option(
        "--proxy-tuned", help="proxy tuning: a delta over a small base (repeatable, EFT); steers the large model "
                              "(the deltas' base or --model) by small tuned − small base")] = None,
    proxy_base: Annotated[str | None, typer.Option(help="the small base folder (default: as trained)")] = None,
    proxy_scale: Annotated[list[float] | None, typer.Option(help="α per --proxy-tuned (default 1.0)")] = None,
    proxy_mode: Annotated[str, typer.Option(help="logits (proxy tuning) or logprobs (EFT)")] = "logits",
    raw: Annotated[bool, typer.Option("--raw", help="send each prompt as is (a delta trained with --task chat "
                                                    "otherwise gets it as a user turn in the chat template)")] = False,
    verify: NoVerify = True,
) -> None:
    """Continue prompts with causal-LM deltas (one JSON line per prompt; a single prompt and delta streams its
    tokens to the terminal as they come). A --task chat delta gets each prompt as one user turn in the tokenizer's
    chat template, with the generation prompt; --raw turns that off."""
    from deltatune.generation import generate as run_generate

    deltas = [*(delta or []), *(also or [])]
    texts = list(prompt or [])
    if prompts is not None:
        try:
            texts += [line for line in prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{prompts}: cannot read the prompts ({str(exc)[:80]})") from None
    proxy = None
    if proxy_tuned:
        from deltatune.config import parse_config
        from deltatune.proxy import ProxyConfig

        proxy = parse_config(ProxyConfig, {"tuned": proxy_tuned, "scale": proxy_scale or [1.0], "base": proxy_base,
                                           "mode": proxy_mode}, "proxy")
    if not (deltas or (proxy and model)) or not texts:
        raise ConfigError("generate needs a delta folder (argument or --delta; with --proxy-tuned, --model will do) "
                          "and --prompt or --prompts FILE")
    single = len(deltas) <= 1 and len(texts) == 1
    rows = run_generate(deltas, texts, model=model, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, top_k=top_k, seed=seed, stop=stop or (), verify=verify, proxy=proxy, raw=raw,
                        stream=(lambda piece: print(piece, end="", flush=True)) if single else None)
    if single:
        print()
        return
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))


@app.command()
def info(
    delta: Annotated[Path, typer.Argument(help="delta folder")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    layers: Annotated[bool, typer.Option("--layers/--no-layers", help="per-layer table")] = True,
    verify: NoVerify = True,
) -> None:
    """Parts, trainable count, bytes, density per layer and the base fingerprint."""
    from deltatune.api import describe

    d = describe(delta, verify=verify)
    if as_json:
        out.print_json(json.dumps(d, default=str))
        return
    head = Table(show_header=False, box=None)
    for key in ("method", "parts", "part_kinds", "trainable", "head_params", "bytes", "disk_bytes", "base_params",
                "density", "fingerprint", "metrics"):
        value = d[key]
        if key == "density" and value is not None:
            value = f"{value:.4%}"
        head.add_row(f"[bold]{key}[/bold]", json.dumps(value) if isinstance(value, dict) else str(value))
    out.print(head)
    if layers:
        table = Table(Column("module", overflow="fold"), "kind", "trainable", "bytes", "density", "‖Δ‖")
        for row in d["layers"]:
            table.add_row(row["module"], row["kind"], str(row["trainable"]), str(row["bytes"]),
                          f"{row['density']:.4%}", "–" if row["delta_norm"] is None else f"{row['delta_norm']:.4g}")
        out.print(table)
        if any(row["delta_norm"] is None for row in d["layers"]):
            out.print("‖Δ‖ –: the update depends on the base weights (DoRA, (IA)³) or is not a weight update "
                      "(adapters, prompts, mixtures); `deltatune inspect DELTA --base MODEL` measures it")


@app.command()
def apply(
    delta: Annotated[Path, typer.Argument(help="delta folder")],
    out_dir: Annotated[Path, typer.Option("--out", help="checkpoint folder to write")],
    model: Annotated[str | None, typer.Option(help="base-model folder (default: as trained)")] = None,
    shard_size: Annotated[str, typer.Option(help="max shard size, e.g. 500MB, 2GB")] = "2GB",
    force: Annotated[bool, typer.Option("--force", help="skip the base fingerprint check")] = False,
    overwrite: Overwrite = False,
    verify: NoVerify = True,
) -> None:
    """Write base + delta as a full sharded safetensors checkpoint (loads with from_pretrained)."""
    from deltatune.api import apply_to_checkpoint

    names = apply_to_checkpoint(delta, out_dir, model=model, shard_size=shard_size, force=force,
                                overwrite=overwrite, verify=verify)
    err.print(f"wrote {len(names)} shard(s)")
    out.print(str(out_dir))


@app.command()
def export(
    delta: Annotated[Path, typer.Argument(help="delta folder")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write")],
    format: Annotated[str, typer.Option(help="peft")] = "peft",
    base_name: Annotated[str | None, typer.Option(help="base_model_name_or_path written for PEFT")] = None,
    overwrite: Overwrite = False,
    verify: NoVerify = True,
) -> None:
    """Export a LoRA delta in PEFT's adapter format (loads in PEFT and vLLM)."""
    from deltatune.api import as_delta, base_model_path
    from deltatune.io.outputs import PEFT_KIND, guard_output
    from deltatune.io.peft_export import export_peft

    if format != "peft":
        raise ConfigError(f"--format {format[:40]!r} is not supported; formats: peft")
    guard_output(out_dir, PEFT_KIND, overwrite)
    d = as_delta(delta, verify=verify)
    export_peft(d, out_dir, base_model_name_or_path=base_name or base_model_path(d, None), overwrite=overwrite,
                model=tie_probe(d))
    out.print(str(out_dir))


def tie_probe(d: Any) -> Any:
    """The architecture of the base ``d`` records (meta device: no weights read), to tell which modules share a
    weight, where ``d`` has a part on an embedding or an ``lm_head`` and that base folder is here and has every
    module ``d`` targets; else ``None`` (ties unknown)."""
    from deltatune.model import logical_modules
    from deltatune.parts.layers import LayerKind

    base = d.provenance.base
    if not base or not Path(base, "config.json").is_file() or not any(
            p.layer_kind() is LayerKind.EMBEDDING or n.rsplit(".", 1)[-1] == "lm_head" for n, p in d.parts.items()):
        return None
    from deltatune.algebra.checkpoint import meta_architecture

    model = meta_architecture(base)
    return model if model is not None and set(d.parts) <= {n for n, _ in logical_modules(model)} else None


@app.command()
def methods() -> None:
    """List methods, their capabilities and config fields (usable as --set key=value)."""
    from deltatune.config import describe_fields
    from deltatune.methods import METHODS, get_method

    get_method("lora")
    for name, method in sorted(METHODS.items()):
        caps = ", ".join(f"{c}={'yes' if v else 'no'}" for c, v in method.capabilities().items())
        kinds = ", ".join(k.kind for k in method.part_kinds)
        out.print(f"{name}: {method.summary}", markup=False)  # at the console's width, not the table's
        out.print(f"parts: {kinds}; {caps}", markup=False)
        table = Table("field", "type", "default", "meaning")
        for row in describe_fields(method.config_cls):
            table.add_row(*row)
        out.print(table)


app.command("compress")(compress_command)
app.command("merge")(merge_command)
app.command("rebase")(rebase_command)
app.command("serve")(serve_command)
app.command("compose")(compose_command)
app.command("inspect")(inspect_command)
app.command("search")(search_command)


def main() -> None:
    """The console entry point: every failure ends with exit status 2 and one line on stderr."""
    from deltatune.commands.process import exit_now_if_done, reset_teardown

    reset_teardown()
    set_debug(False)
    try:
        app()
    except SystemExit as exc:
        exit_now_if_done(exc.code)  # streaming commands: skip the interpreter's teardown (see process.py)
        raise
    except Exception as exc:  # noqa: BLE001  (reported in one line, or as a traceback with --debug)
        raise SystemExit(report_failure(exc)) from None


if __name__ == "__main__":
    main()
