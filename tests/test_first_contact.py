"""What a new user meets in the first minutes (issue 15): the native build's messages, the
import, untied models and the standard collator in a Trainer, meta tensors, and the README's
examples run as written."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fused_cosloss import LinearMixedLoss, MixedLoss, linear_mixed_loss, mixed_loss

ROOT = Path(__file__).resolve().parent.parent


def _python(code_or_args, tmp_path, env=None, timeout=600):
    """Run python (``-c code`` or a list of arguments) in a clean environment; returns the CompletedProcess."""
    full_env = {key: value for key, value in os.environ.items()
                if not key.startswith("FUSED_COSLOSS_") and key not in ("CXX", "PYTHONWARNINGS")}
    full_env["FUSED_COSLOSS_CACHE"] = str(tmp_path / "cache")  # empty: a build happens
    full_env.update(env or {})
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else list(code_or_args)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, cwd=tmp_path,
                          timeout=timeout)


# ---- the native build says what it does, and why it fails ----------------------------------------

# A source that builds in seconds (no torch headers): a Python module named as the loader expects.
STUB_SOURCE = r"""
#include <Python.h>
#define STUB_CONCAT_(a, b) a##b
#define STUB_CONCAT(a, b) STUB_CONCAT_(a, b)
#define STUB_STR_(a) #a
#define STUB_STR(a) STUB_STR_(a)
static struct PyModuleDef stub_module = {PyModuleDef_HEAD_INIT, STUB_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
PyMODINIT_FUNC STUB_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&stub_module); }
"""

# What the user's script does: the native backend by name, then "auto"; prints what each said.
USE_NATIVE = """
import warnings, torch
from fused_cosloss import mixed_loss
z, y, e = torch.randn(3, 5), torch.tensor([0, 1, 2]), torch.randn(5, 4)
try:
    mixed_loss(z, y, e, backend="native")
except RuntimeError as error:
    print("RAISED>" + str(error) + "<END")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    mixed_loss(z, y, e, backend="auto")
