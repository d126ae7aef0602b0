"""Run directories that never lose results: a used directory needs --resume or --overwrite,
a resume checks its config against the run's before touching anything, old checkpoints are
pruned, and the smaller fixes of the run workflow (targets, clipping, runtime.kind, wall time)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from splitfed.checkpoint import checkpoint_wall_s
from splitfed.cli import app
from splitfed.config import ConfigError
from splitfed.run import run
from tests.conftest import tiny_run_config


def _config(model: Path, corpus: Path, rounds: int = 2, **sections):
    sections.setdefault("devices", {"count": 2, "cuts": [2]})
    train = {"rounds": rounds, "local_steps": 1, **sections.pop("train", {})}
    return tiny_run_config(model, corpus, "sfl", train=train, **sections)


def _listing(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every path under ``root`` with its mtime (ns), size and bytes: any change shows."""
    listing = {}
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        content = path.read_bytes() if path.is_file() else b""
        listing[str(path.relative_to(root))] = (stat.st_mtime_ns, stat.st_size, content)
    return listing


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _write_toml(path: Path, model: Path, corpus: Path, rounds: int = 2, rank: int = 4, cut: int = 2) -> Path:
    path.write_text(
        f'protocol = "sfl"\nseed = 0\n[model]\nsource = "{model}"\n[data]\nsource = "{corpus}"\neval_chunks = 8\n'
        f'[lora]\nrank = {rank}\nalpha = 8.0\ntargets = ["q_proj", "v_proj"]\n'
        f"[train]\nrounds = {rounds}\nlocal_steps = 1\nbatch_size = 4\nseq_len = 32\nlr = 1e-2\n"
        f"[devices]\ncount = 2\ncuts = [{cut}]\n"
    )
    return path


