"""Tokenisation into rows, and the deterministic batch streams."""

from __future__ import annotations

import pytest
import torch

from splitfed.data.batches import BatchStream, TokenDataset, iterate_batches, tokenize_document
from splitfed.data.sources import DataError, Document, Record
from tests.data.conftest import EOS, PAD, make_tokenizer, numbered_dataset, row_ids


@pytest.mark.parametrize(
    ("texts", "seq_len", "rows"),
    [
        (["abcdefghij"], 4, 2),  # 10 tokens -> 2 chunks, 2 dropped
        (["abcdefgh"], 4, 2),  # exact fit
        (["abc", "defg"], 4, 2),  # 3 + EOS + 4 = 8 tokens
        (["abc"], 8, 0),  # shorter than one chunk: empty dataset
        (["x" * 100, "y" * 50, ""], 16, 9),  # 100 + 1 + 50 + 1 + 0 = 152 tokens
    ],
)
def test_plain_text_chunks(tokenizer, texts, seq_len, rows):
    doc = Document("d", tuple(Record("", t) for t in texts))
    ds = tokenize_document(doc, tokenizer, seq_len)
    assert ds.input_ids.shape == ds.labels.shape == ds.attention_mask.shape == (rows, seq_len)
    assert ds.input_ids.dtype == torch.long
    assert torch.equal(ds.labels, ds.input_ids) and bool((ds.attention_mask == 1).all())
    stream = [t for i, text in enumerate(texts) for t in ([EOS] if i else []) + tokenizer(text)["input_ids"]]
    assert ds.input_ids.reshape(-1).tolist() == stream[: rows * seq_len]
    assert ds.num_tokens == rows * (seq_len - 1)  # position 0 is never a prediction target


@pytest.mark.parametrize(
    ("prompt", "completion", "seq_len", "n_prompt", "n_target", "n_pad"),
    [
        ("Q?", "ans", 10, 2, 4, 4),  # 2 prompt + 3 completion + EOS + 4 padding
        ("", "ans", 6, 0, 4, 2),  # no prompt: loss on everything but padding
        ("Q?", "abcdefgh", 6, 0, 6, 0),  # truncated (keep_end): prompt cut, then the completion's start
        ("Q?", "abcd", 6, 1, 5, 0),  # truncated (keep_end): the prompt's start cut
        ("Q?", "a", 4, 2, 2, 0),  # exact fit: "a" and EOS are the targets
    ],
)
def test_prompt_completion_labels(tokenizer, prompt, completion, seq_len, n_prompt, n_target, n_pad):
    doc = Document("qa", (Record(prompt, completion), Record("Other", "x")))
    ds = tokenize_document(doc, tokenizer, seq_len)
    ids, labels, mask = ds.input_ids[0].tolist(), ds.labels[0].tolist(), ds.attention_mask[0].tolist()
    expected_ids = (tokenizer(prompt)["input_ids"] + tokenizer(completion)["input_ids"] + [EOS])[-seq_len:]
    assert ids == expected_ids + [PAD] * n_pad
    assert labels == [-100] * n_prompt + ids[n_prompt : n_prompt + n_target] + [-100] * n_pad
    assert mask == [1] * (n_prompt + n_target) + [0] * n_pad


def test_prompt_completion_drops_rows_without_targets_and_pads_with_eos_fallback():
    tokenizer = make_tokenizer(with_pad=False)
    doc = Document("qa", (Record("a long prompt", "c"), Record("p", "c")))
    ds = tokenize_document(doc, tokenizer, 5, truncation="drop")  # the first record is too long
    assert len(ds) == 1
    assert ds.input_ids[0].tolist() == tokenizer("pc")["input_ids"] + [EOS, EOS, EOS]
    assert ds.labels[0].tolist() == [-100, ds.input_ids[0, 1].item(), EOS, -100, -100]
    assert ds.num_tokens == 2


def test_empty_document_gives_empty_dataset(tokenizer):
    for doc in (Document("e", (Record("", ""),)), Document("e", (Record("long prompt", ""),))):
        assert tokenize_document(doc, tokenizer, 4).input_ids.shape == (0, 4)


def test_subset_and_concat():
    a, b = numbered_dataset(3), numbered_dataset(2, start=10)
    both = TokenDataset.concat([a, b])
    assert row_ids(both) == [0, 1, 2, 10, 11]
    assert row_ids(both.subset([4, 0])) == [11, 0] and len(both.subset([])) == 0
    with pytest.raises(ValueError, match="different sequence lengths"):
        TokenDataset.concat([a, numbered_dataset(1, seq_len=5)])


def take(stream: BatchStream, n: int) -> list[list[int]]:
    return [row_ids(stream.next_batch()) for _ in range(n)]


def test_stream_is_deterministic_and_covers_each_row_once_per_epoch():
    ds = numbered_dataset(12)
    batches = take(BatchStream(ds, batch_size=4, seed=7), 9)  # 3 epochs
    assert batches == take(BatchStream(ds, batch_size=4, seed=7), 9)
    assert batches != take(BatchStream(ds, batch_size=4, seed=8), 9)
    epochs = [sum(batches[i : i + 3], []) for i in (0, 3, 6)]
    assert all(sorted(epoch) == list(range(12)) for epoch in epochs)
    assert epochs[0] != epochs[1]  # a new permutation each epoch


@pytest.mark.parametrize(("rows", "batch_size"), [(3, 8), (5, 5), (7, 3)])
def test_stream_fills_batches_across_epochs(rows, batch_size):
    stream = BatchStream(numbered_dataset(rows), batch_size=batch_size, seed=0)
    drawn = sum(take(stream, rows), [])  # rows * batch_size draws = batch_size whole epochs
    assert all(len(b) == batch_size for b in take(stream, 2))
    for epoch in range(batch_size):
        assert sorted(drawn[epoch * rows : (epoch + 1) * rows]) == list(range(rows))


@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_stream_state_dict_resumes_identically(warmup):
    ds = numbered_dataset(10)
    original = BatchStream(ds, batch_size=4, seed=3)
    take(original, warmup)
    state = original.state_dict()
    expected = take(original, 6)
    resumed = BatchStream(ds, batch_size=4, seed=999)
    resumed.load_state_dict(state)
    assert take(resumed, 6) == expected


def test_stream_errors():
    with pytest.raises(DataError, match="empty dataset"):
        BatchStream(numbered_dataset(0), batch_size=2, seed=0)
    stream = BatchStream(numbered_dataset(4), batch_size=2, seed=0)
    stream.next_batch()
    with pytest.raises(DataError, match="state is for 4 rows but the dataset has 5"):
        BatchStream(numbered_dataset(5), batch_size=2, seed=0).load_state_dict(stream.state_dict())


def test_iterate_batches_is_sequential_with_short_tail():
    batches = list(iterate_batches(numbered_dataset(7), batch_size=3))
    assert [row_ids(b) for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches[0].input_ids.shape == batches[0].labels.shape == batches[0].attention_mask.shape == (3, 4)
    assert sum(b.num_tokens for b in batches) == 7 * 3