print("WARNED>" + "".join(str(w.message) for w in caught) + "<END")
"""


def _between(text, start):
    return re.search(re.escape(start) + r"(.*?)<END", text, re.S).group(1)


@pytest.fixture(scope="module")
def c_compiler():
    compiler = os.environ.get("CXX", "c++")
    if subprocess.run(["sh", "-c", f"command -v {compiler}"], capture_output=True).returncode != 0:
        pytest.skip("no C++ compiler here")
    return compiler


def test_build_says_when_it_starts_and_ends_and_nothing_on_a_cache_hit(tmp_path, c_compiler):
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "stub.cpp").write_text(STUB_SOURCE)
    env = {"FUSED_COSLOSS_CSRC": str(src)}
    first = _python(["-m", "fused_cosloss.build"], tmp_path, env)
    assert first.returncode == 0, first.stderr
    lines = [line for line in first.stderr.splitlines() if line.startswith("fused_cosloss:")]
    assert len(lines) == 2, first.stderr
    start, done = lines
    assert "building the native CPU kernel with " in start and "about a minute" in start
    assert str(tmp_path / "cache") in start and "python -m fused_cosloss.build" in start
    assert re.search(r"built in \d+ s", done) and str(tmp_path / "cache") in done
    assert "the native CPU kernel is built" in first.stdout
    again = _python(["-m", "fused_cosloss.build"], tmp_path, env)
    assert again.returncode == 0 and again.stderr == "", again.stderr  # loaded from the cache: quiet


def test_missing_compiler_leads_with_the_cause_then_the_fix(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    result = _python(USE_NATIVE, tmp_path, {"PATH": str(empty)})  # no c++ (nor anything else) on PATH
    assert result.returncode == 0, result.stderr
    raised, warned = _between(result.stdout, "RAISED>"), _between(result.stdout, "WARNED>")
    for message in (raised, warned):
        first, fix = message.splitlines()[:2]
        assert "no C++ compiler: `c++` was not found on PATH" in first
        assert len(first) < 160, first
        assert fix.startswith("  to fix: install one") and "CXX" in fix and "python -m fused_cosloss.build" in fix
    assert len(raised) < 600, raised  # no build log: nothing was run


FAKE_COMPILER = """#!/bin/sh
echo "fake-g++: fatal error: fused_cosloss_fake_compiler cannot compile anything" >&2
exit 1
"""


def test_failing_compiler_leads_with_its_error_and_keeps_the_log_for_verbose(tmp_path):
    compiler = tmp_path / "g++"
    compiler.write_text(FAKE_COMPILER)
    compiler.chmod(0o755)
    result = _python(USE_NATIVE, tmp_path, {"CXX": str(compiler)})
    assert result.returncode == 0, result.stderr
    assert f"fused_cosloss: building the native CPU kernel with {compiler}" in result.stderr
    raised, warned = _between(result.stdout, "RAISED>"), _between(result.stdout, "WARNED>")
    for message in (raised, warned):
        first, fix, log = message.splitlines()[:3]
        assert "fatal error: fused_cosloss_fake_compiler cannot compile anything" in first, message
        assert fix.startswith("  to fix: ")
        assert log.startswith("  build log: ") and "FUSED_COSLOSS_VERBOSE=1" in log
    assert "ninja" not in raised  # the log is not in the message ...
    log_path = Path(raised.splitlines()[2].split("build log: ")[1].split(" (")[0])
    assert "ninja: build stopped" in log_path.read_text()  # ... but in the file it names


def test_verbose_puts_the_build_log_in_the_message(tmp_path, monkeypatch):
    from fused_cosloss import build_report

    monkeypatch.setenv("FUSED_COSLOSS_VERBOSE", "1")
    error = RuntimeError("Error building extension 'x': [1/2] c++ -c a.cpp\na.cpp:1:2: error: boom\n"
                         "ninja: build stopped: subcommand failed.")
    message = str(build_report.diagnose(error, "c++", tmp_path / "build.log"))
    assert message.splitlines()[0].endswith("a.cpp:1:2: error: boom")
    assert "ninja: build stopped" in message
    monkeypatch.delenv("FUSED_COSLOSS_VERBOSE")
    assert "ninja: build stopped" not in str(build_report.diagnose(error, "c++", tmp_path / "build.log"))


def test_ninja_is_a_dependency_of_the_default_install():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(re.match(r"ninja\b", dependency) for dependency in project["dependencies"])


# ---- import ----------------------------------------------------------------------------------------

def test_import_under_warnings_as_errors_does_not_load_dynamo(tmp_path):
    # `import torch` alone does not load torch._dynamo (torch 2.11 to 2.13): anything there is the package's
    bare = _python("import sys, torch; print('torch._dynamo' in sys.modules)", tmp_path)
    if bare.stdout.strip() != "False":
        pytest.skip("this torch imports torch._dynamo itself")
    result = _python(["-W", "error", "-c", "import fused_cosloss, sys; assert 'torch._dynamo' not in sys.modules, "
                      "'imported torch._dynamo'"], tmp_path)
    assert result.returncode == 0, result.stderr


BLOCK_NUMPY = """
import importlib.abc, sys, warnings
class NoNumpy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "numpy":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoNumpy())
with warnings.catch_warnings():
    warnings.simplefilter("ignore")   # torch 2.13 itself warns that numpy is missing, once
    import torch
