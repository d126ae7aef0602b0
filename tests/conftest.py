"""Shared fixtures: tiny random GPT-2 and Llama models with a real (character-level) tokenizer,
saved to disk like any local Hugging Face model directory, and a small text corpus."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from splitfed.config import RunConfig, parse_config

CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
SPECIAL = ["<unk>", "<eos>"]
VOCAB = {token: i for i, token in enumerate([*SPECIAL, *CHARS])}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer built in code: real HF tokenizer, no hub."""
    model = models.WordLevel(vocab=VOCAB, unk_token="<unk>")
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    ),
    "gpt2": lambda: GPT2Config(
        vocab_size=len(VOCAB), n_embd=32, n_layer=6, n_head=4, n_positions=128,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ),
}


def save_tiny_model(directory: Path, family: str, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[family]())
    model.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_model_dir(request, tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


CORPUS = {
    "alpha": "To be, or not to be, that is the question. " * 40,
    "beta": "Now is the winter of our discontent made glorious summer. " * 40,
    "gamma": "All the world's a stage, and all the men and women merely players. " * 40,
    "delta": "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar. " * 40,
}


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("corpus")
    for name, text in CORPUS.items():
        (directory / f"{name}.txt").write_text(text)
    return directory


def tiny_run_config(model_dir: Path, corpus: Path, protocol: str, **sections: dict) -> RunConfig:
    """A fast config on the tiny model; ``sections`` override fields per section."""
    tree: dict = {
        "protocol": protocol,
        "seed": 0,
        "model": {"source": str(model_dir)},
        "data": {"source": str(corpus), "eval_chunks": 8},
        "lora": {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"] if "llama" in str(model_dir) else ["c_attn"]},
        "train": {"rounds": 2, "local_steps": 3, "batch_size": 4, "seq_len": 32, "lr": 1e-2},
        "devices": {"count": 4, "cuts": [2]},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            tree.setdefault(section, {}).update(values)
        else:
            tree[section] = values
    return parse_config(tree)
