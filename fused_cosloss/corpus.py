"""A small generated English-like corpus where embedding similarity matters.

Every sentence comes from a template whose slots are filled from *groups of
interchangeable words* (animals, foods, tools, places, ...). The context fixes
which group comes next but not which member, so:

- cross-entropy can at best spread probability over the group (its floor is the
  group's entropy, not zero), and the best next-token accuracy is the share of the
  most frequent member;
- the cosine term rewards putting the expected embedding of that spread close to
  the embedding of the word that came: it pulls the members of a group together in
  embedding space. :func:`group_similarity` measures exactly that, so a comparison
  of alpha = 0 against alpha > 0 has something to show.

Members of a group get Zipf-like frequencies (rank r has weight 1 / (r + 1) ** 0.7)
so that frequent and rare words share a group. Everything is generated from
``random.Random(seed)``: the same arguments always give the same text, on any
machine and Python version (``Random.random`` and ``choice``/``choices`` with
weights are stable across CPython 3 versions for a given seed).
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

# Groups of interchangeable words. Each word belongs to exactly one group, and all
# words are plain lowercase ASCII, so a byte-level BPE with a few hundred merges
# makes each " word" (with its leading space) a single token.
GROUPS: dict[str, tuple[str, ...]] = {
    "animal": ("cat", "dog", "fox", "wolf", "horse", "rabbit", "mouse", "bear"),
    "person": ("teacher", "doctor", "farmer", "sailor", "baker", "painter", "driver", "singer"),
    "food": ("apple", "bread", "cheese", "rice", "soup", "cake", "pear", "honey"),
    "tool": ("hammer", "knife", "rope", "shovel", "brush", "needle", "ladder", "bucket"),
    "place": ("garden", "kitchen", "forest", "market", "river", "village", "harbor", "field"),
    "color": ("red", "blue", "green", "yellow", "white", "black", "brown", "grey"),
    "size": ("small", "large", "tiny", "huge", "little", "big", "tall", "short"),
    "eat": ("eats", "likes", "wants", "finds", "smells", "hides", "steals", "drops"),
    "use": ("holds", "carries", "cleans", "uses", "lifts", "moves", "sells", "fixes"),
    "move": ("walks", "runs", "goes", "travels", "hurries", "wanders", "returns", "rides"),
    "time": ("morning", "evening", "night", "noon", "winter", "summer", "spring", "autumn"),
    "mood": ("happy", "tired", "hungry", "quiet", "angry", "calm", "sleepy", "proud"),
}

# Templates: literal words and {group} slots. Literal words are shared by all
# groups (function words), so only the slots carry group structure.
TEMPLATES: tuple[str, ...] = (
    "the {size} {animal} {eat} the {food} in the {place} .",
    "a {person} {use} a {color} {tool} .",
    "the {person} {move} to the {place} in the {time} .",
    "the {animal} is {mood} because the {food} is {color} .",
    "in the {time} the {person} {use} the {size} {tool} near the {place} .",
    "the {mood} {person} {eat} a {food} and {move} home .",
    "a {color} {animal} {move} through the {place} every {time} .",
    "the {person} and the {animal} are {mood} in the {place} .",
)

SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}


def _member_weights(n: int) -> list[float]:
    return [1.0 / (rank + 1) ** 0.7 for rank in range(n)]


def generate_sentences(n_sentences: int, seed: int = 0) -> list[str]:
    """``n_sentences`` sentences drawn from :data:`TEMPLATES`, deterministic in ``seed``."""
    rng = random.Random(seed)
    weights = {name: _member_weights(len(words)) for name, words in GROUPS.items()}
    sentences = []
    for _ in range(n_sentences):
        template = rng.choice(TEMPLATES)
        words = []
        for token in template.split(" "):
            if token.startswith("{"):
                group = token[1:-1]
                token = rng.choices(GROUPS[group], weights=weights[group])[0]
            words.append(token)
        sentences.append(" ".join(words))
    return sentences


def generate_documents(n_sentences: int, seed: int = 0, min_len: int = 3, max_len: int = 8) -> list[str]:
    """Sentences joined into paragraphs of ``min_len`` to ``max_len`` sentences, one per line."""
    sentences = generate_sentences(n_sentences, seed)
    rng = random.Random(seed + 10_007)
    documents, start = [], 0
    while start < len(sentences):
        size = rng.randint(min_len, max_len)
        documents.append(" ".join(sentences[start:start + size]))
        start += size
    return documents


def corpus_splits(n_train: int = 6000, n_validation: int = 600, n_test: int = 600, seed: int = 0) -> dict[str, list[str]]:
    """Train / validation / test documents (sentence counts given), each split from its own seed."""
    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    return {split: generate_documents(size, seed * 1000 + SPLIT_SEEDS[split]) for split, size in sizes.items()}


def vocabulary() -> list[str]:
    """Every word the generator can emit (group members and template words), sorted."""
    words = {word for group in GROUPS.values() for word in group}
    for template in TEMPLATES:
        words.update(token for token in template.split(" ") if not token.startswith("{"))
    return sorted(words)


def group_token_ids(tokenizer) -> dict[str, list[int]]:
    """For each group, the token ids of its members written with a leading space.

    Members that the tokenizer splits into several tokens are left out (with a
    byte-level BPE trained on this corpus none are).
    """
    ids: dict[str, list[int]] = {}
    for name, words in GROUPS.items():
        members = []
        for word in words:
            encoded = tokenizer.encode(" " + word, add_special_tokens=False)
            if len(encoded) == 1:
                members.append(int(encoded[0]))
        ids[name] = members
    return ids


def group_similarity(embedding, groups: dict[str, Sequence[int]]) -> dict[str, float]:
    """Mean cosine similarity between embedding rows of words in the same group and in different groups.

    Returns ``{"within": ..., "between": ..., "separation": within - between}``: the
    separation rises when interchangeable words move together in embedding space.
    """
    import torch

    rows, labels = [], []
    for index, members in enumerate(groups.values()):
        rows.extend(members)
        labels.extend([index] * len(members))
    if len(rows) < 2:
        return {"within": float("nan"), "between": float("nan"), "separation": float("nan")}
    with torch.no_grad():
        vectors = embedding.detach().float()[torch.tensor(rows, device=embedding.device)]
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
        sims = vectors @ vectors.T
        group = torch.tensor(labels, device=embedding.device)
        same = group[:, None] == group[None, :]
        off_diagonal = ~torch.eye(len(rows), dtype=torch.bool, device=embedding.device)
        within = sims[same & off_diagonal].mean().item()
        between = sims[~same].mean().item()
    return {"within": within, "between": between, "separation": within - between}


def write_text_files(directory, splits: dict[str, Iterable[str]]) -> dict[str, str]:
    """Write each split as ``<directory>/<split>.txt`` (one document per line); returns the paths."""
    import os

    os.makedirs(directory, exist_ok=True)
    paths = {}
    for split, documents in splits.items():
        path = os.path.join(directory, f"{split}.txt")
        with open(path, "w", encoding="utf-8") as handle:
            for document in documents:
                handle.write(document + "\n")
        paths[split] = path
    return paths