warnings.simplefilter("error")
import fused_cosloss
print("imported")
"""


def test_import_without_numpy_adds_no_warning_of_its_own(tmp_path):
    result = _python(BLOCK_NUMPY, tmp_path)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr


def test_the_lazy_constant_mark_is_the_one_torch_compiler_sets():
    from fused_cosloss.compiler_marks import assume_constant_result

    def ours():
        return 0

    def torchs():
        return 0

    assume_constant_result(ours)
    torch.compiler.assume_constant_result(torchs)
    assert vars(ours) == vars(torchs)


def test_linear_mixed_loss_still_runs_eagerly_inside_a_compiled_function():
    """The lazy ``disable``: in traced code the chunked loss is a graph break and runs eagerly, with
    the eager value and gradients."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, 5, generator=g)
    weight = torch.randn(13, 5, generator=g)
    labels = torch.randint(0, 13, (2, 6), generator=g)

    def step(hidden, weight):
        return linear_mixed_loss(torch.tanh(hidden), weight, labels, shift=True, topk=4, chunk_size=3,
                                 backend="reference")

    results = []
    for fn in (step, torch.compile(step, backend="eager")):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
    explanation = torch._dynamo.explain(step)(hidden, weight)
    assert explanation.graph_break_count >= 1  # the loss is not traced into


# ---- Hugging Face Trainer: untied models, the standard collator ----------------------------------

VOCAB = 40


def _untied_models(hf):
    small = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 tie_word_embeddings=False)
    return {
        "llama": lambda: hf.LlamaForCausalLM(hf.LlamaConfig(num_key_value_heads=2, **small)),
        "mistral": lambda: hf.MistralForCausalLM(hf.MistralConfig(num_key_value_heads=2, **small)),
        "phi": lambda: hf.PhiForCausalLM(hf.PhiConfig(**small)),
        "gpt-neox": lambda: hf.GPTNeoXForCausalLM(hf.GPTNeoXConfig(**small)),
        "granite": lambda: hf.GraniteForCausalLM(hf.GraniteConfig(num_key_value_heads=2, **small)),
    }


@pytest.mark.parametrize("name", ["llama", "mistral", "phi", "gpt-neox", "granite"])
def test_untied_models_are_refused_at_construction(hf, name):
    from fused_cosloss.hf import MixedLossForTrainer

    model = _untied_models(hf)[name]()
    assert model.get_input_embeddings().weight is not model.get_output_embeddings().weight
    with pytest.raises(ValueError, match=r"not tied.*embedding='input'.*embedding='output'"):
        MixedLossForTrainer(model, alpha=0.5)
    assert MixedLossForTrainer(model, embedding="input").get_embedding() is model.get_input_embeddings().weight
    assert MixedLossForTrainer(model, embedding="output").get_embedding() is model.get_output_embeddings().weight


def _tiny_gpt2(hf, vocab=VOCAB, positions=16, tied=True):
    torch.manual_seed(0)
    config = hf.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied)
    return hf.GPT2LMHeadModel(config)


def _tiny_llama(hf):
    torch.manual_seed(0)
    return _untied_models(hf)["llama"]()


def _tokenizer(hf):
    """A word-level tokenizer over "w0" ... "w38" plus "[PAD]" (id 39), offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)}
    vocab["[PAD]"] = VOCAB - 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return hf.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]")


def _token_dataset(n, seed=0):
    """``input_ids`` rows of uneven lengths (the collator pads them; padding gets label -100)."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, VOCAB - 1, (int(torch.randint(6, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]
    return datasets.Dataset.from_dict({"input_ids": rows})


