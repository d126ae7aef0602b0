"""Tokenised datasets and the deterministic batch streams that feed training and evaluation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from splitfed.data.sources import DataError, Document, Record

IGNORE_INDEX = -100  # label value that Hugging Face causal-LM losses skip


def _loss_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss: labels != -100 from position 1 on, since the LM predicts token t from tokens < t
    (HF shifts labels by one inside the model, so a label at position 0 is never scored)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass
class TokenDataset:
    """Fixed-length token rows; all tensors ``(n, seq)`` int64, ``labels`` is -100 where there is no loss."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        """Loss-bearing tokens (see ``_loss_tokens``: position 0 is never counted)."""
        return _loss_tokens(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> TokenDataset:
        """The rows at ``indices``, in that order (copies). Indexed through numpy: torch's per-call cost
        dominates when a thousand devices each take a few rows."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)  # (k,)
        return TokenDataset(*(torch.from_numpy(t.numpy()[idx]) for t in (self.input_ids, self.labels, self.attention_mask)))

    @staticmethod
    def concat(datasets: Sequence[TokenDataset]) -> TokenDataset:
        """Stack the rows of several datasets with the same sequence length."""
        if not datasets:
            raise ValueError("TokenDataset.concat needs at least one dataset")
        lengths = sorted({d.seq_len for d in datasets})
        if len(lengths) > 1:
            raise ValueError(f"cannot concat datasets of different sequence lengths {lengths}")
        fields = ("input_ids", "labels", "attention_mask")
        return TokenDataset(*(torch.cat([getattr(d, f) for d in datasets]) for f in fields))

    @staticmethod
    def empty(seq_len: int) -> TokenDataset:
        """A dataset with no rows, shape ``(0, seq_len)``."""
        zeros = torch.zeros(0, seq_len, dtype=torch.long)
        return TokenDataset(zeros, zeros.clone(), zeros.clone())


@dataclass
class Batch:
    """One training/evaluation batch; each tensor ``(batch, seq)`` int64."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Loss-bearing tokens, counted like ``TokenDataset.num_tokens``."""
        return _loss_tokens(self.labels)


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token; it is needed to separate texts")
    pad = tokenizer.pad_token_id
    return eos, eos if pad is None else pad


def _encode(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: whole plays exceed model_max_length, which is fine because we chunk them ourselves
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] if text else []


TRUNCATION_POLICIES = ("keep_end", "drop", "error")
TEMPLATES = ("plain", "chat")


@dataclass
class RecordCounts:
    """What tokenisation did to the records: kept whole, truncated, dropped (by reason), or chunked as text.

    Plain-text documents are one continuous stream cut into ``seq_len`` chunks: their records are
    ``chunked`` and the tokens after the last whole chunk are ``tail_tokens_dropped``.
    """

    records: int = 0
    whole: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    chunked: int = 0
    tail_tokens_dropped: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def __iadd__(self, other: RecordCounts) -> RecordCounts:
        self.records += other.records
        self.whole += other.whole
        self.truncated += other.truncated
        for reason, n in other.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + n
        self.chunked += other.chunked
        self.tail_tokens_dropped += other.tail_tokens_dropped
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"records": self.records, "whole": self.whole, "truncated": self.truncated,
                "dropped": self.num_dropped, "dropped_by_reason": dict(sorted(self.dropped.items())),
                "chunked": self.chunked, "tail_tokens_dropped": self.tail_tokens_dropped}


def _chat_ids(tokenizer: Any, messages: Sequence[tuple[str, str]], where: str) -> tuple[list[int], list[int]]:
    """The conversation through the tokenizer's chat template, and its labels: the tokens of each assistant
    turn (as the template renders it, e.g. ending in ``<|im_end|>``), -100 everywhere else."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: data.template = 'chat' but the model's tokenizer has no chat template; "
                        "use an instruct model or data.template = 'plain'")
    conversation = [{"role": role, "content": content} for role, content in messages]

    def render(turns: list[dict], generation_prompt: bool = False) -> list[int]:
        if not turns and not generation_prompt:
            return []
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        return _encode(tokenizer, text)

    ids = render(conversation)
    labels = [IGNORE_INDEX] * len(ids)
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        before, through = render(conversation[:i], generation_prompt=True), render(conversation[: i + 1])
        if ids[: len(before)] != before or ids[: len(through)] != through or len(before) > len(through):
            raise DataError(f"{where}: the tokenizer's chat template does not render the conversation up to "
                            f"message {i} as a prefix of the whole, so the assistant turn cannot be located")
        labels[len(before) : len(through)] = ids[len(before) : len(through)]
    return ids, labels


def _record_ids(record: Record, tokenizer: Any, eos: int, template: str, name: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of one prompt/completion or chat record (untruncated)."""
    where = record.where or name
    if template == "chat" and (record.messages or record.prompt):
        messages = record.messages or (("user", record.prompt), ("assistant", record.completion))
        return _chat_ids(tokenizer, messages, where)
    if record.messages:
        raise DataError(f"{where}: a chat 'messages' record needs data.template = 'chat' (it applies the "
                        "tokenizer's chat template, loss on the assistant turns)")
    prompt = _encode(tokenizer, record.prompt)
    target = _encode(tokenizer, record.completion) + [eos]
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target


def _keep_end(ids: list[int], labels: list[int], seq_len: int) -> tuple[list[int], list[int]]:
    """Cut from the left (the prompt first, then the start of the completion) to ``seq_len`` tokens."""
    return ids[len(ids) - seq_len :], labels[len(labels) - seq_len :]


