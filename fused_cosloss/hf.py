"""The mixed loss in a stock Hugging Face ``Trainer``: loss, evaluation metrics, logging, alpha warm-up.

Example::

    from transformers import Trainer
    from fused_cosloss.hf import MixedLossForTrainer

    loss_fn = MixedLossForTrainer(model, alpha=0.5, temperature=1.0, topk=256, alpha_warmup=0.1)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      **loss_fn.trainer_kwargs())
    trainer.train()
    trainer.evaluate()   # eval_ce_loss, eval_perplexity, eval_token_acc, eval_cos_sim, eval_runtime, ...

``trainer_kwargs()`` gives four ordinary ``Trainer`` arguments, no subclass:

- ``compute_loss_func``: the loss from the model's logits and its token embedding
  (``model.get_input_embeddings().weight``, which is the LM head's weight when they are
  tied), causal shift included. It is the *sum* over valid positions divided by the
  Trainer's ``num_items_in_batch`` (the valid positions of the whole accumulated batch,
  over all processes), so ``gradient_accumulation_steps = k`` gives the loss and the
  gradients of one batch k times larger. Without ``num_items_in_batch`` it is the mean
  over the batch's valid positions.
- ``compute_metrics`` and ``preprocess_logits_for_metrics``: the evaluation metrics are
  summed inside the loss pass (counts, CE sum, correct argmax, cosine sum) and read out
  at the end; ``preprocess_logits_for_metrics`` replaces each batch's ``[B, T, V]``
  logits by a ``[B]`` placeholder, so the Trainer never collects logits.
- ``callbacks``: :class:`MixedLossCallback`, which ramps alpha during warm-up and adds to
  every training log the CE part (``ce_loss``), the cosine part (``cos_loss``, the mean
  of 1 - cos), the current ``alpha`` and the gradient norm each part contributes
  (``grad_norm_ce``, ``grad_norm_cos``).

Fused-linear mode (``fused_linear=True``): the model's LM head is switched to return its
input, so the model's output "logits" are the last hidden states ``[B, T, H]``, and the
loss applies :func:`fused_cosloss.linear_mixed_loss` with the head's weight (and bias):
no ``[B, T, V]`` tensor is built in training or evaluation. The switch is an instance-level
``forward`` of the head, made at construction and undone by :meth:`MixedLossForTrainer.restore_lm_head`;
parameters, tying, state dicts and DDP wrapping are untouched. Models that transform the logits
after the head get the same transform from the loss, read from their config:
``final_logit_softcapping`` (Gemma 2 and 3) as ``softcap``, ``logit_scale`` (Cohere) and
``1 / logits_scaling`` (Granite) as ``logit_scale``; on the logits path the model has applied them
already and nothing is applied twice (passing ``softcap`` / ``logit_scale`` for such a model is
refused). A transform the loss does not know (``output_multiplier_scale``) is refused in this
mode. The gradient-norm probe, which needs the logits, is off in this mode.

Loss options: ``softcap``, ``logit_scale``, ``label_smoothing`` and ``z_loss`` are those of
:func:`fused_cosloss.mixed_loss`. ``TrainingArguments(label_smoothing_factor=...)``, which the
Trainer would otherwise not apply once a ``compute_loss_func`` is given, is taken over by
:class:`MixedLossCallback` when ``label_smoothing`` is left at 0 (a different value in both
raises). Training uses the smoothed cross-entropy; evaluation reports the model's own (unsmoothed)
cross-entropy, so that ``eval_perplexity`` stays a perplexity. Per-position weights are not
carried: ``compute_loss_func`` receives the outputs and the labels only (use
:func:`fused_cosloss.mixed_loss` with ``weight`` and ``reduction="sum"`` in your own
``compute_loss`` for them; the Trainer's ``num_items_in_batch`` counts tokens, not weights).

Counting note: the Trainer counts ``num_items_in_batch`` over ``labels[..., 1:]`` only for
models it knows shift their labels, and over all of ``labels`` otherwise (GPT-2 by default),
position 0 included, which is never a target after the shift. So that the standard
``labels = input_ids`` (``DataCollatorForLanguageModeling(mlm=False)``) gives the exact mean,
``MixedLossForTrainer(model)`` sets ``model.loss_type = "ForCausalLM"`` where it is None
(GPT-2: its own loss is that one already), which makes the Trainer (transformers 5.17 and
later) count ``labels[..., 1:]``. Where the count stays inexact (an older Trainer) the first
training step that has a valid ``labels[..., 0]`` warns; :func:`causal_lm_labels` (first
label of each row set to -100) makes every count exact.

Untied models (Llama, Mistral, Phi, GPT-NeoX, Granite, ...) need ``embedding="input"`` (the
token embedding) or ``embedding="output"`` (the LM head's weight): without it construction
raises, before the Trainer is set up.
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping

import torch

from .validation import (check_chunk_size, check_flag, check_ignore_index, check_loss_options, check_scalars,
                         real_number)
from .functional import mixed_loss
from .linear import linear_mixed_loss

# config attributes of models that transform the logits after the LM head, and the loss option each becomes
_LOGIT_POSTPROCESSING = {"final_logit_softcapping": "softcap", "logit_scale": "logit_scale",
                         "logits_scaling": "logit_scale", "output_multiplier_scale": None}


def _text_config(model):
    """The config the causal LM's forward reads its logit settings from (a multimodal model's text config)."""
    config = getattr(model, "config", None)
    return config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config


def applied_logit_transforms(model) -> dict:
    """The settings of ``_LOGIT_POSTPROCESSING`` that ``model``'s config sets to a value that changes its
    logits (a scale of 1 does not; any soft-cap does), by config name."""
    config = _text_config(model)
    applied = {}
    for name in _LOGIT_POSTPROCESSING:
        value = getattr(config, name, None)
        if value is not None and (value not in (1, 1.0) or name == "final_logit_softcapping"):
            applied[name] = value
    return applied


def model_logit_options(model) -> dict:
    """The loss options that reproduce what ``model`` does to its logits after the LM head, from its
    (text) config: ``{"softcap": ..., "logit_scale": ...}`` with only the ones it sets; a transform
    the loss has no option for raises ``ValueError``."""
    options = {}
    for name, value in applied_logit_transforms(model).items():
        option = _LOGIT_POSTPROCESSING[name]
        if option is None:
            raise ValueError(f"fused_linear=True: {type(model).__name__} transforms its logits after the LM head "
                             f"(config.{name}={value}), which the fused loss has no option for")
        value = real_number(f"config.{name}", value, "a number")
        options[option] = 1.0 / value if name == "logits_scaling" else value
    return options


def causal_lm_labels(input_ids, ignore_index: int = -100):
    """Labels for causal LM training: a copy of ``input_ids`` with the first position of
    each row set to ``ignore_index`` (lists of lists or a tensor)."""
    if isinstance(input_ids, torch.Tensor):
        labels = input_ids.clone()
        labels[..., 0] = ignore_index
        return labels
    return [[ignore_index] + list(row[1:]) for row in input_ids]


def pad_for_distributed_eval(dataset, batch_size: int, world_size: int, ignore_index: int = -100):
    """Pad an evaluation ``datasets.Dataset`` of equal-length blocks to a multiple of
    ``batch_size * world_size`` with blocks whose labels are all ``ignore_index``.

    Under data parallelism accelerate evens out the last evaluation batches by repeating
    samples from the start; ``gather_for_metrics`` drops them from gathered predictions but
    the sums of the loss pass would count them. Padding blocks count zero positions
    instead, so the metrics stay exact. A no-op for one process.
    """
    multiple = batch_size * world_size
    missing = -len(dataset) % multiple
    if world_size <= 1 or missing == 0:
        return dataset
    first = dataset[0]
    filler = {}
    for column in dataset.column_names:
        value = first[column]
        if column == "labels":
            filler[column] = [[ignore_index] * len(value)] * missing
        elif column == "attention_mask":
            filler[column] = [[1] * len(value)] * missing
        else:
            filler[column] = [value] * missing
    import datasets

    pad = datasets.Dataset.from_dict(filler, features=dataset.features)
    return datasets.concatenate_datasets([dataset, pad])


def _logits_of(outputs):
    if isinstance(outputs, Mapping):
        return outputs["logits"]
    if isinstance(outputs, torch.Tensor):
        return outputs
    return outputs[0]  # tuple outputs; the Trainer removed the labels, so there is no loss first


def _identity(hidden_states):
    return hidden_states


def _logit_transform_settings(model) -> list[tuple[object, str, object]]:
    """(object, attribute, neutral value) of every setting with which ``model``'s forward transforms
    the head's output: the config's soft-cap and Granite's scaling, Cohere's ``logit_scale`` (kept
    on the model itself)."""
    text = _text_config(model)
    settings = []
    if getattr(text, "final_logit_softcapping", None) is not None:
        settings.append((text, "final_logit_softcapping", None))
    if getattr(text, "logits_scaling", None) not in (None, 1, 1.0):
        settings.append((text, "logits_scaling", 1.0))
    for owner in (model, text):
        if isinstance(getattr(owner, "logit_scale", None), (int, float)) and owner.logit_scale != 1:
            settings.append((owner, "logit_scale", 1.0))
    return settings


def _suspend_logit_transform(model) -> list:
    """Forward hooks that make the model's own post-head transform the identity while its forward
    runs (the fused-linear head returns hidden states, which it must not cap or scale: the loss
    applies the transform to the logits it computes) and put the settings back after it, also when
    it raises. Outside a forward the config is untouched, so a checkpoint saves the model's own."""
    settings = _logit_transform_settings(model)
    if not settings:
        return []
    saved = []

    def suspend(module, args, kwargs):
        saved.append([(owner, name, getattr(owner, name)) for owner, name, _ in settings])
        for owner, name, neutral in settings:
            setattr(owner, name, neutral)

    def restore(module, args, kwargs, output):
        for owner, name, value in saved.pop():
            setattr(owner, name, value)

    return [model.register_forward_pre_hook(suspend, with_kwargs=True),
            model.register_forward_hook(restore, with_kwargs=True, always_call=True)]


