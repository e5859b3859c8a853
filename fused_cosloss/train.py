"""``python -m fused_cosloss.train``: the seed experiment (CE baseline against the mixed loss) with transformers.

The arguments (:mod:`fused_cosloss.train_args`) are four dataclasses read by transformers'
``HfArgumentParser``, as in its ``run_clm.py``, the last ``transformers.TrainingArguments``
with this script's defaults, so every Trainer flag works (``--report_to``, ``--save_strategy``,
``--gradient_checkpointing``, ...). A JSON file as the only argument holds the same arguments
(``python -m fused_cosloss.train args.json``).

With no arguments it runs offline in a few minutes on a CPU: a tiny GPT-2 (tied
embeddings) trained from scratch, with a byte-level BPE tokenizer trained on the spot,
on the generated corpus of :mod:`fused_cosloss.corpus`; the baseline (alpha = 0) and the
mixed loss (alpha = 0.5) both run and the comparison prints.

The seed's run (needs the network)::

    python -m fused_cosloss.train --model_name_or_path distilgpt2 --dataset_name wikitext \\
        --dataset_config_name wikitext-2-raw-v1 --text_field text

The runs, the grid and what they write are :mod:`fused_cosloss.experiment`; the tables and
the report, :mod:`fused_cosloss.train_report`. See docs/training.md.
"""
from __future__ import annotations

import contextlib
import sys

from .train_args import (PACKAGED_MODELS, PRESETS, TINY, Arguments, DataTrainingArguments,  # noqa: F401 (the CLI's names)
                         MixedLossArguments, ModelArguments, ScriptTrainingArguments, build_parser, parse_args)


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """Turn the progress bars of transformers and datasets off (and back on after) when not ``enabled``."""
    if enabled:
        yield
        return
    import datasets
    import transformers

    datasets_on = datasets.is_progress_bar_enabled()
    transformers_on = transformers.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            transformers.utils.logging.enable_progress_bar()


def main(argv=None) -> list[dict]:
    """Parse the arguments, run the experiment they ask for (:func:`fused_cosloss.experiment.run`); its results."""
    import torch

    for package in ("datasets", "tokenizers"):
        try:
            __import__(package)
        except ImportError as error:
            raise SystemExit(f"{error}: the training script needs transformers, datasets and tokenizers "
                             "(python -m pip install -c constraints.txt -e '.[train]')") from error
    args = parse_args(argv)
    from . import experiment

    threads = torch.get_num_threads()
    if args.training.num_threads:
        torch.set_num_threads(args.training.num_threads)
    try:
        with progress_bars(not args.training.disable_tqdm):
            return experiment.run(args)
    finally:
        torch.set_num_threads(threads)
        _close_process_group()


def _close_process_group() -> None:
    """Tear the process group down before exit: left to interpreter shutdown, gloo's threads can
    abort a worker ("terminate called without an active exception") after the work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
