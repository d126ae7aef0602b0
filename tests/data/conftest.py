"""Fixtures for the data tests: a real character-level Hugging Face tokenizer built offline, and
synthetic token datasets whose rows are identifiable by their first token."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from splitfed.data.batches import TokenDataset

PAD, EOS = 0, 1
_VOCAB = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *string.printable])}


def make_tokenizer(with_pad: bool = True) -> PreTrainedTokenizerFast:
    """One token per character, so expected token counts are simply string lengths."""
    backend = Tokenizer(models.WordLevel(vocab=_VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    extra = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", **extra)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def numbered_dataset(n: int, seq_len: int = 4, start: int = 0) -> TokenDataset:
    """``n`` rows where every token of row i is ``start + i``: rows can be told apart after shuffling."""
    ids = (torch.arange(start, start + n, dtype=torch.long)[:, None]).expand(n, seq_len).contiguous()  # (n, seq)
    return TokenDataset(ids, ids.clone(), torch.ones_like(ids))


def row_ids(ds) -> list[int]:
    """The identifying first token of every row of a dataset or batch."""
    return ds.input_ids[:, 0].tolist()