def _all_reduce_sum(values: torch.Tensor, enabled: bool | None) -> torch.Tensor:
    """Sum over processes: when ``enabled``, or (None) whenever a process group is up."""
    if enabled is False or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    if torch.distributed.get_world_size() > 1:
        values = values.clone()
        torch.distributed.all_reduce(values)
    return values


def _count_shifted_labels(model) -> bool:
    """Have transformers' ``Trainer`` count ``num_items_in_batch`` over ``labels[..., 1:]``, the
    positions the shifted loss averages over; True when it will.

    The Trainer (transformers 5.17 and later) counts ``labels[..., 1:]`` for models whose
    ``loss_type`` is a causal-LM loss, and all of ``labels`` otherwise, position 0 included
    (never a target after the shift: the mean would be scaled by about (T - 1) / T). GPT-2's
    ``GPT2LMHeadModel`` matches no loss by its class name (``loss_type`` None, though its own
    loss is the causal-LM one all the same), so it gets ``loss_type = "ForCausalLM"``, which
    changes nothing but that count.
    """
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:
        return False
    if callable(getattr(model, "get_base_model", None)):  # a PEFT model: the Trainer looks at the base model
        model = model.get_base_model()
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) or not hasattr(model, "loss_type"):
        return False
    if model.loss_type is None:
        model.loss_type = "ForCausalLM"
    return LOSS_MAPPING.get(model.loss_type) is ForCausalLMLoss and _trainer_counts_shifted_labels()


