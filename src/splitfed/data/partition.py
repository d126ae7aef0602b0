"""Federated split of the data: per-document train/eval holdout, then train rows dealt to devices."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitfed.data.batches import TokenDataset, tokenize_document
from splitfed.data.sources import DataError, Document

SCHEMES = ("by_document", "iid", "dirichlet")


@dataclass
class FederatedData:
    """Training rows per device, one pooled evaluation set, and which documents fed each device."""

    train: list[TokenDataset]
    eval: TokenDataset
    device_documents: list[list[str]]


def split_train_eval(ds: TokenDataset, eval_fraction: float) -> tuple[TokenDataset, TokenDataset]:
    """Hold out the last ``ceil(eval_fraction * n)`` rows of one document.

    Rows are consecutive text, so taking the tail keeps eval text disjoint from training text.
    At least one row always stays in train (a 1-row document is all train).
    """
    n = len(ds)
    n_eval = min(math.ceil(round(eval_fraction * n, 9)), n - 1) if n > 1 else 0  # round: 0.1 * 30 -> 3, not 4
    return ds.subset(range(n - n_eval)), ds.subset(range(n - n_eval, n))


def _assign_rows(sizes: list[int], num_devices: int, scheme: str, alpha: float, seed: int) -> list[np.ndarray]:
    """Global row indices (into the documents' rows laid end to end) for each device, each sorted."""
    if num_devices < 1:
        raise DataError(f"devices.count must be at least 1, got {num_devices}")
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    doc_rows = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(sizes))]
    total = int(offsets[-1])
    rng = np.random.default_rng(seed)
    if scheme == "by_document":
        if len(sizes) < num_devices:
            raise DataError(f"devices.count = {num_devices} but the data has only {len(sizes)} document(s); "
                            "'by_document' needs at least one document per device: use fewer devices, more "
                            'documents, or data.partition = "iid"')
        parts = [np.concatenate([doc_rows[d] for d in range(k, len(sizes), num_devices)]) for k in range(num_devices)]
    elif scheme == "iid":
        parts = np.array_split(rng.permutation(total), num_devices)
    elif scheme == "dirichlet":
        if total < num_devices:
            raise DataError(f"devices.count = {num_devices} but the data has only {total} training rows; "
                            "use fewer devices or a shorter train.seq_len")
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
        for rows in doc_rows:
            proportions = rng.dirichlet(np.full(num_devices, alpha))  # (devices,)
            cuts = (np.cumsum(proportions)[:-1] * len(rows)).astype(int)
            for k, chunk in enumerate(np.split(rng.permutation(rows), cuts)):
                buckets[k].append(chunk)
        parts = [np.concatenate(b) for b in buckets]
        for k in range(num_devices):  # every device needs a row: take one from the currently largest device
            if len(parts[k]) == 0:
                donor = int(np.argmax([len(p) for p in parts]))
                parts[k], parts[donor] = parts[donor][-1:], parts[donor][:-1]
    else:
        raise DataError(f"data.partition = {scheme!r}: allowed: {', '.join(map(repr, SCHEMES))}")
    return [np.sort(p).astype(np.int64) for p in parts]


def partition_rows(per_document: list[TokenDataset], num_devices: int, scheme: str, alpha: float,
                   seed: int) -> list[TokenDataset]:
    """Deal every row of every document to exactly one of ``num_devices`` devices (see ``SCHEMES``).

    ``by_document``: document i -> device i % num_devices (natural non-IID, like LEAF Shakespeare);
    ``iid``: pooled rows shuffled and dealt evenly; ``dirichlet``: each document's rows split by
    proportions ~ Dir(alpha), smaller alpha = more skew.
    """
    if not per_document:
        raise DataError("no documents to partition")
    pooled = TokenDataset.concat(per_document)
    parts = _assign_rows([len(d) for d in per_document], num_devices, scheme, alpha, seed)
    return [pooled.subset(p) for p in parts]


def _seeded_subset(indices: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` of ``indices``, chosen at random, kept in their original order."""
    if len(indices) <= limit:
        return indices
    return indices[np.sort(rng.choice(len(indices), size=limit, replace=False))]


def build_federated_data(documents: list[Document], tokenizer: Any, *, num_devices: int, seq_len: int,
                         partition: str, dirichlet_alpha: float, eval_fraction: float, eval_chunks: int,
                         max_train_chunks_per_device: int, seed: int) -> FederatedData:
    """Tokenise, hold out each document's tail for eval, partition the rest, cap sizes; deterministic in ``seed``."""
    if not documents:
        raise DataError("no documents to train on (check data.source and data.documents)")
    splits = [split_train_eval(tokenize_document(doc, tokenizer, seq_len), eval_fraction) for doc in documents]
    train_sizes = [len(train) for train, _ in splits]
    parts = _assign_rows(train_sizes, num_devices, partition, dirichlet_alpha, seed)
    if max_train_chunks_per_device > 0:
        cap_rng = np.random.default_rng([seed, 1])
        parts = [_seeded_subset(p, max_train_chunks_per_device, cap_rng) for p in parts]

    row_document = np.repeat(np.arange(len(documents)), train_sizes)  # (total train rows,) document of each row
    device_documents = [[documents[d].name for d in np.unique(row_document[p])] for p in parts]
    for k, p in enumerate(parts):
        if len(p) == 0:
            raise DataError(f"device {k} got no training rows (documents too short for train.seq_len = {seq_len}); "
                            "use fewer devices, more or longer documents, a shorter seq_len, or data.partition = "
                            '"iid"')

    pooled_train = TokenDataset.concat([train for train, _ in splits])
    pooled_eval = TokenDataset.concat([ev for _, ev in splits])
    if len(pooled_eval) == 0:
        raise DataError(f"no evaluation rows: every document is at most one chunk of train.seq_len = {seq_len} "
                        "tokens; use longer documents or a shorter seq_len")
    eval_rows = _seeded_subset(np.arange(len(pooled_eval)), eval_chunks, np.random.default_rng([seed, 2]))
    return FederatedData([pooled_train.subset(p) for p in parts], pooled_eval.subset(eval_rows), device_documents)