def tokenize_records(doc: Document, tokenizer: Any, seq_len: int, truncation: str = "keep_end",
                     template: str = "plain") -> tuple[TokenDataset, RecordCounts, list[bool]]:
    """``tokenize_document``, with the record counts and whether each row was truncated."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if truncation not in TRUNCATION_POLICIES:
        raise DataError(f"data.truncation = {truncation!r}: allowed: {', '.join(map(repr, TRUNCATION_POLICIES))}")
    if template not in TEMPLATES:
        raise DataError(f"data.template = {template!r}: allowed: {', '.join(map(repr, TEMPLATES))}")
    eos, pad = _special_ids(tokenizer)
    counts = RecordCounts(records=len(doc.records))
    if doc.is_plain_text:
        ids: list[int] = []
        for i, record in enumerate(doc.records):
            ids += ([eos] if i else []) + _encode(tokenizer, record.completion)
        n = len(ids) // seq_len
        counts.chunked, counts.tail_tokens_dropped = len(doc.records), len(ids) - n * seq_len
        if n == 0:
            return TokenDataset.empty(seq_len), counts, []
        input_ids = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (n, seq)
        return TokenDataset(input_ids, input_ids.clone(), torch.ones_like(input_ids)), counts, [False] * n

    rows, row_labels, row_mask, truncated = [], [], [], []
    for record in doc.records:
        if not record.messages and not record.completion:
            counts.drop("empty completion")
            continue
        ids, labels = _record_ids(record, tokenizer, eos, template, doc.name)
        cut = len(ids) > seq_len
        if cut:
            if truncation == "error":
                raise DataError(f"{record.where or doc.name}: the record is {len(ids)} tokens, longer than "
                                f"train.seq_len = {seq_len} (data.truncation = 'error'); use a longer seq_len, or "
                                "data.truncation = 'keep_end' (cut the prompt, then the completion's start) or "
                                "'drop'")
            if truncation == "drop":
                counts.drop("longer than seq_len")
                continue
            ids, labels = _keep_end(ids, labels, seq_len)
        if all(label == IGNORE_INDEX for label in labels[1:]):
            counts.drop("no loss tokens left after truncation" if cut else "no loss tokens")
            continue
        if cut:
            counts.truncated += 1
        else:
            counts.whole += 1
        padding = seq_len - len(ids)
        rows.append(ids + [pad] * padding)
        row_labels.append(labels + [IGNORE_INDEX] * padding)
        row_mask.append([1] * len(ids) + [0] * padding)
        truncated.append(cut)
    if not rows:
        return TokenDataset.empty(seq_len), counts, []
    tensors = (torch.tensor(x, dtype=torch.long) for x in (rows, row_labels, row_mask))  # each (n, seq)
    return TokenDataset(*tensors), counts, truncated


def tokenize_document(doc: Document, tokenizer: Any, seq_len: int, truncation: str = "keep_end",
                      template: str = "plain") -> TokenDataset:
    """Turn a document into ``(n, seq_len)`` rows.

    Plain text: records joined by EOS, cut into non-overlapping ``seq_len`` chunks (remainder dropped),
    loss on every token. Prompt/completion: one row per record (prompt + completion + EOS, right-padded),
    loss on completion + EOS only. Chat (``template = "chat"``): one row per record through the tokenizer's
    chat template, loss on the assistant turns only (a prompt/completion record becomes a user and an
    assistant turn). A record longer than ``seq_len`` follows ``truncation``: ``keep_end`` cuts it from the
    left (the prompt first, then the completion's start), ``drop`` drops it, ``error`` raises a
    ``DataError`` naming it. Records with an empty completion, or no loss token left, are dropped.
    """
    return tokenize_records(doc, tokenizer, seq_len, truncation, template)[0]


class BatchStream:
    """Endless, reproducible training batches: a fresh seeded permutation per epoch.

    A batch that runs past the end of an epoch continues into the next one, so every batch has exactly
    ``batch_size`` rows even when the dataset is smaller than a batch.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seed: int) -> None:
        if len(dataset) == 0:
            raise DataError("cannot stream batches from an empty dataset (a device got no training rows)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self._generator = torch.Generator().manual_seed(seed)
        self._permutation: torch.Tensor | None = None  # (n,) row order of the current epoch
        self._position = 0  # next index into the permutation

    def next_batch(self) -> Batch:
        n = len(self.dataset)
        parts = []
        need = self.batch_size
        while need:
            if self._permutation is None or self._position >= n:
                self._permutation = torch.randperm(n, generator=self._generator)
                self._position = 0
            take = min(need, n - self._position)
            parts.append(self._permutation[self._position : self._position + take])
            self._position += take
            need -= take
        rows = self.dataset.subset(torch.cat(parts))  # (batch, seq)
        return Batch(rows.input_ids, rows.labels, rows.attention_mask)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the exact same batch sequence after a restart."""
        return {
            "generator": self._generator.get_state(),
            "permutation": None if self._permutation is None else self._permutation.clone(),
            "position": self._position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        permutation = state["permutation"]
        if permutation is not None and len(permutation) != len(self.dataset):
            raise DataError(f"batch stream state is for {len(permutation)} rows but the dataset has "
                            f"{len(self.dataset)}; resume with the same data settings")
        self._generator.set_state(state["generator"])
        self._permutation = None if permutation is None else permutation.clone()
        self._position = int(state["position"])


def iterate_batches(dataset: TokenDataset, batch_size: int) -> Iterator[Batch]:
    """Rows in order, no shuffling, last batch possibly smaller: for evaluation."""
    for start in range(0, len(dataset), batch_size):
        rows = dataset.subset(torch.arange(start, min(start + batch_size, len(dataset))))
        yield Batch(rows.input_ids, rows.labels, rows.attention_mask)
