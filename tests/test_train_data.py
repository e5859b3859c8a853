"""The training script's data: local text files keep their line breaks (keep_linebreaks, as run_clm.py)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tools(hf):
    from fused_cosloss import text_data, train

    return text_data, train


def _blocks_text(tools, tmp_path, content: str, *flags: str) -> str:
    """The training split of a .txt file as the script tokenizes it, decoded back to text."""
    text_data, train = tools
    path = tmp_path / "train.txt"
    path.write_text(content)
    args = train.parse_args(["--model_name", "unused", "--train_file", str(path), "--validation_file", str(path),
                             *flags])
    splits = text_data.load_raw_splits(args.data, args.training.seed)
    tokenizer = text_data.train_tokenizer([content], 300)
    blocks = text_data.tokenize_splits(splits, tokenizer, args.data.text_field, block_size=1000,
                                       keep_linebreaks=args.data.keep_linebreaks)
    return tokenizer.decode(blocks["train"][0]["input_ids"])


def test_two_line_file_keeps_its_line_break(tools, tmp_path):
    assert _blocks_text(tools, tmp_path, "first line\nsecond line\n") == "first line\nsecond line\n"


def test_blank_lines_between_paragraphs_are_kept(tools, tmp_path):
    content = "Exceptions\n**********\n\nExceptions are a means of breaking out.\n"
    assert _blocks_text(tools, tmp_path, content) == content


def test_keep_linebreaks_false_joins_the_lines(tools, tmp_path):
    """The old behaviour, on request: lines glued together and blank lines dropped."""
    text = _blocks_text(tools, tmp_path, "first line\n\nsecond line\n", "--keep_linebreaks", "false")
    assert text == "first linesecond line"


def test_bool_flags_read_like_hf_argument_parser(tools):
    _, train = tools
    parse = train.build_parser().parse_args
    assert parse([]).keep_linebreaks is True and parse([]).do_train is True
    assert parse(["--do_train", "false"]).do_train is False
    assert parse(["--do_train"]).do_train is True
    assert parse(["--keep_linebreaks", "False"]).keep_linebreaks is False
    with pytest.raises(SystemExit):
        parse(["--do_train", "maybe"])


def test_pydoc_files_are_real_text_split_by_topic(tmp_path):
    from fused_cosloss import text_data

    splits = text_data.pydoc_splits()
    assert all(splits.values()) and splits == text_data.pydoc_splits()
    assert not set(splits["train"]) & (set(splits["validation"]) | set(splits["test"]))
    assert not set(splits["validation"]) & set(splits["test"])
    paths = text_data.write_pydoc_files(str(tmp_path))
    text = (tmp_path / "validation.txt").read_text()
    assert paths["validation"] == str(tmp_path / "validation.txt")
    assert text.startswith(splits["validation"][0].rstrip("\n")) and "\n\n" in text


def test_pydoc_dataset_is_the_text_of_the_pydoc_files(tools, tmp_path):
    """--dataset_name pydoc: one row per topic, and together the rows are the text of the files
    ``python -m fused_cosloss.text_data --pydoc DIR`` writes; --max_eval_samples counts topics."""
    text_data, train = tools
    args = train.parse_args(["--dataset_name", "pydoc", "--max_eval_samples", "3"])
    splits = text_data.load_raw_splits(args.data, args.training.seed)
    text_data.write_pydoc_files(str(tmp_path))
    for split in ("train", "test"):
        assert "".join(splits[split]["text"]) == (tmp_path / f"{split}.txt").read_text(), split
    validation = (tmp_path / "validation.txt").read_text()
    assert len(splits["validation"]) == 3 and validation.startswith("".join(splits["validation"]["text"]))
    assert len(splits["train"]) == len(text_data.pydoc_splits()["train"])