def _trainer_counts_shifted_labels() -> bool:
    """Whether this transformers' Trainer has the causal-LM counting rule (``_loss_shifts_labels``)."""
    try:
        from transformers import Trainer

        return "_loss_shifts_labels" in inspect.getsource(Trainer._get_num_items_in_batch)
    except (ImportError, AttributeError, OSError, TypeError):
        return False


class MixedLossForTrainer:
    """A ``compute_loss_func`` for ``transformers.Trainer`` computing :func:`fused_cosloss.mixed_loss`.

    Args:
        model: the causal LM (its token embedding is read at every call, so resizing or
            wrapping the model later is fine). May be None when ``embedding`` is given.
        embedding: the ``[V, H]`` embedding to use instead of the model's, as a tensor or a
            zero-argument callable returning one. Needed when the model's input embedding is
            not tied to its LM head (``embedding="input"`` / ``"output"`` pick the model's
            input embedding or LM head weight explicitly).
        alpha: the weight of the cosine term (the target value when warming up).
        temperature, topk, backend, ignore_index: as in :func:`fused_cosloss.mixed_loss`.
        alpha_warmup: fraction of the training steps over which :class:`MixedLossCallback`
            ramps alpha linearly from 0.
        embedding_grad: let the cosine term send gradients into the embedding directly (through
            the expected embedding and the gold row), as the seed did. False detaches the embedding
            inside the loss: the cosine then acts on the logits only (E still learns through them
            when it is the LM head).
        probe_grad_norms: measure ``grad_norm_ce`` / ``grad_norm_cos`` at logging steps
            (a second loss-only forward and backward on detached logits, nothing through the model).
        fused_linear: compute the loss from the last hidden states and the LM head weight with
            :func:`fused_cosloss.linear_mixed_loss`, never building the logits (see the module
            docstring); needs ``model``.
        chunk_size: positions per chunk of the fused-linear mode (None: its default).
        logit_scale, softcap, label_smoothing, z_loss: the loss options of
            :func:`fused_cosloss.mixed_loss` (the model's own scale and cap are read from its config
            in the fused-linear mode: see the module docstring).
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        *,
        embedding: torch.Tensor | Callable[[], torch.Tensor] | str | None = None,
        alpha: float = 0.5,
        temperature: float = 1.0,
        topk: int | None = 256,
        backend: str = "auto",
        ignore_index: int = -100,
        alpha_warmup: float = 0.0,
        embedding_grad: bool = True,
        probe_grad_norms: bool = True,
        fused_linear: bool = False,
        chunk_size: int | None = None,
        logit_scale: float | None = None,
        softcap: float | None = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
    ):
        if model is None and (embedding is None or isinstance(embedding, str)):
            raise ValueError("MixedLossForTrainer: pass the model, or the embedding tensor (or a callable returning it)")
        for name, flag in (("embedding_grad", embedding_grad), ("probe_grad_norms", probe_grad_norms),
                           ("fused_linear", fused_linear)):
            check_flag(name, flag)
        if fused_linear and model is None:
            raise ValueError("MixedLossForTrainer: fused_linear=True needs the model (its LM head is the linear layer)")
        alpha_warmup = real_number("alpha_warmup", alpha_warmup, "a fraction of the training steps in [0, 1]")
        if not 0.0 <= alpha_warmup <= 1.0:
            raise ValueError(f"alpha_warmup: expected a fraction of the training steps in [0, 1], got {alpha_warmup}")
        # fail here, not at the first step
        alpha, temperature, topk = check_scalars(alpha, temperature, topk, "sum", backend)
        ignore_index = check_ignore_index(ignore_index)
        chunk_size = check_chunk_size(chunk_size)
        logit_scale, softcap, label_smoothing, z_loss = check_loss_options(logit_scale, softcap, label_smoothing,
                                                                           z_loss)
        if isinstance(embedding, str) and embedding not in ("tied", "input", "output"):
            raise ValueError(f"embedding: expected a tensor, a callable, 'tied', 'input' or 'output', got {embedding!r}")
        self.model = model
        self.embedding = embedding
        if model is not None and (embedding is None or isinstance(embedding, str)):
            self._model_embedding()  # an untied model without embedding="input"/"output" fails here
        # whether the Trainer's num_items_in_batch counts what the loss averages over (None: no model, unknown)
        self.counts_exact = _count_shifted_labels(model) if model is not None else None
        self.alpha = alpha
        self.current_alpha = 0.0 if alpha_warmup > 0 else alpha
        self.temperature = temperature
        self.topk = topk
        self.backend = backend
        self.ignore_index = ignore_index
        self.alpha_warmup = alpha_warmup
        self.embedding_grad = embedding_grad
        self.fused_linear = fused_linear
        self.chunk_size = chunk_size
        self.probe_grad_norms = probe_grad_norms and not fused_linear
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.logit_options = {k: v for k, v in (("logit_scale", logit_scale), ("softcap", softcap)) if v is not None}
        # what the model does to its logits after the head: the fused-linear mode must do it too
        self.model_logit_options = model_logit_options(model) if fused_linear else {}
        if model is not None:
            self._refuse_twice(self.logit_options, model)
        self.probe_next = False
        self._hooks = []
        # Sum the logged and evaluation counts over processes: None = whenever torch.distributed is
        # initialised; MixedLossCallback sets it from the Trainer's world size (a process group can
        # exist while the Trainer runs each process on its own).
        self.sync_processes: bool | None = None
        self.reset_train_stats()
        self.reset_eval_stats()
        if fused_linear:
            self._head_passes_hidden_states()

    # ---- the fused-linear mode -------------------------------------------------------------

    def _lm_head(self) -> torch.nn.Module:
        head = self.model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise ValueError(f"fused_linear=True: expected the model's output embedding to be an nn.Linear, got "
                             f"{type(head).__name__}")
        return head

    @staticmethod
    def _refuse_twice(given: dict, model) -> None:
        """A scale or cap the model applies itself must not be given again."""
        for name, value in applied_logit_transforms(model).items():
            option = _LOGIT_POSTPROCESSING[name]
            if option in given:
                raise ValueError(
                    f"{option}: {type(model).__name__} already applies config.{name}={value} to its logits (and the "
                    f"fused-linear mode applies it from the config), so passing {option} would apply it twice; "
                    f"leave {option}=None")

    def _head_passes_hidden_states(self) -> None:
        head = self._lm_head()
        head.forward = _identity
        self._hooks = _suspend_logit_transform(self.model)

    def restore_lm_head(self) -> None:
        """Make the LM head compute logits again (undo ``fused_linear=True``)."""
        if self.fused_linear:
            self._lm_head().__dict__.pop("forward", None)
            for hook in self._hooks:
                hook.remove()
            self._hooks = []

    def _loss(self, inputs, labels, embedding, *, evaluating=False, **options):
        """mixed_loss on logits, or linear_mixed_loss on hidden states in the fused-linear mode (with
        the model's own scale and cap); ``evaluating``: without label smoothing."""
        options.update(self.logit_options, z_loss=self.z_loss,
                       label_smoothing=0.0 if evaluating else self.label_smoothing)
        if not self.fused_linear:
            # the Trainer divides the summed loss by num_items_in_batch: a gradient computed in the
            # forward would take one more pass over the logits to be scaled by it in the backward
            return mixed_loss(inputs, labels, embedding, grad_in_forward=False, **options)
        head = self._lm_head()
        tied = embedding is head.weight
        return linear_mixed_loss(inputs, head.weight, labels, embedding=None if tied else embedding, bias=head.bias,
                                 chunk_size=self.chunk_size, **self.model_logit_options, **options)

    # ---- the loss --------------------------------------------------------------------------

    def get_embedding(self) -> torch.Tensor:
        """The ``[V, H]`` embedding the cosine is measured in."""
        source = self.embedding
        if isinstance(source, torch.Tensor):
            return source
        if callable(source):
            return source()
        return self._model_embedding()

    def _model_embedding(self) -> torch.Tensor:
        """The model's embedding that ``embedding`` (None, 'tied', 'input' or 'output') names."""
        model, source = self.model, self.embedding
        try:
            inputs = model.get_input_embeddings().weight
            output_layer = model.get_output_embeddings()
        except (AttributeError, NotImplementedError) as error:
            raise ValueError(f"MixedLossForTrainer: cannot read the token embedding of {type(model).__name__} "
                             f"({error}); pass embedding= the [V, H] tensor or a callable returning it") from error
        if source == "input":
            return inputs
        if source == "output":
            if output_layer is None:
                raise ValueError("embedding='output': the model has no output embedding (LM head)")
            return output_layer.weight
        if output_layer is not None and output_layer.weight is not inputs:
            tie = getattr(getattr(model, "config", None), "tie_word_embeddings", None)
            config = f" (config.tie_word_embeddings={tie})" if tie is not None else ""
            raise ValueError(
                f"{type(model).__name__}: the input embedding is not tied to the LM head{config}, so the cosine's "
                "embedding must be named: pass embedding='input' (the token embedding, "
                "model.get_input_embeddings().weight) or embedding='output' (the LM head's weight), or a tensor")
        return inputs

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """The loss of one micro-batch: summed over its valid positions, divided by ``num_items_in_batch``."""
        if labels is None:
            raise ValueError("MixedLossForTrainer: the batch has no 'labels' (the causal LM targets)")
        logits = _logits_of(outputs)
        embedding = self.get_embedding()
        if not self.embedding_grad:
            embedding = embedding.detach()
        training = torch.is_grad_enabled() and logits.requires_grad
        alpha = self.current_alpha
        options = dict(temperature=self.temperature, topk=self.topk, ignore_index=self.ignore_index,
                       shift=True, backend=self.backend, reduction="sum")
        if training and alpha == 0.0:
            # Plain CE: skip the cosine term entirely (its parts are measured by the probe).
            total = self._loss(logits, labels, embedding, alpha=0.0, **options)
            n_valid = (labels[..., 1:] != self.ignore_index).sum()
            ce_sum, cos_sum = total.detach(), None
        else:
            parts = self._loss(logits, labels, embedding, alpha=alpha, return_parts=True, evaluating=not training,
                               **options)
            total, n_valid = parts.loss, parts.n_valid
            ce_sum, cos_sum = parts.ce.detach(), parts.cos.detach()
            if not training:
                self._add_eval(parts)
        if training:
            self._add_train(ce_sum, cos_sum, n_valid)
            if self.probe_next and self.probe_grad_norms:
                self.probe_next = False
                self._probe(logits, labels, embedding, alpha, options, cos_measured=cos_sum is not None)
        if training and num_items_in_batch is not None and self.counts_exact is False:
            self._warn_if_position_zero_counted(labels)
        if num_items_in_batch is None:
            denominator = n_valid.clamp_min(1)
        elif isinstance(num_items_in_batch, torch.Tensor):
            denominator = num_items_in_batch.to(total.device).clamp_min(1)
        else:
            denominator = max(int(num_items_in_batch), 1)
        return total / denominator

    def _warn_if_position_zero_counted(self, labels: torch.Tensor) -> None:
        """Say once that the Trainer's count includes labels[..., 0], which the shifted loss never uses."""
        if bool((labels[..., 0] != self.ignore_index).any()):
            self.counts_exact = None  # said once
            warnings.warn(
                f"MixedLossForTrainer: the Trainer counts labels[..., 0] in num_items_in_batch for "
                f"{type(self.model).__name__} (transformers before 5.17, or a model whose loss_type is not a causal-LM "
                "one), but after the causal shift they are never a target, so the loss and its gradients are scaled "
                "by about (T - 1) / T; set labels[..., 0] = -100 (fused_cosloss.hf.causal_lm_labels) to make it exact",
                RuntimeWarning, stacklevel=3)

    # ---- training statistics ---------------------------------------------------------------

    def reset_train_stats(self) -> None:
        # float64 sums since the last log: [ce_sum, n_ce, cos_sum, n_cos, probe_ce^2, probe_cos^2, n_probe]
        self._train = None

    def _accumulate_train(self, row: torch.Tensor) -> None:
        self._train = row if self._train is None else self._train + row.to(self._train.device)

    def _add_train(self, ce_sum, cos_sum, n_valid) -> None:
        row = torch.zeros(7, dtype=torch.float64, device=ce_sum.device)
        row[0], row[1] = ce_sum, n_valid
        if cos_sum is not None:
            row[2], row[3] = cos_sum, n_valid
        self._accumulate_train(row)

    def _probe(self, logits, labels, embedding, alpha, options, cos_measured: bool) -> None:
        """Norms of the gradients the CE and the cosine parts (weighted by 1 - alpha and alpha) send
        into the logits and, for the cosine, directly into the embedding; per-token-mean scale."""
        with torch.enable_grad():
            z = logits.detach().requires_grad_(True)
            table = embedding.detach().requires_grad_(embedding.requires_grad)
            parts = mixed_loss(z, labels, table, alpha=alpha, return_parts=True, label_smoothing=self.label_smoothing,
                               **self.logit_options, **options)
            n = parts.n_valid.clamp_min(1)
            (grad_ce,) = torch.autograd.grad(parts.ce / n, (z,), retain_graph=True)
            wrt = (z, table) if table.requires_grad else (z,)
            grad_cos = torch.autograd.grad(parts.cos / n, wrt, allow_unused=True)
        squares_cos = sum(torch.linalg.vector_norm(g.double()) ** 2 for g in grad_cos if g is not None)
        row = torch.zeros(7, dtype=torch.float64, device=parts.ce.device)
        row[4] = (1.0 - alpha) ** 2 * torch.linalg.vector_norm(grad_ce.double()) ** 2
        row[5] = alpha ** 2 * squares_cos
        row[6] = 1.0
        if not cos_measured:  # a CE-only step: its cosine part comes from the probe
            row[2], row[3] = parts.cos.detach(), parts.n_valid
        self._accumulate_train(row)

    def pop_train_stats(self) -> dict[str, float]:
        """The training parts since the last call (token-weighted means over all processes), then reset."""
        stats = self._train
        self.reset_train_stats()
        if stats is None:
            stats = torch.zeros(7, dtype=torch.float64, device=self._device())
        ce, n_ce, cos, n_cos, probe_ce, probe_cos, n_probe = _all_reduce_sum(stats, self.sync_processes).tolist()
        logs = {"alpha": self.current_alpha}
        if n_ce > 0:
            logs["ce_loss"] = ce / n_ce
        if n_cos > 0:
            logs["cos_loss"] = cos / n_cos
        if n_probe > 0:
            logs["grad_norm_ce"] = math.sqrt(probe_ce / n_probe)
            logs["grad_norm_cos"] = math.sqrt(probe_cos / n_probe)
        return logs

    def _device(self) -> torch.device:
        try:
            return self.get_embedding().device
        except Exception:  # no model yet: counts live on the CPU
            return torch.device("cpu")

    # ---- evaluation metrics ----------------------------------------------------------------

    def reset_eval_stats(self) -> None:
        self._eval = None  # [n_valid, ce_sum, cos_dist_sum, loss_sum, n_correct, cos_sim_sum] as float64

    def _add_eval(self, parts) -> None:
        row = torch.stack([
            parts.n_valid.double(), parts.ce.detach().double(), parts.cos.detach().double(),
            parts.loss.detach().double(), parts.n_correct.double(), parts.cos_sim_sum.double(),
        ])
        self._eval = row if self._eval is None else self._eval + row.to(self._eval.device)

    def eval_metrics(self, reset: bool = True) -> dict[str, float]:
        """The metrics of the evaluation passes since the last reset, summed over all processes.

        ``ce_loss`` (mean CE per token), ``perplexity`` = exp(ce_loss), ``token_acc``
        (argmax == next token), ``cos_sim`` (mean cosine between the expected and the gold
        embedding), ``cos_loss`` (1 - cos_sim), ``mixed_loss`` (the loss per token) and
        ``tokens`` (positions counted). The Trainer prefixes them with ``eval_``.
        """
        stats = self._eval
        if reset:
            self.reset_eval_stats()
        if stats is None:
            stats = torch.zeros(6, dtype=torch.float64, device=self._device())
        values = _all_reduce_sum(stats, self.sync_processes)
        n, ce, cos_dist, loss, correct, cos_sim = values.tolist()
        if n == 0:
            return {"tokens": 0}
        ce_loss = ce / n
        return {
            "ce_loss": ce_loss,
            "perplexity": math.exp(ce_loss) if ce_loss < 700 else float("inf"),
            "token_acc": correct / n,
            "cos_sim": cos_sim / n,
            "cos_loss": cos_dist / n,
            "mixed_loss": loss / n,
            "tokens": int(n),
        }

    def compute_metrics(self, eval_prediction=None, compute_result: bool = True) -> dict[str, float]:
        """``Trainer(compute_metrics=...)``: the metrics summed in the loss pass (the predictions are ignored)."""
        if not compute_result:  # batch_eval_metrics=True: only the last batch reports
            return {}
        return self.eval_metrics(reset=True)

    @staticmethod
    def preprocess_logits_for_metrics(logits, labels) -> torch.Tensor:
        """``Trainer(preprocess_logits_for_metrics=...)``: a ``[B]`` placeholder instead of the logits."""
        first = logits
        while isinstance(first, (tuple, list)):
            first = first[0]
        return torch.zeros(first.shape[0], dtype=torch.int8, device=first.device)

    def trainer_kwargs(self, callbacks=()) -> dict:
        """Keyword arguments for ``transformers.Trainer``: the loss, the metrics hooks and the callback."""
        return {
            "compute_loss_func": self,
            "compute_metrics": self.compute_metrics,
            "preprocess_logits_for_metrics": self.preprocess_logits_for_metrics,
            "callbacks": [MixedLossCallback(self), *callbacks],
        }


def _callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError:  # usable (and testable) without transformers
        return object
    return TrainerCallback


class MixedLossCallback(_callback_base()):
    """Alpha warm-up, gradient-norm probes and the loss parts in the training logs.

    Alpha is ``loss_fn.alpha * min(1, step / (alpha_warmup * max_steps))`` during the step
    ``step`` (0-based). At the first step and before every step whose end is logged, the next
    micro-batch measures the gradient norm each part contributes.
    """

    def __init__(self, loss_fn: MixedLossForTrainer):
        self.loss_fn = loss_fn

    def alpha_at(self, step: int, max_steps: int) -> float:
        fn = self.loss_fn
        warm = math.ceil(fn.alpha_warmup * max_steps) if fn.alpha_warmup > 0 else 0
        if warm <= 0:
            return fn.alpha
        return fn.alpha * min(1.0, step / warm)

    def on_init_end(self, args, state, control, **kwargs):
        self.loss_fn.sync_processes = args.world_size > 1
        self.take_label_smoothing(getattr(args, "label_smoothing_factor", 0.0) or 0.0)

    def take_label_smoothing(self, factor: float) -> None:
        """``TrainingArguments.label_smoothing_factor``, which the Trainer does not apply once a
        ``compute_loss_func`` is given: the loss takes it over (the same value in both is fine)."""
        fn = self.loss_fn
        if factor == 0.0 or factor == fn.label_smoothing:
            return
        if fn.label_smoothing != 0.0:
            raise ValueError(f"label_smoothing: MixedLossForTrainer has {fn.label_smoothing} and "
                             f"TrainingArguments.label_smoothing_factor is {factor}; set one of them")
        fn.label_smoothing = check_loss_options(None, None, factor, 0.0)[2]

    def on_train_begin(self, args, state, control, **kwargs):
        self.loss_fn.reset_train_stats()
        self.loss_fn.current_alpha = self.alpha_at(state.global_step, max(state.max_steps, 1))

    def on_step_begin(self, args, state, control, **kwargs):
        fn = self.loss_fn
        fn.current_alpha = self.alpha_at(state.global_step, max(state.max_steps, 1))
        every = getattr(state, "logging_steps", None) or getattr(args, "logging_steps", 0) or 0
        every = max(int(every), 1)
        fn.probe_next = state.global_step == 0 or (state.global_step + 1) % every == 0

    def on_train_end(self, args, state, control, **kwargs):
        self.loss_fn.current_alpha = self.loss_fn.alpha
        self.loss_fn.probe_next = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or "eval_loss" in logs:
            return
        extra = self.loss_fn.pop_train_stats()
        logs.update(extra)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("loss") == logs.get("loss") and history[-1].get("step") == state.global_step:
            history[-1].update(extra)
