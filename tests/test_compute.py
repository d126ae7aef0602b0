"""Compute placement and precision (``compute``): a bf16 base trains like fp32 within bf16's precision,
split == unsplit still holds within one dtype, bf16 halves the activation traffic, LoRA and optimizer
state stay fp32, absent accelerators are refused before any weights load, and checkpoints move
between placements (not between dtypes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splitfed.config import ConfigError, available_devices
from splitfed.deploy import host_devices
from splitfed.run import run
from tests.conftest import tiny_run_config

BF16_LOSS_RTOL = 5e-3
"""bf16 keeps 8 bits of mantissa (unit roundoff 2^-9 = 0.2%); losses of the tiny models stay within 0.5% of fp32."""
ONE_DEVICE = dict(devices={"count": 1, "cuts": [3]}, data={"partition": "iid"}, train={"max_grad_norm": 0.5})


def _step_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "step"]


def _run(model_dir, corpus_dir, out: Path, protocol: str, dtype: str, **sections) -> dict:
    config = tiny_run_config(model_dir, corpus_dir, protocol, compute={"dtype": dtype}, **sections)
    return run(config, out, progress=False)


@pytest.mark.parametrize(("protocol", "sections"), [
    ("sfl", {}), ("memsfl", {"devices": {"count": 4, "cuts": [1, 2, 3, 2]}}),
    ("centralized", {"devices": {"count": 1, "cuts": []}}),
])
def test_bf16_base_trains_like_fp32(tiny_model_dir, corpus_dir, tmp_path, protocol, sections):
    full = _run(tiny_model_dir, corpus_dir, tmp_path / "fp32", protocol, "float32", **sections)
    half = _run(tiny_model_dir, corpus_dir, tmp_path / "bf16", protocol, "bfloat16", **sections)
    fp32_losses, bf16_losses = _step_losses(tmp_path / "fp32"), _step_losses(tmp_path / "bf16")
    assert fp32_losses != bf16_losses  # the base did run in bf16
    for a, b in zip(fp32_losses, bf16_losses, strict=True):
        assert b == pytest.approx(a, rel=BF16_LOSS_RTOL)
    assert half["final_eval_loss"] == pytest.approx(full["final_eval_loss"], rel=BF16_LOSS_RTOL)
    # LoRA factors and the optimizer's moments stay fp32 on a bf16 base
    state = load_file(tmp_path / "bf16" / "checkpoints" / "round-0001" / "state.safetensors")
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert lora and all(v.dtype == torch.float32 for v in lora.values())
    optimizer = [v for k, v in state.items() if "/optimizer/" in k and v.is_floating_point()]
    assert optimizer and all(v.dtype == torch.float32 for v in optimizer)  # AdamW's moments
    exported = load_file(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 for v in exported.values())


def test_split_equals_unsplit_within_bf16(tiny_model_dir, corpus_dir, tmp_path):
    _run(tiny_model_dir, corpus_dir, tmp_path / "sfl", "sfl", "bfloat16", **ONE_DEVICE)
    _run(tiny_model_dir, corpus_dir, tmp_path / "central", "centralized", "bfloat16", **ONE_DEVICE)
    split, whole = _step_losses(tmp_path / "sfl"), _step_losses(tmp_path / "central")
    assert split[-1] < split[0]
    for a, b in zip(split, whole, strict=True):
        assert a == pytest.approx(b, rel=1e-6)  # the same as in fp32: only the grad-norm sums' order differs


def test_bf16_activations_and_gradients_take_half_the_bytes(tiny_llama_dir, corpus_dir, tmp_path):
    full = _run(tiny_llama_dir, corpus_dir, tmp_path / "fp32", "sfl", "float32")
    half = _run(tiny_llama_dir, corpus_dir, tmp_path / "bf16", "sfl", "bfloat16")
    # activation_grad messages carry only the (batch, seq, hidden) gradient: half, up to the headers
    assert half["gradients_bytes"] / full["gradients_bytes"] == pytest.approx(0.5, abs=0.01)
    # activations also carry the int64 attention mask and labels, which do not shrink
    config = tiny_run_config(tiny_llama_dir, corpus_dir, "sfl")
    train = config.train
    messages = train.rounds * train.local_steps * config.devices.count
    hidden_fp32 = messages * train.batch_size * train.seq_len * 32 * 4  # hidden size 32, 4 bytes
    saved = full["activations_bytes"] - half["activations_bytes"]
    assert saved == pytest.approx(hidden_fp32 / 2, rel=0.01)
    assert half["adapters_bytes"] == full["adapters_bytes"]  # LoRA crosses the wire in fp32 either way


@pytest.mark.parametrize(("field", "value", "message"), [
    ("device", "gpu", "compute.device: 'gpu' is not a device; allowed: cpu, cuda, cuda:<index>, mps, auto"),
    ("server", "cuda:x", "compute.server: 'cuda:x' is not a device"),
    ("dtype", "float64", "compute.dtype"),
])
def test_bad_compute_values_name_the_field(tiny_llama_dir, corpus_dir, field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_run_config(tiny_llama_dir, corpus_dir, "sfl", compute={field: value})


ABSENT = [name for name in ("cuda", "cuda:7", "mps") if name not in available_devices()
          and not (name == "cuda" and torch.cuda.is_available())]


@pytest.mark.parametrize("field", ["device", "server"])
@pytest.mark.parametrize("name", ABSENT)
def test_absent_accelerator_is_refused_before_anything_loads(tiny_llama_dir, corpus_dir, tmp_path, field, name):
    config = tiny_run_config(tiny_llama_dir, corpus_dir, "sfl", compute={field: name})
    with pytest.raises(ConfigError, match=rf"compute.{field} = '{name}': no such device on this machine; "
                                          rf"available: {', '.join(available_devices())}"):
        run(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before the run directory, the model or the data


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_process_refuses_absent_cuda(tiny_llama_dir, corpus_dir):
    config = tiny_run_config(tiny_llama_dir, corpus_dir, "sfl", compute={"device": "cuda"})
    with pytest.raises(ConfigError, match="compute.device = 'cuda': no such device"):
        host_devices(config, [0])


def test_auto_places_on_this_machine(tiny_llama_dir, corpus_dir):
    config = tiny_run_config(tiny_llama_dir, corpus_dir, "splitllm", compute={"device": "auto", "edge": "cpu"},
                             devices={"count": 2, "cuts": [1, 2]}, splitllm={"edges": 1, "cloud_cut": 4},
                             train={"devices_per_round": 0})
    expected = next((d for d in available_devices() if d != "cpu"), "cpu")
    assert str(config.compute.torch_device("device")) == expected
    assert config.compute.field_of("cloud") == "server"  # compute.cloud unset: the cloud sits where the server would


def _adapters(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_checkpoint_resumes_under_another_placement_not_another_dtype(tiny_llama_dir, corpus_dir, tmp_path):
    def config(rounds: int, **compute):
        return tiny_run_config(tiny_llama_dir, corpus_dir, "sfl", train={"rounds": rounds}, compute=compute)

    run(config(3), tmp_path / "whole", progress=False)
    run(config(2), tmp_path / "moved", progress=False)
    with pytest.raises(ConfigError, match=r'compute.dtype: "float32" -> "bfloat16"'):
        run(config(3, dtype="bfloat16"), tmp_path / "moved", progress=False, resume=True)
    # placement fields may change on resume: checkpoints hold CPU tensors and load onto whatever device
    run(config(3, device="auto", server="auto"), tmp_path / "moved", progress=False, resume=True)
    whole, moved = _adapters(tmp_path / "whole"), _adapters(tmp_path / "moved")
    assert whole.keys() == moved.keys()
    for key in whole:
        if available_devices() == ["cpu"]:  # auto is the CPU here: the very same numbers
            assert torch.equal(whole[key], moved[key]), key
        else:  # round 3 ran on an accelerator: its kernels round differently
            torch.testing.assert_close(whole[key], moved[key], rtol=1e-3, atol=1e-5, msg=key)


def test_gpu_bench_skips_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: bench/gpu.py would run")
    bench = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
    result = subprocess.run([sys.executable, str(bench)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "bench/gpu.py: skipped: no CUDA device"
