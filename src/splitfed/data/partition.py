"""Federated split of the data: per-document train/eval holdout, then train rows dealt to devices."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from splitfed.data.batches import RecordCounts, TokenDataset, tokenize_records
from splitfed.data.roles import speaking_roles
from splitfed.data.sources import DataError, Document

SCHEMES = ("by_document", "iid", "dirichlet", "by_role")


def _rows_summary(ds: TokenDataset, truncated: np.ndarray) -> dict[str, int]:
    return {"rows": len(ds), "tokens": int(ds.attention_mask.sum()), "loss_tokens": ds.num_tokens,
            "truncated_rows": int(truncated.sum())}


@dataclass
class DataReport:
    """What the data became: rows and tokens per device and for eval, and what happened to the records.

    ``records`` counts the records of ``data.source`` (including an eval tail taken from it; with ``by_role``
    one record per speaking role), ``eval_records`` those of ``data.eval_source`` (None without one). Dropped
    records belong to no device. With ``by_role`` every device entry also names its ``play`` and ``role``.
    """

    devices: list[dict[str, Any]]
    eval: dict[str, Any]
    records: RecordCounts
    eval_records: RecordCounts | None = None
    truncation: str = "keep_end"
    template: str = "plain"

    def to_dict(self) -> dict[str, Any]:
        return {"truncation": self.truncation, "template": self.template, "devices": self.devices,
                "eval": self.eval, "records": self.records.to_dict(),
                "eval_records": None if self.eval_records is None else self.eval_records.to_dict()}


@dataclass
class FederatedData:
    """Training rows per device, one pooled evaluation set, and which documents fed each device."""

    train: list[TokenDataset]
    eval: TokenDataset
    device_documents: list[list[str]]
    report: DataReport | None = field(default=None, compare=False)


def split_train_eval(ds: TokenDataset, eval_fraction: float) -> tuple[TokenDataset, TokenDataset]:
    """Hold out the last ``ceil(eval_fraction * n)`` rows of one document.

    Rows are consecutive text, so taking the tail keeps eval text disjoint from training text.
    At least one row always stays in train (a 1-row document is all train).
    """
    n = len(ds)
    n_eval = min(math.ceil(round(eval_fraction * n, 9)), n - 1) if n > 1 else 0  # round: 0.1 * 30 -> 3, not 4
    return ds.subset(np.arange(n - n_eval)), ds.subset(np.arange(n - n_eval, n))


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
    elif scheme == "by_role":
        speaking = np.flatnonzero(np.asarray(sizes) > 0)  # roles with a training row
        if len(speaking) < num_devices:
            raise DataError(f"devices.count = {num_devices} but only {len(speaking)} speaking role(s) have a training "
                            "row; data.partition = 'by_role' gives each device one role: use devices.count <= "
                            f'{len(speaking)}, a shorter train.seq_len, or data.partition = "iid"')
        parts = [doc_rows[d] for d in np.sort(rng.choice(speaking, size=num_devices, replace=False))]
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

    ``by_document``: document i -> device i % num_devices (natural non-IID);
    ``iid``: pooled rows shuffled and dealt evenly; ``dirichlet``: each document's rows split by
    proportions ~ Dir(alpha), smaller alpha = more skew; ``by_role``: each document is one speaking role
    (see ``build_federated_data``), and a seeded choice of ``num_devices`` of the documents with rows, kept in
    document order (all of them when ``num_devices`` equals their number), gives one device each.
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


def _tokenize_all(documents: list[Document], tokenizer: Any, seq_len: int, truncation: str,
                  template: str) -> tuple[list[TokenDataset], list[np.ndarray], RecordCounts]:
    datasets, flags, counts = [], [], RecordCounts()
    for doc in documents:
        ds, doc_counts, truncated = tokenize_records(doc, tokenizer, seq_len, truncation, template)
        datasets.append(ds)
        flags.append(np.array(truncated, dtype=bool))
        counts += doc_counts
    return datasets, flags, counts


def local_dataset(documents: list[Document], tokenizer: Any, seq_len: int, truncation: str = "keep_end",
                  template: str = "plain") -> TokenDataset:
    """Every row of ``documents`` as one device's training data (a real deployment's own files; the
    server evaluates on its own data)."""
    datasets, _, _ = _tokenize_all(documents, tokenizer, seq_len, truncation, template)
    data = TokenDataset.concat(datasets)
    if len(data) == 0:
        raise DataError(f"no training rows in the device's data at train.seq_len = {seq_len}")
    return data


def build_federated_data(documents: list[Document], tokenizer: Any, *, num_devices: int, seq_len: int,
                         partition: str, dirichlet_alpha: float, eval_fraction: float, eval_chunks: int,
                         max_train_chunks_per_device: int, seed: int, truncation: str = "keep_end",
                         template: str = "plain", eval_documents: list[Document] | None = None) -> FederatedData:
    """Tokenise, hold out eval, partition the rest, cap sizes; deterministic in ``seed``.

    Eval is each document's tail (``eval_fraction``), or, when ``eval_documents`` are given (``data.eval_source``),
    those documents only: then every row of ``documents`` is training data and none of the eval documents is.

    ``by_role`` (LEAF-style Shakespeare) first splits the plays among ``documents`` into their speaking roles
    (``roles.speaking_roles``; other documents are skipped) and treats each role's text as a document: the eval
    tail is then taken per role, from every role with rows whether or not it is chosen for a device, so eval does
    not depend on ``num_devices``; a role qualifies for a device when it keeps a training row.
    """
    if not documents:
        raise DataError("no documents to train on (check data.source and data.documents)")
    roles = speaking_roles(documents) if partition == "by_role" else None
    if roles is not None:
        documents = [role.document for role in roles]
    datasets, flags, counts = _tokenize_all(documents, tokenizer, seq_len, truncation, template)
    eval_counts = None
    if eval_documents is None:
        splits = [split_train_eval(ds, eval_fraction) for ds in datasets]
        eval_flags = np.concatenate([f[len(train):] for f, (train, _) in zip(flags, splits)])
        pooled_eval = TokenDataset.concat([ev for _, ev in splits])
    else:
        if not eval_documents:
            raise DataError("data.eval_source has no documents")
        splits = [(ds, TokenDataset.empty(seq_len)) for ds in datasets]
        eval_sets, eval_flag_list, eval_counts = _tokenize_all(eval_documents, tokenizer, seq_len, truncation,
                                                               template)
        eval_flags = np.concatenate(eval_flag_list)
        pooled_eval = TokenDataset.concat(eval_sets)
    train_sizes = [len(train) for train, _ in splits]
    train_flags = np.concatenate([f[: len(train)] for f, (train, _) in zip(flags, splits)])
    parts = _assign_rows(train_sizes, num_devices, partition, dirichlet_alpha, seed)
    if max_train_chunks_per_device > 0:
        cap_rng = np.random.default_rng([seed, 1])
        parts = [_seeded_subset(p, max_train_chunks_per_device, cap_rng) for p in parts]

    row_document = np.repeat(np.arange(len(documents)), train_sizes)  # (total train rows,) document of each row
    device_sources = [np.unique(row_document[p]) for p in parts]  # documents of each device
    device_documents = [[documents[d].name for d in sources] for sources in device_sources]
    for k, p in enumerate(parts):
        if len(p) == 0:
            raise DataError(f"device {k} got no training rows (documents too short for train.seq_len = {seq_len}); "
                            "use fewer devices, more or longer documents, a shorter seq_len, or data.partition = "
                            '"iid"')

    pooled_train = TokenDataset.concat([train for train, _ in splits])
    if len(pooled_eval) == 0:
        if eval_documents is not None:
            raise DataError(f"no evaluation rows: data.eval_source gave no rows at train.seq_len = {seq_len} "
                            f"(records dropped: {eval_counts.dropped if eval_counts else {}})")
        raise DataError(f"no evaluation rows: every document is at most one chunk of train.seq_len = {seq_len} "
                        "tokens; use longer documents or a shorter seq_len, or give data.eval_source")
    eval_rows = _seeded_subset(np.arange(len(pooled_eval)), eval_chunks, np.random.default_rng([seed, 2]))
    train = [pooled_train.subset(p) for p in parts]
    evaluation = pooled_eval.subset(eval_rows)
    devices = [{**_rows_summary(ds, train_flags[p]), "documents": names}
               for ds, p, names in zip(train, parts, device_documents)]
    if roles is not None:  # one role per device
        for device, sources in zip(devices, device_sources):
            device.update(play=roles[sources[0]].play, role=roles[sources[0]].name)
    tails = "tail of each document" if roles is None else "tail of each speaking role"
    eval_summary = {**_rows_summary(evaluation, eval_flags[eval_rows]),
                    "source": "data.eval_source" if eval_documents is not None else tails}
    report = DataReport(devices, eval_summary, counts, eval_counts, truncation, template)
    return FederatedData(train, evaluation, device_documents, report)