@pytest.fixture(scope="module")
def used_run(tiny_llama_dir, corpus_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(config file, run directory) of a finished 2-round run."""
    directory = tmp_path_factory.mktemp("used")
    config = _write_toml(directory / "c.toml", tiny_llama_dir, corpus_dir)
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(directory / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    return config, directory / "run"


# --- a used run directory ---------------------------------------------------------------------
def test_cli_run_into_a_used_directory_is_refused_and_changes_nothing(used_run):
    config, out = used_run
    before = _listing(out)
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1
    assert str(out) in result.output and "--resume" in result.output and "--overwrite" in result.output
    assert _listing(out) == before


def test_python_run_into_a_used_directory_is_refused_and_changes_nothing(tiny_llama_dir, corpus_dir, tmp_path):
    out = tmp_path / "run"
    run(_config(tiny_llama_dir, corpus_dir, rounds=1), out, progress=False)
    before = _listing(out)
    with pytest.raises(ConfigError, match="already holds a run") as error:
        run(_config(tiny_llama_dir, corpus_dir, rounds=1, lora={"rank": 2}), out, progress=False)
    assert str(out) in str(error.value) and "overwrite" in str(error.value)
    assert _listing(out) == before


def test_overwrite_replaces_the_old_results_and_stale_checkpoints(tiny_llama_dir, corpus_dir, tmp_path):
    out = tmp_path / "run"
    run(_config(tiny_llama_dir, corpus_dir, rounds=3, train={"keep_checkpoints": 0}), out, progress=False)
    (out / "notes.txt").write_text("mine")  # not a run's file: left alone
    summary = run(_config(tiny_llama_dir, corpus_dir, rounds=1), out, progress=False, overwrite=True)
    assert summary["rounds"] == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "round-0000"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["round"] for r in records if r["kind"] == "round"} == {0}
    assert (out / "notes.txt").read_text() == "mine"
    fresh = tmp_path / "fresh"
    run(_config(tiny_llama_dir, corpus_dir, rounds=1), fresh, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(_adapter(out).values(), _adapter(fresh).values()))


def test_an_empty_or_unrelated_directory_needs_no_flag(tiny_llama_dir, corpus_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.txt").write_text("a directory for the run")
    run(_config(tiny_llama_dir, corpus_dir, rounds=1), out, progress=False)
    assert (out / "summary.json").is_file()


def test_resume_and_overwrite_together_are_refused(tiny_llama_dir, corpus_dir, tmp_path):
    with pytest.raises(ConfigError, match="exclude each other"):
        run(_config(tiny_llama_dir, corpus_dir), tmp_path / "run", progress=False, resume=True, overwrite=True)
    assert not (tmp_path / "run").exists()


# --- resume -----------------------------------------------------------------------------------
@pytest.mark.parametrize("change, fields", [
    ({"rank": 8}, ["lora.rank: 4 -> 8"]),
    ({"cut": 1}, ["devices.cuts: [2] -> [1]", "devices.cuts (resolved): [2, 2] -> [1, 1]"]),
])
def test_cli_resume_with_a_changed_config_names_the_fields_and_changes_nothing(used_run, tmp_path, tiny_llama_dir,
                                                                               corpus_dir, change, fields):
    _, out = used_run
    before = _listing(out)
    config = _write_toml(tmp_path / "changed.toml", tiny_llama_dir, corpus_dir, rounds=3, **change)
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(out), "--quiet", "--resume"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1
    message = " ".join(result.output.split())
    for field in fields:
        assert field in message, message
    assert "train.rounds" not in message.split("training:")[1].split(". Only")[0]  # more rounds are allowed
    assert _listing(out) == before


def test_resume_with_more_rounds_equals_the_uninterrupted_run(tiny_llama_dir, corpus_dir, tmp_path):
    whole = run(_config(tiny_llama_dir, corpus_dir, rounds=3), tmp_path / "whole", progress=False)
    run(_config(tiny_llama_dir, corpus_dir, rounds=2), tmp_path / "resumed", progress=False)
    first_part = checkpoint_wall_s(tmp_path / "resumed" / "checkpoints" / "round-0001")  # what the resume starts from
    resumed = run(_config(tiny_llama_dir, corpus_dir, rounds=3), tmp_path / "resumed", progress=False, resume=True)
    a, b = _adapter(tmp_path / "whole"), _adapter(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final_eval_loss"] == whole["final_eval_loss"] and resumed["rounds"] == 3
    # the wall time is the whole run's: the first part's seconds (up to its checkpoint) are counted too
    assert first_part > 0 and resumed["wall_s"] > first_part
    round_walls = [json.loads(line)["wall_s"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["kind"] == "round"]
    assert round_walls == sorted(round_walls)


def test_resume_without_a_checkpoint_fails_before_loading_and_leaves_nothing(tiny_llama_dir, corpus_dir, tmp_path,
                                                                            monkeypatch):
    import splitfed.run as run_module

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run_module, "build_protocol", no_loading)
    out = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        run(_config(tiny_llama_dir, corpus_dir), out, progress=False, resume=True)
    assert not out.exists()


# --- checkpoints kept -------------------------------------------------------------------------
@pytest.mark.parametrize("keep, kept", [(2, ["round-0002", "round-0003"]), (1, ["round-0003"]),
                                         (0, ["round-0000", "round-0001", "round-0002", "round-0003"])])
def test_only_the_last_keep_checkpoints_stay(tiny_llama_dir, corpus_dir, tmp_path, keep, kept):
    out = tmp_path / "run"
    run(_config(tiny_llama_dir, corpus_dir, rounds=4, train={"keep_checkpoints": keep}), out, progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name != "latest") == kept
    assert (out / "checkpoints" / "latest").read_text() == "round-0003"


def test_default_keeps_two_and_a_resume_from_the_older_one_works(tiny_llama_dir, corpus_dir, tmp_path):
    out = tmp_path / "run"
    run(_config(tiny_llama_dir, corpus_dir, rounds=3), out, progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "round-0001", "round-0002"]
    run(_config(tiny_llama_dir, corpus_dir, rounds=3), out, progress=False, resume_from="round-0001")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "round-0001", "round-0002"]


# --- smaller fixes ----------------------------------------------------------------------------
def test_bad_lora_target_is_refused_before_the_model_loads(tiny_llama_dir, corpus_dir, tmp_path, monkeypatch):
    import splitfed.run as run_module

    monkeypatch.setattr(run_module, "build_protocol", lambda *a, **k: pytest.fail("the model was loaded"))
    config = _config(tiny_llama_dir, corpus_dir, lora={"targets": ["q_proj", "qkv_proj"]})
    with pytest.raises(ConfigError, match="lora.targets: 'qkv_proj'") as error:
        run(config, tmp_path / "run", progress=False)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in str(error.value)
    assert not (tmp_path / "run").exists()


def test_lora_targets_may_be_module_paths(tiny_llama_dir, corpus_dir):
    from splitfed.run import plan_run

    plan_run(_config(tiny_llama_dir, corpus_dir, lora={"targets": ["self_attn.q_proj", "down_proj"]}))


@pytest.mark.parametrize("value", [0, 0.0, "none"])
def test_max_grad_norm_zero_or_none_disables_clipping(tiny_llama_dir, corpus_dir, tmp_path, value):
    from splitfed.config import parse_config

    config = _config(tiny_llama_dir, corpus_dir, rounds=1, train={"max_grad_norm": value, "lr": 5.0})
    assert config.train.max_grad_norm is None
    assert parse_config(config.to_tree()).train.max_grad_norm is None
    # with lr 5 a clipped step and an unclipped one differ: clipping is really off
    huge = _config(tiny_llama_dir, corpus_dir, rounds=1, train={"max_grad_norm": 1e12, "lr": 5.0})
    clipped = _config(tiny_llama_dir, corpus_dir, rounds=1, train={"max_grad_norm": 1e-3, "lr": 5.0})
    run(config, tmp_path / "off", progress=False)
    run(huge, tmp_path / "huge", progress=False)
    run(clipped, tmp_path / "clipped", progress=False)
    off, same, small = _adapter(tmp_path / "off"), _adapter(tmp_path / "huge"), _adapter(tmp_path / "clipped")
    assert all(torch.equal(off[k], same[k]) for k in off)
    assert any(not torch.equal(off[k], small[k]) for k in off)


def test_python_run_refuses_remote_runtimes(tiny_llama_dir, corpus_dir, tmp_path):
    grpc = _config(tiny_llama_dir, corpus_dir, runtime={"kind": "grpc", "tokens": ["a", "b"]})
    with pytest.raises(ConfigError, match="splitfed serve"):
        run(grpc, tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match=r"splitfed\.deploy\.run_on_ray"):
        run(_config(tiny_llama_dir, corpus_dir, runtime={"kind": "ray"}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_one_gguf_model_is_cached_once_whatever_its_path(tmp_path, monkeypatch):
    """Two installs of one GGUF file (other paths, other mtimes) share one dequantized cache."""
    import hashlib
    import os

    from splitfed.models.loading import WEIGHTS_FILE, _gguf_cache_dir

    monkeypatch.setenv("SPLITFED_HOME", str(tmp_path / "home"))
    first, second = tmp_path / "venv1" / "m.gguf", tmp_path / "venv2" / "m.gguf"
    for path, mtime in ((first, 1_000_000), (second, 2_000_000)):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
        os.utime(path, (mtime, mtime))
    assert _gguf_cache_dir(first) == _gguf_cache_dir(second)
    other = tmp_path / "venv2" / "other.gguf"
    other.write_bytes(b"GGUF" + bytes(64))
    assert _gguf_cache_dir(other).name.split("-")[-1] != _gguf_cache_dir(first).name.split("-")[-1]

    # a cache named the old way (by path and mtime) is moved to the new name, and the old name still works
    third = tmp_path / "venv3" / "m.gguf"
    third.parent.mkdir()
    third.write_bytes(b"GGUF" + bytes(range(256)) * 64 + b"x")
    stat = third.stat()
    legacy_key = hashlib.sha256(f"{third.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    legacy = tmp_path / "home" / "models" / f"m-{legacy_key}"
    legacy.mkdir(parents=True)
    (legacy / WEIGHTS_FILE).write_bytes(b"weights")
    directory = _gguf_cache_dir(third)
    assert directory != legacy and (directory / WEIGHTS_FILE).read_bytes() == b"weights"
    assert legacy.is_symlink() and (legacy / WEIGHTS_FILE).read_bytes() == b"weights"


def test_serve_into_a_used_directory_is_refused_before_waiting_for_devices(used_run, tiny_llama_dir, corpus_dir,
                                                                           monkeypatch):
    import splitfed.deploy as deploy
    from splitfed.config import load_config

    config, out = used_run
    before = _listing(out)
    monkeypatch.setattr(deploy, "LinkServer", lambda *a, **k: pytest.fail("the server started listening"))
    grpc = load_config(config, ['runtime.kind="grpc"', 'runtime.tokens=["a", "b"]'])
    with pytest.raises(ConfigError, match="already holds a run"):
        deploy.serve(grpc, out, progress=False)
    with pytest.raises(ConfigError, match="lora.rank: 4 -> 2"):
        deploy.serve(load_config(config, ['runtime.kind="grpc"', 'runtime.tokens=["a", "b"]', "lora.rank=2"]), out,
                     progress=False, resume=True)
    assert _listing(out) == before
