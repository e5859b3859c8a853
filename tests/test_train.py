"""The training integration: fused_cosloss.hf (Trainer loss, metrics, logging), the corpus and the CLI.

The loss-function tests need only torch; the Trainer and CLI tests skip cleanly when
transformers / datasets / tokenizers are not installed (pip install ".[train]").
They use the reference backend so that no kernel build is timed here.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from fused_cosloss import corpus
from fused_cosloss.hf import MixedLossCallback, MixedLossForTrainer, causal_lm_labels
from fused_cosloss.options import LossOptions
from fused_cosloss.reference import reference_rows


def _batch(generator, b=4, t=9, v=40, h=6, ignore=0.2):
    logits = torch.randn(b, t, v, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t), generator=generator)
    labels[torch.rand(b, t, generator=generator) < ignore] = -100
    labels = causal_lm_labels(labels)
    embedding = torch.randn(v, h, generator=generator, dtype=torch.float64)
    return logits, labels, embedding


# ---- the loss function (torch only) ---------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_gradient_accumulation_equals_one_batch(alpha):
    """Two micro-batches with the accumulated num_items_in_batch give the loss and gradients of one batch."""
    g = torch.Generator().manual_seed(1)
    logits, labels, embedding = _batch(g)
    labels[:2, 3:] = -100  # the micro-batches have different numbers of valid positions
    total = int((labels[:, 1:] != -100).sum())

    def grads(chunks):
        z = logits.clone().requires_grad_(True)
        e = embedding.clone().requires_grad_(True)
        fn = MixedLossForTrainer(embedding=e, alpha=alpha, temperature=0.8, topk=7, backend="reference")
        loss = 0
        for rows in chunks:
            piece = fn({"logits": z[rows]}, labels[rows], num_items_in_batch=torch.tensor(total))
            piece.backward()
            loss = loss + piece.detach()
        return loss, z.grad, e.grad

    whole = grads([slice(0, 4)])
    accumulated = grads([slice(0, 2), slice(2, 4)])
    for a, b in zip(whole, accumulated):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # and it is the mean over valid positions of the mixed loss
    expected = MixedLossForTrainer(embedding=embedding, alpha=alpha, temperature=0.8, topk=7, backend="reference")(
        (logits,), labels)
    torch.testing.assert_close(whole[0], expected, rtol=1e-12, atol=0)


def test_without_num_items_is_batch_mean_and_int_count():
    g = torch.Generator().manual_seed(2)
    logits, labels, embedding = _batch(g)
    fn = MixedLossForTrainer(embedding=embedding, alpha=0.3, topk=5, backend="reference")
    n = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(fn({"logits": logits}, labels), fn({"logits": logits}, labels, num_items_in_batch=n))


def test_eval_metrics_are_sums_of_the_loss_pass():
    g = torch.Generator().manual_seed(3)
    fn = MixedLossForTrainer(embedding=torch.randn(40, 6, generator=g), alpha=0.5, topk=6, backend="reference")
    batches = [_batch(g)[:2] for _ in range(3)]
    with torch.no_grad():
        for logits, labels in batches:
            fn({"logits": logits.float()}, labels)
    metrics = fn.compute_metrics(None)
    z = torch.cat([lg[:, :-1].reshape(-1, 40) for lg, _ in batches]).float()
    y = torch.cat([lb[:, 1:].reshape(-1) for _, lb in batches])
    ce, cos, correct, _ = reference_rows(z, y, fn.embedding, LossOptions(1.0, 6, -100, True))
    valid = y != -100
    n = int(valid.sum())
    assert metrics["tokens"] == n
    assert metrics["ce_loss"] == pytest.approx(float(ce[valid].double().mean()), rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["ce_loss"]), rel=1e-12)
    assert metrics["token_acc"] == pytest.approx(float(correct[valid].double().mean()), rel=1e-12)
    assert metrics["cos_sim"] == pytest.approx(float(cos[valid].double().mean()), rel=1e-6)
    assert fn.compute_metrics(None) == {"tokens": 0}  # read once, then reset


def test_preprocess_logits_keeps_no_logits():
    out = MixedLossForTrainer.preprocess_logits_for_metrics((torch.zeros(3, 5, 7), torch.zeros(1)), None)
    assert out.shape == (3,) and out.element_size() == 1


def test_alpha_warmup_schedule():
    fn = MixedLossForTrainer(embedding=torch.ones(3, 2), alpha=0.6, alpha_warmup=0.25)
    callback = MixedLossCallback(fn)
    assert fn.current_alpha == 0.0
    assert [callback.alpha_at(step, 100) for step in (0, 5, 25, 99)] == pytest.approx([0.0, 0.12, 0.6, 0.6])


def test_training_logs_parts_and_probe():
    g = torch.Generator().manual_seed(4)
    logits, labels, embedding = _batch(g)
    fn = MixedLossForTrainer(embedding=embedding.requires_grad_(True), alpha=0.5, topk=6, backend="reference")
    fn.probe_next = True
    z = logits.requires_grad_(True)
    fn({"logits": z}, labels).backward()
    logs = fn.pop_train_stats()
    assert set(logs) == {"alpha", "ce_loss", "cos_loss", "grad_norm_ce", "grad_norm_cos"}
    assert logs["grad_norm_ce"] > 0 and logs["grad_norm_cos"] > 0
    assert fn.pop_train_stats() == {"alpha": 0.5}


def test_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        MixedLossForTrainer(embedding=torch.ones(2, 2), alpha=1.5)
    with pytest.raises(ValueError, match="backend"):
        MixedLossForTrainer(embedding=torch.ones(2, 2), backend="cuda")
    with pytest.raises(ValueError, match="pass the model"):
        MixedLossForTrainer()


# ---- the corpus ----------------------------------------------------------------------------------

def test_corpus_is_deterministic_and_grouped():
    a, b = corpus.corpus_splits(200, 20, 20, seed=0), corpus.corpus_splits(200, 20, 20, seed=0)
    assert a == b and a["train"] != a["validation"]
    words = set(" ".join(a["train"]).split())
    assert words <= set(corpus.vocabulary())
    members = {w for group in corpus.GROUPS.values() for w in group}
    assert len(members) == sum(len(group) for group in corpus.GROUPS.values())  # each word in one group


def test_group_similarity():
    groups = {"a": [0, 1], "b": [2, 3]}
    table = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    result = corpus.group_similarity(table, groups)
    assert result["within"] > 0.99 and result["between"] < 0.2 and result["separation"] > 0.8


# ---- with transformers ---------------------------------------------------------------------------

def _tiny_model(hf, vocab=64, tied=True, seed=0):
    torch.manual_seed(seed)
    config = hf.GPT2Config(vocab_size=vocab, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied)
    return hf.GPT2LMHeadModel(config)


def _blocks(n, t=12, vocab=64, seed=0):
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    labels = causal_lm_labels(ids)
    labels[: n // 2, t // 2:] = -100  # uneven valid counts between samples
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "labels": labels.tolist()})


def _args(hf, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to="none", save_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0, dataloader_pin_memory=False, seed=0, max_grad_norm=0.0, logging_steps=1)
    base.update(kw)
    return hf.TrainingArguments(**base)


def test_trainer_gradient_accumulation_matches_large_batch(hf, tmp_path):
    """A stock Trainer: 2 micro-batches of 2 with accumulation take the same SGD step as one batch of 4."""
    data = _blocks(4)
    deltas = []
    for batch, accumulate in ((4, 1), (2, 2)):
        model = _tiny_model(hf)
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        loss_fn = MixedLossForTrainer(model, alpha=0.5, topk=8, backend="reference")
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        trainer = hf.Trainer(
            model=model, args=_args(hf, tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
                                    max_steps=1), train_dataset=data, data_collator=hf.default_data_collator,
            optimizers=(optimizer, scheduler), **loss_fn.trainer_kwargs())
        trainer.train()
        deltas.append({k: p.detach() - before[k] for k, p in model.named_parameters()})
    for name in deltas[0]:
        torch.testing.assert_close(deltas[0][name], deltas[1][name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(d.abs().max() > 0 for d in deltas[0].values())


def test_trainer_eval_metrics_equal_full_logits(hf, tmp_path):
    model = _tiny_model(hf, seed=1)
    data = _blocks(7, seed=2)
    loss_fn = MixedLossForTrainer(model, alpha=0.5, temperature=0.7, topk=10, backend="reference")
    trainer = hf.Trainer(model=model, args=_args(hf, tmp_path, per_device_eval_batch_size=3), eval_dataset=data,
                         data_collator=hf.default_data_collator, **loss_fn.trainer_kwargs())
    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        batch = hf.default_data_collator(list(data))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    z = logits[:, :-1].reshape(-1, logits.shape[-1])
    y = batch["labels"][:, 1:].reshape(-1)
    valid = y != -100
    ce = F.cross_entropy(z, y, ignore_index=-100)
    _, cos, _, _ = reference_rows(z, y, model.get_input_embeddings().weight, LossOptions(0.7, 10, -100, True))
    assert metrics["eval_tokens"] == int(valid.sum())
    assert metrics["eval_ce_loss"] == pytest.approx(ce.item(), rel=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(ce.item()), rel=1e-5)
    assert metrics["eval_token_acc"] == pytest.approx((z.argmax(-1) == y)[valid].double().mean().item(), rel=1e-9)
    assert metrics["eval_cos_sim"] == pytest.approx(cos[valid].double().mean().item(), rel=1e-5)
    assert "eval_runtime" in metrics


@pytest.mark.parametrize("tied", [True, False])
def test_trainer_fused_linear_takes_the_same_step_and_metrics(hf, tmp_path, tied):
    """fused_linear=True: the same SGD step and the same evaluation metrics as the logits path,
    tied or not (untied: the cosine is measured in the input embedding), and no [B, T, V] logits."""
    data = _blocks(4, seed=3)
    results = []
    for fused in (False, True):
        model = _tiny_model(hf, tied=tied, seed=4)
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        loss_fn = MixedLossForTrainer(model, embedding=None if tied else "input", alpha=0.5, topk=8,
                                      backend="reference", fused_linear=fused, chunk_size=5)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        trainer = hf.Trainer(
            model=model, args=_args(hf, tmp_path, per_device_train_batch_size=4, per_device_eval_batch_size=3,
                                    max_steps=1), train_dataset=data, eval_dataset=data,
            data_collator=hf.default_data_collator, optimizers=(optimizer, scheduler), **loss_fn.trainer_kwargs())
        trainer.train()
        metrics = trainer.evaluate()
        with torch.no_grad():
            out = model(input_ids=torch.tensor(data[:1]["input_ids"]))
        assert out.logits.shape[-1] == (16 if fused else 64)  # fused: the head passes the hidden states on
        loss_fn.restore_lm_head()
        with torch.no_grad():
            assert model(input_ids=torch.tensor(data[:1]["input_ids"])).logits.shape[-1] == 64
        results.append(({k: p.detach() - before[k] for k, p in model.named_parameters()}, metrics))
    (delta, metrics), (delta_fused, metrics_fused) = results
    for name in delta:
        torch.testing.assert_close(delta_fused[name], delta[name], rtol=1e-4, atol=1e-6, msg=name)
    for key in ("eval_ce_loss", "eval_cos_sim", "eval_token_acc", "eval_tokens", "eval_mixed_loss"):
        assert metrics_fused[key] == pytest.approx(metrics[key], rel=1e-5), key


def test_fused_linear_refuses_a_logit_transform_it_has_no_option_for(hf):
    model = _tiny_model(hf)
    model.config.output_multiplier_scale = 0.5
    with pytest.raises(ValueError, match="output_multiplier_scale"):
        MixedLossForTrainer(model, fused_linear=True)


def test_untied_model_needs_an_explicit_embedding(hf):
    model = _tiny_model(hf, tied=False)
    with pytest.raises(ValueError, match="not tied"):
        MixedLossForTrainer(model).get_embedding()
    assert MixedLossForTrainer(model, embedding="input").get_embedding() is model.get_input_embeddings().weight
    assert MixedLossForTrainer(model, embedding="output").get_embedding() is model.get_output_embeddings().weight


def test_cli_end_to_end(hf, tmp_path):
    """The default tiny setup, few steps: the loss falls, metrics.json has the keys, results.md gets a section."""
    from fused_cosloss import train

    out = tmp_path / "run"
    train.main(["--output_dir", str(out), "--alpha", "0.5", "--alpha_warmup", "0.2", "--generated_sentences", "800",
                "--block_size", "32", "--per_device_train_batch_size", "8", "--max_steps", "24", "--logging_steps", "4",
                "--backend", "reference", "--disable_tqdm"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"args", "eval", "test", "train", "embedding_groups"}
    for key in ("eval_ce_loss", "eval_perplexity", "eval_token_acc", "eval_cos_sim", "eval_runtime", "eval_loss"):
        assert key in metrics["eval"], key
    assert {"test_ce_loss", "test_perplexity", "test_token_acc", "test_cos_sim"} <= set(metrics["test"])
    logs = metrics["train"]["log_history"]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert logs[-1]["ce_loss"] < logs[0]["ce_loss"]
    assert {"ce_loss", "cos_loss", "grad_norm_ce", "grad_norm_cos", "alpha"} <= set(logs[-1])
    assert logs[0]["alpha"] < 0.5 and logs[-1]["alpha"] == 0.5
    assert metrics["train"]["global_step"] == 24
    assert "## Run: " in (out / "results.md").read_text()


def test_cli_local_files_and_pretrained_path(hf, tmp_path):
    """The --model_name_or_path/--train_file path of a hub run, offline: a saved model, text/json/parquet files."""
    import datasets

    from fused_cosloss import text_data, train

    splits = corpus.corpus_splits(300, 40, 40, seed=5)
    (tmp_path / "train.txt").write_text("\n".join(splits["train"]) + "\n")
    datasets.Dataset.from_dict({"body": splits["validation"]}).to_json(str(tmp_path / "val.jsonl"))
    datasets.Dataset.from_dict({"body": splits["test"]}).to_parquet(str(tmp_path / "test.parquet"))
    tokenizer = text_data.train_tokenizer(splits["train"], 400)
    model = _tiny_model(hf, vocab=len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")

    out = tmp_path / "run"
    train.main(["--model_name", str(tmp_path / "model"), "--train_file", str(tmp_path / "train.txt"),
                "--validation_file", str(tmp_path / "val.jsonl"), "--test_file", str(tmp_path / "test.parquet"),
                "--text_field", "body", "--block_size", "16", "--max_test_samples", "10", "--alpha", "0.25",
                "--max_steps", "3", "--output_dir", str(out), "--backend", "reference", "--disable_tqdm"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["block_size"] == 16 and metrics["args"]["learning_rate"] == 5e-5  # pretrained preset
    assert metrics["test"]["test_tokens"] > 0 and metrics["eval"]["eval_tokens"] > metrics["test"]["test_tokens"] / 10
    assert "embedding_groups" not in metrics


def test_cli_compare_grid(hf, tmp_path):
    from fused_cosloss import train

    out = tmp_path / "grid"
    results = train.main(["--compare", "--compare_alphas", "0", "0.5", "--compare_temperatures", "0.7", "1.5",
                          "--generated_sentences", "300", "--max_steps", "2", "--per_device_eval_batch_size", "64",
                          "--output_dir", str(out), "--backend", "reference", "--disable_tqdm"])
    assert [(r["args"]["alpha"], r["args"]["temperature"]) for r in results] == \
        [(None, 0.7), (None, 1.5), (0, 0.7), (0, 1.5), (0.5, 0.7), (0.5, 1.5)]  # first the model before training
    assert [r["run"]["trained"] for r in results] == [False, False, True, True, True, True]
    assert results[0]["run"]["run_dir"] == str(out / "pretrained_T0.7")
    results = results[2:]
    assert results[1]["run"]["training_shared_with"] == str(out / "a0_T0.7")  # alpha = 0 trains once
    assert results[1]["run"]["load"] == results[0]["run"]["load"]  # and shares its load record
    assert results[0]["eval"]["eval_ce_loss"] == results[1]["eval"]["eval_ce_loss"]
    assert results[0]["eval"]["eval_cos_sim"] != results[1]["eval"]["eval_cos_sim"]
    for name in ("comparison.md", "comparison.json", "results.md"):
        assert (out / name).exists(), name
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "comparison.png").stat().st_size > 1000


DDP_SCRIPT = r'''
import json, os, sys
import torch, transformers, datasets
from fused_cosloss.hf import MixedLossForTrainer, causal_lm_labels, pad_for_distributed_eval
transformers.logging.set_verbosity_error()
batch = int(sys.argv[1])
args = transformers.TrainingArguments(output_dir=sys.argv[2], report_to="none", disable_tqdm=True, use_cpu=True,
    per_device_train_batch_size=batch, per_device_eval_batch_size=2, max_steps=1, save_strategy="no",
    max_grad_norm=0.0, dataloader_pin_memory=False)
torch.manual_seed(0)
config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                                 embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
model = transformers.GPT2LMHeadModel(config)
ids = torch.randint(0, 50, (4, 12))
labels = causal_lm_labels(ids)
labels[0, 4:] = -100
labels[2, 8:] = -100
data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
evaluation = pad_for_distributed_eval(data.select(range(3)), 2, args.world_size)
loss_fn = MixedLossForTrainer(model, alpha=0.5, topk=8, backend="reference", fused_linear=sys.argv[3] == "fused")
optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=evaluation,
    data_collator=transformers.default_data_collator,
    optimizers=(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)), **loss_fn.trainer_kwargs())
trainer.train()
metrics = trainer.evaluate()
if int(os.environ.get("RANK", "0")) == 0:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    print("RESULT " + json.dumps({"params": flat.tolist(), "tokens": metrics["eval_tokens"],
                                  "ce": metrics["eval_ce_loss"], "world": args.world_size}))
if torch.distributed.is_initialized():
    torch.distributed.barrier()
# no teardown: gloo left to interpreter exit can abort a worker, and destroying it with DDP's
# reducer alive can deadlock (torch 2.13: the process group's last reference, dropped with the
# GIL held, joins a gloo thread that waits for the GIL)
sys.stdout.flush()
os._exit(0)
'''


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher, mode", [("torchrun", "logits"), ("accelerate", "logits"), ("torchrun", "fused")])
def test_trainer_ddp_two_processes_equal_one_batch(hf, tmp_path, launcher, mode):
    """torchrun / accelerate launch with 2 CPU processes (gloo): one step equals one process with the whole batch;
    exact eval sums. "fused": the fused-linear mode (the LM head passes hidden states on) under DDP too."""
    import subprocess
    import sys

    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("RANK", None)

    def run(command):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                   cwd=tmp_path, start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # the launcher and its workers
            stdout, stderr = process.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        assert process.returncode == 0 and lines, stdout[-2000:] + stderr[-4000:]
        return json.loads(lines[0][len("RESULT "):])

    one = run([sys.executable, str(script), "4", str(tmp_path / "one"), mode])
    two = run([sys.executable, *LAUNCHERS[launcher], str(script), "2", str(tmp_path / "two"), mode])
    assert one["world"] == 1 and two["world"] == 2
    torch.testing.assert_close(torch.tensor(two["params"]), torch.tensor(one["params"]), rtol=1e-5, atol=1e-6)
    assert two["tokens"] == one["tokens"] == 3 + 11 + 7 and two["ce"] == pytest.approx(one["ce"], rel=1e-5)
