"""Damaged files give one clear error naming the file, what is wrong and what to do, never a traceback:
a truncated or corrupt model, a damaged checkpoint (with the checkpoint to fall back to), a data
file that is not text; on the command line one line on stderr, even when stderr is a pipe."""

from __future__ import annotations

import json
import logging
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from splitfed.checkpoint import MANIFEST_FILE, META_FILE, TENSORS_FILE
from splitfed.cli import app
from splitfed.config import load_config
from splitfed.data.sources import DataError, Document, Record, load_documents
from splitfed.errors import CorruptFileError
from splitfed.models.loading import WEIGHTS_FILE, load_model, load_stage_model
from splitfed.models.split import plan_stages
from splitfed.run import run

CLI = [sys.executable, "-c", "from splitfed.cli import main; main()"]


def _write_config(path: Path, model_dir: Path, data: Path, rounds: int = 3) -> Path:
    path.write_text(
        f'protocol = "sfl"\nseed = 0\n[model]\nsource = "{model_dir}"\n[data]\nsource = "{data}"\neval_chunks = 8\n'
        f'[lora]\nrank = 4\nalpha = 8.0\ntargets = ["q_proj", "v_proj"]\n'
        f"[train]\nrounds = {rounds}\nlocal_steps = 1\nbatch_size = 4\nseq_len = 32\nlr = 1e-2\nkeep_checkpoints = 0\n"
        f"[devices]\ncount = 2\ncuts = [2]\n"
    )
    return path


def _flip_byte(path: Path, at: float = 0.5) -> None:
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * at)] ^= 0xFF
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _bad_header(path: Path) -> None:  # the 8-byte header length now claims more than the file holds
    path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])


# --- model weights --------------------------------------------------------------------------
def _drop_tensor(path: Path) -> None:
    tensors = load_file(path)
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})


MODEL_DAMAGE = {
    "truncated": (_truncate, "truncated or corrupt (safetensors: "),
    "bad-header": (_bad_header, "truncated or corrupt (safetensors: "),
    "empty": (lambda path: path.write_bytes(b""), "truncated or corrupt (safetensors: "),
    "missing-tensor": (_drop_tensor, "no tensor for 'model.layers.0.self_attn.q_proj.weight'"),
}


@pytest.mark.parametrize("loader", ["whole", "first stage"])
@pytest.mark.parametrize("damage", list(MODEL_DAMAGE))
def test_damaged_model_weights_name_the_file(tiny_llama_dir, tmp_path, damage, loader):
    model_dir = Path(shutil.copytree(tiny_llama_dir, tmp_path / "tiny-llama"))
    weights = model_dir / WEIGHTS_FILE
    spoil, problem = MODEL_DAMAGE[damage]
    spoil(weights)
    with pytest.raises(CorruptFileError) as error:
        if loader == "whole":
            load_model(str(model_dir))
        else:
            load_stage_model(str(model_dir), plan_stages(6, [2])[0])
    message = str(error.value)
    assert message.startswith(f"{weights} is truncated or corrupt (") and problem in message, message
    assert "replace it with a good copy" in message and "\n" not in message


