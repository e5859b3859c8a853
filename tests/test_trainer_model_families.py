"""The Trainer integration on models that transform their logits after the LM head (issue: loss
options): Gemma 2 and 3 (final-logit soft-capping), Cohere (logit_scale) and Granite
(1 / logits_scaling), tiny and randomly initialised from their configs. In the fused-linear mode the
loss applies the model's transform itself; it must take the same training step and report the same
evaluation metrics as the logits path, where the model applied it. Also: TrainingArguments'
label_smoothing_factor is taken over, and a scale or cap the model applies is never applied twice.
"""
from __future__ import annotations

import pytest
import torch

from fused_cosloss import mixed_loss
from fused_cosloss.hf import MixedLossCallback, MixedLossForTrainer, causal_lm_labels, model_logit_options

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)


def _family(hf, name):
    """(model, the options the loss must apply in the fused-linear mode) for a tiny model of ``name``."""
    torch.manual_seed(0)
    if name == "gemma2":
        config = hf.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=3.0, attn_logit_softcapping=None)
        return hf.Gemma2ForCausalLM(config), {"softcap": 3.0}
    if name == "gemma3":
        config = hf.Gemma3TextConfig(**SMALL, head_dim=8, final_logit_softcapping=2.5, sliding_window=8)
        return hf.Gemma3ForCausalLM(config), {"softcap": 2.5}
    if name == "cohere":
        config = hf.CohereConfig(**SMALL, logit_scale=0.25)
        return hf.CohereForCausalLM(config), {"logit_scale": 0.25}
    config = hf.GraniteConfig(**SMALL, logits_scaling=4.0)
    return hf.GraniteForCausalLM(config), {"logit_scale": 0.25}


def _data(n=4, t=10, seed=0):
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, t), generator=g)
    labels = causal_lm_labels(ids)
    labels[: n // 2, t // 2:] = -100
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "labels": labels.tolist()})


def _args(hf, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to="none", save_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0, dataloader_pin_memory=False, seed=0, max_grad_norm=0.0, logging_steps=1,
                per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=1)
    base.update(kw)
    return hf.TrainingArguments(**base)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "cohere", "granite"])
def test_fused_linear_matches_the_logits_path(hf, tmp_path, family):
    data = _data()
    results = []
    for fused in (False, True):
        model, expected_options = _family(hf, family)
        model.config.use_cache = False
        if fused:
            assert model_logit_options(model) == pytest.approx(expected_options)
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        loss_fn = MixedLossForTrainer(model, alpha=0.5, topk=8, backend="reference", fused_linear=fused,
                                      chunk_size=7, z_loss=1e-3)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        trainer = hf.Trainer(model=model, args=_args(hf, tmp_path), train_dataset=data, eval_dataset=data,
                             data_collator=hf.default_data_collator, optimizers=(optimizer, scheduler),
                             **loss_fn.trainer_kwargs())
        trainer.train()
        metrics = trainer.evaluate()
        loss_fn.restore_lm_head()
        results.append(({k: p.detach() - before[k] for k, p in model.named_parameters()}, metrics))
    (delta, metrics), (delta_fused, metrics_fused) = results
    assert any(float(d.abs().max()) > 0 for d in delta.values())
    for name in delta:
        torch.testing.assert_close(delta_fused[name], delta[name], rtol=1e-4, atol=1e-6, msg=name)
    for key in ("eval_ce_loss", "eval_cos_sim", "eval_token_acc", "eval_tokens", "eval_mixed_loss"):
        assert metrics_fused[key] == pytest.approx(metrics[key], rel=1e-5), key


def test_the_logits_path_applies_nothing_twice(hf):
    """The model's logits carry its cap: the loss on them equals mixed_loss on those logits without a
    cap, and a softcap passed for that model is refused."""
    model, _ = _family(hf, "gemma2")
    ids = torch.randint(3, VOCAB, (2, 6))
    logits = model(input_ids=ids).logits
    assert float(logits.detach().abs().max()) <= 3.0
    loss_fn = MixedLossForTrainer(model, alpha=0.5, topk=8, backend="reference")
    labels = causal_lm_labels(ids)
    expected = mixed_loss(logits, labels, model.get_input_embeddings().weight, alpha=0.5, topk=8, shift=True,
                          backend="reference")
    torch.testing.assert_close(loss_fn({"logits": logits}, labels), expected)
    for fused in (False, True):
        with pytest.raises(ValueError, match="softcap: Gemma2ForCausalLM already applies"):
            MixedLossForTrainer(model, softcap=3.0, fused_linear=fused)
    model, _ = _family(hf, "granite")
    with pytest.raises(ValueError, match="logit_scale: GraniteForCausalLM already applies config.logits_scaling"):
        MixedLossForTrainer(model, logit_scale=0.25)


def test_label_smoothing_factor_is_taken_over(hf, tmp_path):
    model, _ = _family(hf, "cohere")
    loss_fn = MixedLossForTrainer(model, alpha=0.0, backend="reference")
    callback = MixedLossCallback(loss_fn)
    callback.on_init_end(_args(hf, tmp_path, label_smoothing_factor=0.1), None, None)
    assert loss_fn.label_smoothing == 0.1
    ids = torch.randint(3, VOCAB, (2, 6))
    labels = causal_lm_labels(ids)
    logits = model(input_ids=ids).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                                 label_smoothing=0.1)
    torch.testing.assert_close(loss_fn({"logits": logits}, labels), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation reports the unsmoothed cross-entropy
        loss_fn({"logits": logits}, labels)
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    assert loss_fn.eval_metrics()["ce_loss"] == pytest.approx(float(plain), rel=1e-5)
    other = MixedLossForTrainer(model, alpha=0.0, label_smoothing=0.2, backend="reference")
    with pytest.raises(ValueError, match="label_smoothing: MixedLossForTrainer has 0.2"):
        MixedLossCallback(other).on_init_end(_args(hf, tmp_path, label_smoothing_factor=0.1), None, None)