def _args(hf, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to="none", save_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0, dataloader_pin_memory=False, seed=0, max_grad_norm=0.0, logging_steps=1,
                per_device_train_batch_size=2, per_device_eval_batch_size=4, max_steps=1, use_cpu=True)
    base.update(kw)
    return hf.TrainingArguments(**base)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_standard_collator_gives_the_exact_mean_over_shifted_positions(hf, tmp_path, accumulate):
    """labels = input_ids (DataCollatorForLanguageModeling(mlm=False)) on GPT-2, which the Trainer
    would count with position 0: the losses of the micro-batches of one step add up to the mean
    over the shifted valid positions of the whole batch, and so do the gradients."""
    from fused_cosloss.hf import MixedLossForTrainer

    data = _token_dataset(4)
    collator = hf.DataCollatorForLanguageModeling(_tokenizer(hf), mlm=False)
    options = dict(alpha=0.5, temperature=0.8, topk=6, backend="reference")

    model = _tiny_gpt2(hf)
    loss_fn = MixedLossForTrainer(model, probe_grad_norms=False, **options)
    recorded = []

    def recording(outputs, labels, num_items_in_batch=None):
        loss = loss_fn(outputs, labels, num_items_in_batch=num_items_in_batch)
        recorded.append(loss.detach())
        return loss

    kwargs = loss_fn.trainer_kwargs()
    kwargs["compute_loss_func"] = recording
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = hf.Trainer(model=model, args=_args(hf, tmp_path, per_device_train_batch_size=4 // accumulate,
                                                 gradient_accumulation_steps=accumulate),
                         train_dataset=data, data_collator=collator, optimizers=(optimizer, scheduler), **kwargs)
    trainer.train()
    assert len(recorded) == accumulate

    # The whole batch at once: the valid (position, next label) pairs are those of the micro-batches,
    # whatever rows each got and however the collator padded them (padding is ignored, right-padded).
    reference = _tiny_gpt2(hf)  # the same initial weights
    batch = collator(list(data))
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    embedding = reference.get_input_embeddings().weight
    mean = mixed_loss(logits, batch["labels"], embedding, shift=True, **options)
    assert torch.all(batch["labels"][:, 0] != -100)  # position 0 is a label the shift never uses
    torch.testing.assert_close(sum(recorded), mean.detach(), rtol=1e-5, atol=0)
    mean.backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(model.state_dict()[name] - before[name], -p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_an_inexact_count_is_said_once(hf, monkeypatch):
    """Where the Trainer would still count labels[..., 0] (an older transformers), the first training
    call that has such a label warns, once."""
    from fused_cosloss import hf as fused_hf

    monkeypatch.setattr(fused_hf, "_trainer_counts_shifted_labels", lambda: False)
    model = _tiny_gpt2(hf)
    loss_fn = fused_hf.MixedLossForTrainer(model, probe_grad_norms=False, backend="reference")
    assert loss_fn.counts_exact is False and model.loss_type == "ForCausalLM"
    ids = torch.randint(0, VOCAB, (2, 6))
    logits = model(input_ids=ids).logits
    first_ignored = fused_hf.causal_lm_labels(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn(logits, first_ignored, num_items_in_batch=10)  # exact anyway: nothing to say
    with pytest.warns(RuntimeWarning, match=r"counts labels\[\.\.\., 0\].*causal_lm_labels"):
        loss_fn(logits, ids, num_items_in_batch=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn(logits, ids, num_items_in_batch=12)


# ---- meta tensors ----------------------------------------------------------------------------------

def _structure(out):
    """(field, shape, dtype, requires_grad) of a loss or a MixedLossOutput."""
    fields = out._asdict().items() if hasattr(out, "_asdict") else [("loss", out)]
    return [(name, tuple(t.shape), t.dtype, t.requires_grad) for name, t in fields]


def _meta_twin(*tensors):
    return [None if t is None else torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
            for t in tensors]


def _assert_meta_matches_real(fn, inputs, differentiable, **options):
    real = fn(*inputs, **options)
    meta_inputs = _meta_twin(*inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no backend is consulted: no fallback warning either
        meta = fn(*meta_inputs, **options)
    assert _structure(meta) == _structure(real)
    loss = meta.loss if hasattr(meta, "loss") else meta
    assert loss.is_meta
    if loss.requires_grad:
        loss.sum().backward()
        for index in differentiable:
            grad = meta_inputs[index].grad
            assert grad is not None and grad.is_meta and grad.shape == inputs[index].shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shift, return_parts", [(False, False), (True, False), (True, True), (False, True)])
def test_mixed_loss_on_meta_tensors_has_the_real_shapes_and_dtypes(dtype, reduction, shift, return_parts):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, 11, (2, 5), generator=g)
    embedding = torch.randn(11, 4, generator=g).to(dtype).requires_grad_()
    _assert_meta_matches_real(mixed_loss, (logits, labels, embedding), (0, 2), alpha=0.5, topk=3,
                              reduction=reduction, shift=shift, return_parts=return_parts, backend="reference")


def test_meta_labels_are_not_read_and_the_module_works_on_meta():
    logits = torch.empty(2, 5, 11, device="meta", requires_grad=True)
    labels = torch.empty(2, 5, dtype=torch.long, device="meta")  # no values: nothing to check
    embedding = torch.empty(11, 4, device="meta")
    out = MixedLoss(shift=True)(logits, labels, embedding, return_parts=True)
    assert out.loss.shape == () and out.n_valid.dtype == torch.int64 and out.loss.is_meta


@pytest.mark.parametrize("bias, own_embedding", [(False, False), (True, True)])
@pytest.mark.parametrize("reduction, return_parts", [("mean", False), ("sum", True), ("none", True)])
def test_linear_mixed_loss_on_meta_tensors_has_the_real_shapes_and_dtypes(bias, own_embedding, reduction,
                                                                          return_parts):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 6, generator=g, requires_grad=True)
    weight = torch.randn(11, 6, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    embedding = torch.randn(11, 3, generator=g, requires_grad=True) if own_embedding else None
    head_bias = torch.randn(11, generator=g, requires_grad=True) if bias else None

    def call(hidden, weight, labels, embedding, head_bias, **options):
        return linear_mixed_loss(hidden, weight, labels, embedding=embedding, bias=head_bias, **options)

    differentiable = [0, 1] + ([3] if own_embedding else []) + ([4] if bias else [])
    _assert_meta_matches_real(call, (hidden, weight, labels, embedding, head_bias), differentiable, alpha=0.5,
                              topk=3, reduction=reduction, shift=True, return_parts=return_parts,
                              backend="reference")
    module = LinearMixedLoss(shift=True, chunk_size=2)
    assert module(*_meta_twin(hidden, weight), labels.to("meta")).is_meta


# ---- the README's quick start, API and Trainer sections, as written --------------------------------

def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def _python_blocks(section: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_quick_start_names_the_build_command_and_it_exists():
    import importlib.util

    section = _readme_section("Quick start")
    assert "python -m fused_cosloss.build" in section
    for module in re.findall(r"python -m (fused_cosloss\.\w+)", (ROOT / "README.md").read_text()):
        assert importlib.util.find_spec(module) is not None, module


@pytest.fixture
def reference_only(monkeypatch):
    """backend="auto" without building the native kernel (its own tests cover it): the reference."""
    from fused_cosloss import native

    monkeypatch.setenv("FUSED_COSLOSS_DISABLE_NATIVE", "1")
    native._reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "auto uses the reference because ... disabled"
        yield
    monkeypatch.undo()
    native._reset()


def test_readme_api_examples_run_as_written(hf, reference_only):
    blocks = _python_blocks(_readme_section("API"))
    assert len(blocks) >= 2
    model = _tiny_gpt2(hf, vocab=50257, positions=128)  # the fused-linear example's `model`
    namespace = {"model": model}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"]) and namespace["out"].n_valid > 0


@pytest.mark.parametrize("tied", [True, False], ids=["tied-gpt2", "untied-llama"])
def test_readme_trainer_example_runs_as_written(hf, tmp_path, reference_only, tied):
    (block,) = _python_blocks(_readme_section("Training: the seed experiment"))
    model = _tiny_gpt2(hf) if tied else _tiny_llama(hf)
    assert model.config.tie_word_embeddings is tied
    namespace = {"model": model, "args": _args(hf, tmp_path), "train": _token_dataset(4),
                 "val": _token_dataset(4, seed=1), "tokenizer": _tokenizer(hf)}
    exec(compile(block, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 1
    metrics = trainer.evaluate()
    assert metrics["eval_tokens"] > 0 and math.isfinite(metrics["eval_perplexity"])
