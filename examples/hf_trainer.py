"""A deltatune delta trained inside Hugging Face's ``Trainer``: MiniLM with a SpIEL sparse delta (1 % of the
weights) on SST-2, a few steps.

The method's own optimizer (``SparseAdamW``) comes from ``make_optimizer`` (the task head in its own group, at its
own learning rate); ``DeltaTuneCallback`` runs the method's drop-and-regrow schedule around every optimiser step
and saves the delta, with its trained head, in deltatune's format to ``OUT/delta``.  Everything else is plain
``transformers`` and ``datasets``.

Usage::

    python examples/hf_trainer.py --model $MINILM --out hf-sst2      # then: deltatune eval hf-sst2/delta --task sst2
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import datasets
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import deltatune as dt
from deltatune.train.glue import default_data_dir
from deltatune.train.integration import DeltaTuneCallback, make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="base model folder (e.g. $MINILM)")
    parser.add_argument("--data", default=None, help="SST-2 train.tsv (default: the shared GLUE folder's)")
    parser.add_argument("--out", required=True, help="Trainer output folder; the delta goes to OUT/delta")
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="the delta's learning rate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = args.data or str(default_data_dir() / "glue" / "SST-2" / "train.tsv")
    rows = datasets.load_dataset("csv", data_files=data, delimiter="\t", quoting=csv.QUOTE_NONE, split="train")
    rows = rows.shuffle(seed=args.seed).select(range(args.steps * args.batch_size))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = rows.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=64), batched=True,
                    remove_columns=["sentence"])

    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    delta = dt.attach(model, dt.SparseConfig(density=0.01))  # the classifier head is trained and saved with it
    delta.provenance.base = args.model  # where the base lives: `deltatune eval` then needs no --model

    training = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                                 learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, logging_steps=20,
                                 save_strategy="no", report_to=[], use_cpu=True, seed=args.seed, disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=rows,
                      data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=[DeltaTuneCallback(delta)],  # SpIEL's drop/regrow each step; saves OUT/delta
                      optimizers=(make_optimizer(model, delta, lr=args.lr), None))  # SparseAdamW, head at its own LR
    trainer.train()
    print(f"{delta.method} delta, {delta.trainable_count:,} values + a {delta.head_count:,}-value head, written to "
          f"{Path(args.out) / 'delta'}")


if __name__ == "__main__":
    main()