def test_damaged_cached_model_says_how_to_rebuild_it(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITFED_HOME", str(tmp_path))
    model_dir = Path(shutil.copytree(tiny_llama_dir, tmp_path / "models" / "SmolLM2-cached"))
    _truncate(model_dir / WEIGHTS_FILE)
    with pytest.raises(CorruptFileError, match=f"delete {model_dir} and run `splitfed prepare` \\(or `make demo`\\)"):
        load_model(str(model_dir))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real command line, stdout and stderr pipes (not a terminal), as a user's shell script sees it."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def _one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def test_cli_truncated_model_is_one_line_exit_1(tiny_llama_dir, corpus_dir, tmp_path):
    model_dir = Path(shutil.copytree(tiny_llama_dir, tmp_path / "tiny-llama"))
    _truncate(model_dir / WEIGHTS_FILE)
    config = _write_config(tmp_path / "c.toml", model_dir, corpus_dir)
    result = _cli("run", str(config), "--out", str(tmp_path / "run"), "--quiet", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    line = _one_error_line(result.stderr)
    assert f"{model_dir / WEIGHTS_FILE} is truncated or corrupt (safetensors: " in line


def test_cli_long_error_on_a_pipe_is_one_unwrapped_line(tmp_path, tiny_llama_dir):
    data = tmp_path / ("a-long-directory-name-" * 8) / "user-data"
    data.mkdir(parents=True)
    (data / "notes.txt").write_bytes(b"some text\x00more")
    config = _write_config(tmp_path / "c.toml", tiny_llama_dir, data)
    result = _cli("run", str(config), "--out", str(tmp_path / "run"), "--quiet", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    line = _one_error_line(result.stderr)
    assert len(line) > 200 and f"{data / 'notes.txt'}: not a text file: byte 9 (line 1) is NUL" in line


def test_log_lines_on_a_pipe_are_not_wrapped(tmp_path):
    code = ("from splitfed.cli import _log_to_stderr; import logging; _log_to_stderr(); "
            "logging.getLogger('splitfed.test').warning('x' * 300)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].endswith("WARNING splitfed.test: " + "x" * 300), result.stderr


# --- checkpoints ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tiny_llama_dir, corpus_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(config, run directory) of a 3-round run with a checkpoint after every round."""
    directory = tmp_path_factory.mktemp("finished")
    config = _write_config(directory / "c.toml", tiny_llama_dir, corpus_dir)
    run(load_config(config), directory / "run", progress=False)
    return config, directory / "run"


def _strip_manifests(checkpoints: Path) -> None:
    """Make every checkpoint look like one written before manifests existed."""
    for round_dir in checkpoints.glob("round-*"):
        (round_dir / MANIFEST_FILE).unlink()
        meta = json.loads((round_dir / META_FILE).read_text())
        del meta["format"]
        (round_dir / META_FILE).write_text(json.dumps(meta))


def _in(round_index: int, name: str, spoil):
    return lambda checkpoints: spoil(checkpoints / f"round-{round_index:04d}" / name)


def _old(*spoils):
    return [_strip_manifests, *spoils]


# case: (damages, the file the error names, what it says is wrong, fallback checkpoint or None)
CHECKPOINT_DAMAGE = {
    "flipped-tensor-byte": ([_in(2, TENSORS_FILE, _flip_byte)], f"round-0002/{TENSORS_FILE}",
                            "is corrupted (its SHA-256 differs", "round-0001"),
    "bad-safetensors-header": ([_in(2, TENSORS_FILE, _bad_header)], f"round-0002/{TENSORS_FILE}",
                               "is corrupted", "round-0001"),
    "truncated-state-json": ([_in(2, META_FILE, _truncate)], f"round-0002/{META_FILE}",
                             "is truncated or overwritten (", "round-0001"),
    "missing-member": ([_in(2, META_FILE, Path.unlink)], f"round-0002/{META_FILE}",
                       "is missing (listed in the manifest)", "round-0001"),
    "missing-manifest": ([_in(2, MANIFEST_FILE, Path.unlink)], f"round-0002/{MANIFEST_FILE}",
                         "is missing (this checkpoint was written with one)", "round-0001"),
    "garbled-manifest": ([_in(2, MANIFEST_FILE, lambda p: p.write_text("{"))], f"round-0002/{MANIFEST_FILE}",
                         "is not a valid manifest", "round-0001"),
    "latest-names-a-missing-round": ([lambda c: (c / "latest").write_text("round-0007")], "latest",
                                     "is stale (it names round-0007", "round-0002"),
    "latest-garbled": ([lambda c: (c / "latest").write_bytes(b"\x00\x01")], "latest",
                       "is damaged", "round-0002"),
    "two-newest-damaged": ([_in(2, TENSORS_FILE, _flip_byte), _in(1, META_FILE, _truncate)],
                           f"round-0002/{TENSORS_FILE}", "is corrupted", "round-0000"),
    "all-damaged": ([_in(i, TENSORS_FILE, _flip_byte) for i in range(3)], f"round-0002/{TENSORS_FILE}",
                    "is corrupted", None),
    "old-bad-safetensors-header": (_old(_in(2, TENSORS_FILE, _bad_header)), f"round-0002/{TENSORS_FILE}",
                                   "is truncated or corrupt (safetensors: ", "round-0001"),
    "old-truncated-state-json": (_old(_in(2, META_FILE, _truncate)), f"round-0002/{META_FILE}",
                                 "is not valid JSON (", "round-0001"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_DAMAGE))
def test_damaged_checkpoint_names_the_file_and_the_fallback(finished_run, tmp_path, case):
    config, finished = finished_run
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    spoils, file, problem, fallback = CHECKPOINT_DAMAGE[case]
    for spoil in spoils:
        spoil(out / "checkpoints")
    with pytest.raises(CorruptFileError) as error:
        run(load_config(config), out, progress=False, resume=True)
    message = str(error.value)
    assert f"{out}/checkpoints/{file} {problem}" in message, message
    if fallback:
        assert f"the newest older checkpoint that verifies is {fallback}" in message, message
        assert f"`--resume-from {fallback}`" in message
    else:
        assert f"no older checkpoint in {out / 'checkpoints'} verifies" in message, message


def _records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in lines]


def test_cli_resume_from_the_named_fallback_finishes_like_the_whole_run(finished_run, tmp_path):
    config, finished = finished_run
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    _flip_byte(out / "checkpoints" / "round-0002" / TENSORS_FILE)
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(config), "--out", str(out), "--quiet", "--resume"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1
    assert "--resume-from round-0001" in result.output
    result = runner.invoke(app, ["run", str(config), "--out", str(out), "--quiet", "--resume-from", "round-0001"])
    assert result.exit_code == 0, result.output
    expected = load_file(finished / "adapter" / "adapter_model.safetensors")
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:  # round 2 trained again from round 1's checkpoint: the same adapter
        assert torch.equal(expected[key], resumed[key]), key
    assert _records(out) == _records(finished)  # round 2's records replaced, not repeated
    load_file(out / "checkpoints" / "round-0002" / TENSORS_FILE)  # rewritten whole


def test_resume_from_an_unknown_checkpoint_lists_the_available_ones(finished_run, tmp_path):
    config, finished = finished_run
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(out), "--quiet", "--resume-from", "round-0009"])
    assert result.exit_code == 2, result.output
    assert "no checkpoint round-0009" in result.output and "available: round-0000, round-0001, round-0002" in result.output


def test_checkpoint_without_manifest_resumes_with_a_warning(finished_run, tmp_path, caplog):
    config, finished = finished_run
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    _strip_manifests(out / "checkpoints")
    with caplog.at_level(logging.WARNING, logger="splitfed.checkpoint"):
        run(load_config(config), out, progress=False, resume_from="round-0001")
    assert any("has no manifest.json" in r.getMessage() and "not verified" in r.getMessage() for r in caplog.records)
    assert _records(out) == _records(finished)
    assert (out / "checkpoints" / "round-0002" / MANIFEST_FILE).is_file()  # new checkpoints carry one


# --- data files -----------------------------------------------------------------------------
def _random_bytes(size: int, nul: bool) -> bytes:
    raw = random.Random(0).randbytes(size)
    return raw if nul else raw.replace(b"\x00", b"\x01")


DATA_DAMAGE = {
    "random-bytes-txt": ("notes.txt", _random_bytes(4096, nul=True), "is NUL (0x00)"),
    "nul-in-txt": ("notes.txt", b"To be, or not\n to\x00 be", "byte 17 (line 2) is NUL (0x00)"),
    "random-bytes-no-nul-txt": ("notes.txt", _random_bytes(4096, nul=False), "is control character 0x"),
    "utf16-txt": ("notes.txt", "To be, or not to be".encode("utf-16"), "it looks like UTF-16: save it as UTF-8"),
    "nul-in-jsonl": ("chat.jsonl", b'{"text": "a"}\n{"text": "b\x00"}\n', "byte 25 (line 2) is NUL (0x00)"),
    "random-bytes-no-nul-jsonl": ("chat.jsonl", _random_bytes(4096, nul=False), "not valid UTF-8 ("),
}


@pytest.mark.parametrize("case", list(DATA_DAMAGE))
def test_data_file_that_is_not_text_is_a_data_error(tmp_path, case):
    name, raw, problem = DATA_DAMAGE[case]
    (tmp_path / name).write_bytes(raw)
    with pytest.raises(DataError) as error:
        load_documents(str(tmp_path))
    message = str(error.value)
    assert name in message and problem in message, message
    assert "UTF-8" in message and "a byte-order mark is fine" in message
    if name.endswith(".txt"):
        assert message.startswith(f"{tmp_path / name}: not a text file: ") and "Latin-1" in message


@pytest.mark.parametrize(
    ("name", "raw", "record"),
    [
        ("notes.txt", "\ufeffCaf\u00e9\r\nline 2".encode("utf-8"), Record("", "Caf\u00e9\nline 2")),
        ("chat.jsonl", '\ufeff{"prompt": "Q", "completion": "A"}\n'.encode("utf-8"), Record("Q", "A")),
        ("notes.txt", b"\x93Windows-1252 quotes\x94 and an \x1b escape", Record("", "\x93Windows-1252 quotes\x94 and an \x1b escape")),
    ],
    ids=["utf8-bom-txt", "utf8-bom-jsonl", "latin1-with-c1-and-esc"],
)
def test_text_files_still_accepted(tmp_path, name, raw, record):
    (tmp_path / name).write_bytes(raw)
    assert load_documents(str(tmp_path)) == [Document(Path(name).stem, (record,))]
