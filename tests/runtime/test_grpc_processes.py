"""Real processes on loopback: a server and device processes train like the in-process runtime."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from splitfed.config import load_config
from splitfed.run import run
from splitfed.deploy import serve

pytestmark = pytest.mark.slow  # real processes

DEVICES = 4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


COMPRESSED = (  # lossy stochastic codecs with error feedback on both ends: residuals live in the device processes
    '[compression]\nactivations = "topk:0.3 > quant:4 > zstd"\ngradients = "quant:8"\nadapters = "fp16"\n'
    'error_feedback = true\n'
)


def write_config(path, model_dir, corpus_dir, protocol: str, cuts: str, port: int, extra: str = "",
                 devices: int = DEVICES) -> None:
    tokens = ", ".join(f'"token-{i}"' for i in range(devices))
    path.write_text(
        f'protocol = "{protocol}"\nseed = 3\n[model]\nsource = "{model_dir}"\n'
        f'[data]\nsource = "{corpus_dir}"\npartition = "iid"\neval_chunks = 8\n'
        f'[lora]\nrank = 4\nalpha = 8.0\n'
        f'[train]\nrounds = 2\nlocal_steps = 2\nbatch_size = 4\nseq_len = 32\nlr = 1e-2\n'
        f'[devices]\ncount = {devices}\ncuts = {cuts}\n'
        f'[runtime]\naddress = "127.0.0.1:{port}"\ntokens = [{tokens}]\nrequest_timeout_s = 60\nconnect_timeout_s = 120\ndevice_threads = 1\n'
        + extra
    )


def start_devices(config_path, count: int) -> list[subprocess.Popen]:
    return [
        subprocess.Popen([sys.executable, "-m", "splitfed.cli", "device", str(config_path), "--id", str(i)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for i in range(count)
    ]


def serve_with_devices(config_path, out, **serve_options) -> dict:
    """A gRPC server here and one device process per device, all on the config file; the run's summary."""
    devices = start_devices(config_path, DEVICES)
    try:
        summary = serve(load_config(config_path, ['runtime.kind="grpc"']), out, progress=False, **serve_options)
        for process in devices:
            assert process.wait(timeout=60) == 0, process.stderr.read().decode()[-2000:]
    finally:
        for process in devices:
            process.kill()
    return summary


def assert_same_adapters(run_a, run_b) -> None:
    a = load_file(run_a / "adapter" / "adapter_model.safetensors")
    b = load_file(run_b / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, msg=key)


STACK = '[aggregation]\nmethod = "stack"\n'  # merges travel to the device processes, which add them to their bases
# budgets instead of cuts; importance reports and relayouts (every round: threshold 0) cross the wire too
HSPLITLORA = ("[]\nmemory_mb = [1.0, 2.0, 4.0, 2.0]\nranks = [2, 4, 8, 4]",
              STACK + "[hsplitlora]\nreconfigure_threshold = 0.0\n")


BF16 = '[compute]\ndtype = "bfloat16"\n'  # activations and their gradients cross the wire in bf16


@pytest.mark.parametrize(("protocol", "cuts", "extra"), [("sfl", "[2]", ""), ("memsfl", "[1, 2, 4]", COMPRESSED),
                                                         ("memsfl", "[1, 2, 4]\nranks = [2, 4, 8, 4]", STACK),
                                                         ("hsplitlora", *HSPLITLORA), ("sfl", "[2]", BF16),
                                                         ("memsfl", "[1, 2, 4]", COMPRESSED + BF16)],
                         ids=["sfl", "memsfl-compressed", "memsfl-stack", "hsplitlora", "sfl-bf16",
                              "memsfl-compressed-bf16"])
def test_grpc_processes_match_in_process_run(tiny_llama_dir, corpus_dir, tmp_path, protocol, cuts, extra):
    config_path = tmp_path / "config.toml"
    write_config(config_path, tiny_llama_dir, corpus_dir, protocol, cuts, free_port(), extra)
    remote = serve_with_devices(config_path, tmp_path / "grpc")
    local = run(load_config(config_path), tmp_path / "inproc", progress=False)
    assert_same_adapters(tmp_path / "grpc", tmp_path / "inproc")
    assert remote["final_eval_loss"] == pytest.approx(local["final_eval_loss"], rel=1e-5)
    assert remote.get("configurations") == local.get("configurations")  # the same importance, placements, reconfigurations
    if protocol == "hsplitlora":
        assert local["configurations"]["reconfigurations"] >= 1  # relayout requests crossed the wire
    for stream in ("activations", "gradients", "adapters"):  # the same encoded messages cross the wire
        assert remote[f"{stream}_bytes"] == local[f"{stream}_bytes"], stream
        assert remote[f"{stream}_rel_error"] == pytest.approx(local[f"{stream}_rel_error"], rel=1e-4), stream
    # The clock times the transport's bytes (clip_scale also carries the learning rate over gRPC).
    assert remote["sim_s"] == pytest.approx(local["sim_s"], rel=1e-3)
    assert local["bytes_up"] <= remote["bytes_up"] <= 1.1 * local["bytes_up"]  # plus request / ack messages
