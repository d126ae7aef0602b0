"""Smoke tests on the shipped model (SmolLM2-135M) and corpus, prepared by `make test`'s setup."""

from __future__ import annotations

import pytest
import torch

from splitfed.config import parse_config
from splitfed.data.sources import shakespeare_dir
from splitfed.models.loading import WEIGHTS_FILE, load_model, load_tokenizer, resolve_source
from splitfed.models.split import position_ids_for, split_model
from splitfed.run import run

prepared = (resolve_source("smollm2")[0] / WEIGHTS_FILE).is_file() and shakespeare_dir().is_dir()
pytestmark = pytest.mark.skipif(not prepared, reason="model/corpus not prepared: run `splitfed prepare`")


def test_smollm2_split_forward_matches_unsplit():
    model = load_model("smollm2")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = load_tokenizer("smollm2")("To be, or not to be, that is the question.", return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        hidden = ids
        for stage in split_model(model, [7, 19]):
            hidden = stage(hidden, mask, position_ids_for(mask))
    torch.testing.assert_close(hidden, expected, atol=1e-4, rtol=1e-5)


def test_smollm2_memsfl_round_on_shakespeare(tmp_path):
    config = parse_config({
        "protocol": "memsfl",
        "data": {"documents": ["hamlet", "lear"], "max_train_chunks_per_device": 4, "eval_chunks": 4},
        "train": {"rounds": 1, "local_steps": 1, "batch_size": 2, "seq_len": 32},
        "devices": {"count": 2, "cuts": [2, 5]},
    })
    summary = run(config, tmp_path, progress=False)
    activation_bytes = 2 * 32 * 576 * 4  # batch x seq x hidden fp32, per device
    assert summary["bytes_up"] > 2 * activation_bytes
    assert summary["cuts"] == [2, 5]
    assert 0 < summary["peak_mem_device_bytes"] < summary["peak_mem_server_bytes"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_gguf_file_source_uses_the_prepared_cache():
    from splitfed.models.loading import SHIPPED_MODELS, load_model_config

    directory, gguf = resolve_source("smollm2")
    assert gguf is not None and gguf.name == SHIPPED_MODELS["smollm2"][1]
    assert resolve_source(str(gguf)) == (directory, gguf)  # a .gguf path shares the cache
    assert load_model_config(str(gguf)).num_hidden_layers == 30
