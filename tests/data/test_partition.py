"""Train/eval holdout, the three partition schemes, and the full federated build."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from splitfed.data.partition import build_federated_data, partition_rows, split_train_eval
from splitfed.data.sources import DataError, Document, Record
from tests.data.conftest import numbered_dataset, row_ids

SCHEMES = ["by_document", "iid", "dirichlet"]


@pytest.mark.parametrize(
    ("rows", "fraction", "n_eval"),
    [(10, 0.1, 1), (30, 0.1, 3), (11, 0.1, 2), (2, 0.5, 1), (2, 0.9, 1), (1, 0.5, 0), (0, 0.1, 0)],
)
def test_split_train_eval_takes_the_tail(rows, fraction, n_eval):
    train, held_out = split_train_eval(numbered_dataset(rows), fraction)
    assert row_ids(train) == list(range(rows - n_eval))
    assert row_ids(held_out) == list(range(rows - n_eval, rows))


def documents(sizes: list[int]) -> list:
    """Numbered datasets laid end to end: row ids are global and identify their document."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return [numbered_dataset(n, start=int(s)) for n, s in zip(sizes, starts)]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("sizes", "devices"), [([5, 9, 3, 7], 4), ([20, 1, 6, 11, 4], 2), ([13], 1)])
def test_every_row_assigned_exactly_once_and_deterministic(scheme, sizes, devices):
    parts = partition_rows(documents(sizes), devices, scheme, alpha=0.5, seed=11)
    assert len(parts) == devices and all(len(p) > 0 for p in parts)
    assert sorted(sum((row_ids(p) for p in parts), [])) == list(range(sum(sizes)))
    again = partition_rows(documents(sizes), devices, scheme, alpha=0.5, seed=11)
    assert [row_ids(p) for p in parts] == [row_ids(p) for p in again]


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in partition_rows(documents([10, 3, 8]), 4, "iid", alpha=1.0, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_by_document_puts_each_document_on_one_device():
    sizes = [4, 6, 2, 5, 3]
    parts = partition_rows(documents(sizes), 2, "by_document", alpha=1.0, seed=0)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    owner = {r: d for d, p in enumerate(parts) for r in row_ids(p)}
    for doc in range(len(sizes)):
        assert {owner[r] for r in range(starts[doc], starts[doc + 1])} == {doc % 2}


def test_dirichlet_small_alpha_is_skewed():
    sizes, devices = [200] * 6, 4

    def top_share(alpha: float) -> float:
        """Mean over documents of the largest fraction of that document held by one device."""
        parts = partition_rows(documents(sizes), devices, "dirichlet", alpha=alpha, seed=5)
        counts = np.zeros((len(sizes), devices))
        for d, p in enumerate(parts):
            for r in row_ids(p):
                counts[r // 200, d] += 1
        return float((counts.max(axis=1) / 200).mean())

    assert top_share(0.05) > 0.85
    assert top_share(100.0) < 0.4


def test_partition_errors():
    with pytest.raises(DataError, match='devices.count = 3 but the data has only 2 document.*data.partition = "iid"'):
        partition_rows(documents([5, 5]), 3, "by_document", alpha=1.0, seed=0)
    with pytest.raises(DataError, match="data.partition = 'shards'"):
        partition_rows(documents([5, 5]), 2, "shards", alpha=1.0, seed=0)
    with pytest.raises(DataError, match="only 2 training rows"):
        partition_rows(documents([1, 1]), 3, "dirichlet", alpha=1.0, seed=0)


def random_text(seed: int, length: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz .,\n") for _ in range(length))


CORPUS = [Document(name, (Record("", random_text(i, 800 + 160 * i)),)) for i, name in enumerate("abcde")]


def build(tokenizer, **overrides):
    settings = dict(num_devices=3, seq_len=16, partition="by_document", dirichlet_alpha=0.5, eval_fraction=0.1,
                    eval_chunks=8, max_train_chunks_per_device=0, seed=1)
    return build_federated_data(CORPUS, tokenizer, **(settings | overrides))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_build_is_deterministic_and_eval_is_disjoint(tokenizer, scheme):
    data, again = build(tokenizer, partition=scheme), build(tokenizer, partition=scheme)
    for a, b in zip([*data.train, data.eval], [*again.train, again.eval]):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert data.device_documents == again.device_documents and len(data.train) == 3
    assert len(data.eval) == 8
    train_rows = {tuple(r) for d in data.train for r in d.input_ids.tolist()}
    assert not train_rows & {tuple(r) for r in data.eval.input_ids.tolist()}


def test_build_caps_devices_and_tracks_documents(tokenizer):
    data = build(tokenizer)
    assert data.device_documents == [["a", "d"], ["b", "e"], ["c"]]
    capped = build(tokenizer, max_train_chunks_per_device=5, eval_chunks=100)
    assert [len(d) for d in capped.train] == [5, 5, 5]
    assert len(capped.eval) == sum(-(-(800 + 160 * i) // 16 // 10) for i in range(5))  # ceil(10%) of each doc
    full_rows = [d.input_ids.tolist() for d in data.train]
    assert all(all(r in full for r in d.input_ids.tolist()) for d, full in zip(capped.train, full_rows))


def test_build_rejects_devices_without_rows(tokenizer):
    tiny = [Document("a", (Record("", "x" * 40),)), Document("b", (Record("", "y" * 10),))]
    with pytest.raises(DataError, match="device 1 got no training rows"):
        build_federated_data(tiny, tokenizer, num_devices=2, seq_len=16, partition="by_document",
                             dirichlet_alpha=1.0, eval_fraction=0.1, eval_chunks=4, max_train_chunks_per_device=0,
                             seed=0)
