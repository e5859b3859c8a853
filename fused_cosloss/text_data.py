"""The training script's data: the splits (local files, a datasets id or the generated corpus), a
tokenizer for the tiny model, and the causal-LM blocks.

Text files keep their line breaks by default (``keep_linebreaks``, as transformers'
``run_clm.py``): the ``text`` loader makes one row per line, and the rows are concatenated
before they are cut into blocks, so without the break every line would run into the next.
"""
from __future__ import annotations

from itertools import chain

GENERATED = "generated"
PYDOC = "pydoc"
DATASETS = (GENERATED, PYDOC)  # the built-in corpora --dataset_name takes besides a datasets id
EOS = "<|endoftext|>"


def builder_for(path: str) -> str:
    """The ``datasets`` builder that reads ``path`` (``text``, ``json`` or ``parquet``), from its suffix."""
    name = path.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith((".json", ".jsonl")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".txt", ".text", ".raw")):
        return "text"
    raise SystemExit(f"{path}: expected a .txt, .json, .jsonl or .parquet file")


def load_local_file(path: str, split: str, text_field: str, keep_linebreaks: bool = True):
    """One split from a local file; a ``text`` file gives one row per line, ending in its line break
    when ``keep_linebreaks``."""
    import datasets

    builder = builder_for(path)
    options = {"keep_linebreaks": keep_linebreaks} if builder == "text" else {}
    ds = datasets.load_dataset(builder, data_files={split: path}, split=split, **options)
    if builder == "text" and text_field != "text":
        ds = ds.rename_column("text", text_field)
    return ds


def load_raw_splits(data, seed: int) -> dict:
    """``{"train": Dataset, "validation": Dataset, "test": Dataset or missing}`` with a text column, from the
    script's data arguments (``fused_cosloss.train.DataTrainingArguments``); ``seed`` shuffles the held-out
    validation rows when the data has no validation split."""
    import datasets

    splits = {}
    files = {"train": data.train_file, "validation": data.validation_file, "test": data.test_file}
    if any(files.values()):
        if not data.train_file:
            raise SystemExit("--validation_file/--test_file need --train_file")
        for split, path in files.items():
            if path:
                splits[split] = load_local_file(path, split, data.text_field, data.keep_linebreaks)
    elif data.dataset_name in DATASETS:
        splits = {split: datasets.Dataset.from_dict({data.text_field: texts})
                  for split, texts in builtin_splits(data.dataset_name, data.generated_sentences).items()}
    else:
        loaded = datasets.load_dataset(data.dataset_name, data.dataset_config_name)
        splits = {name: loaded[name] for name in loaded}
        if "valid" in splits and "validation" not in splits:
            splits["validation"] = splits.pop("valid")
    if "train" not in splits:
        raise SystemExit(f"the dataset has no 'train' split (it has {sorted(splits)})")
    if data.text_field not in splits["train"].column_names:
        raise SystemExit(f"--text_field {data.text_field!r}: not a column of the data ({splits['train'].column_names})")
    if "validation" not in splits:
        held_out = splits["train"].train_test_split(test_size=data.validation_split_percentage / 100.0, seed=seed)
        splits["train"], splits["validation"] = held_out["train"], held_out["test"]
    limits = {"train": data.max_train_samples, "validation": data.max_eval_samples, "test": data.max_test_samples}
    for split, limit in limits.items():
        if split in splits and limit is not None:
            splits[split] = splits[split].select(range(min(limit, len(splits[split]))))
    return splits


def builtin_splits(name: str, generated_sentences: int = 6000) -> dict[str, list[str]]:
    """The texts of a built-in corpus: ``generated`` (:mod:`fused_cosloss.corpus`, ``generated_sentences``
    training sentences and a tenth of that each for validation and test) or ``pydoc`` (:func:`pydoc_splits`,
    one row per topic)."""
    if name == PYDOC:  # one row per topic, ending in one line break: the text of write_pydoc_files' files
        return {split: [text.rstrip("\n") + "\n" for text in texts] for split, texts in pydoc_splits().items()}
    if name != GENERATED:
        raise ValueError(f"dataset {name!r}: expected one of the built-in corpora {DATASETS}")
    from . import corpus

    n = generated_sentences
    return corpus.corpus_splits(n, max(n // 10, 1), max(n // 10, 1), seed=0)


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE trained on ``texts``, wrapped as a transformers fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def _kept(text, keep_linebreaks: bool) -> bool:
    """Whether a row takes part: empty rows never; blank lines (a bare line break) only when breaks are kept."""
    if not text:
        return False
    return bool(text.strip()) or keep_linebreaks


def tokenize_splits(splits: dict, tokenizer, text_field: str, block_size: int, keep_linebreaks: bool = True) -> dict:
    """Tokenize, concatenate and cut into ``block_size`` blocks with causal labels (as the seed did).

    Rows are concatenated as they are: a line break ends each row of a text file read with
    ``keep_linebreaks`` (blank lines, the paragraph breaks, stay too); without it rows of
    whitespace only are dropped.
    """
    from .hf import causal_lm_labels

    def tokenize(batch):
        texts = [t for t in batch[text_field] if _kept(t, keep_linebreaks)]
        return {"input_ids": tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]}

    def group(batch):
        ids = list(chain.from_iterable(batch["input_ids"]))
        usable = (len(ids) // block_size) * block_size or len(ids)  # keep a short block when there is no full one
        blocks = [ids[i:i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks], "labels": causal_lm_labels(blocks)}

    out = {}
    for split, ds in splits.items():
        tokens = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"tokenize {split}")
        out[split] = tokens.map(group, batched=True, batch_size=100_000, desc=f"blocks of {block_size} ({split})")
        if len(out[split]) == 0:
            raise SystemExit(f"the {split} split has no text in field {text_field!r}")
    return out


def pydoc_splits() -> dict[str, list[str]]:
    """Real English text that every Python installation has: the topics of the interactive help
    (``pydoc_data.topics``, about 0.5 MB), sorted by name, each text once (some topics share theirs, and
    a text in two splits would leak); every tenth goes to validation, the one after it to test."""
    from pydoc_data.topics import topics

    texts = list(dict.fromkeys(topics[name] for name in sorted(topics)))
    splits = {"train": [], "validation": [], "test": []}
    for index, text in enumerate(texts):
        split = "validation" if index % 10 == 0 else "test" if index % 10 == 1 else "train"
        splits[split].append(text)
    return splits


def write_pydoc_files(directory: str) -> dict[str, str]:
    """``train.txt``, ``validation.txt`` and ``test.txt`` of :func:`pydoc_splits` in ``directory``; the paths."""
    import os

    os.makedirs(directory, exist_ok=True)
    paths = {}
    for split, rows in builtin_splits(PYDOC).items():  # each row ends in one line break
        paths[split] = os.path.join(directory, f"{split}.txt")
        with open(paths[split], "w", encoding="utf-8") as handle:
            handle.write("".join(rows))
    return paths


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fused_cosloss.text_data",
                                     description="Write Python's own documentation as train/validation/test .txt files.")
    parser.add_argument("--pydoc", metavar="DIR", required=True, help="the directory to write the files to")
    args = parser.parse_args(argv)
    for split, path in write_pydoc_files(args.pydoc).items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
