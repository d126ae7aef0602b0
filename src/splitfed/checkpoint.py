"""Round checkpoints: everything needed to resume a run exactly (no pickle).

A checkpoint holds the global adapter, every worker's adapters and optimizer states (per
slot), every first stage's batch-stream position, the error-feedback residuals of compressed
streams, the RNG state and the round/step counters. Workers are found in the protocol's
topology, local or remote alike. Tensors go to
a safetensors file, everything else to JSON; a round's directory is written under a
temporary name and renamed, so a crash never leaves a half-written checkpoint behind.

Each round's directory also holds ``manifest.json``: the size and SHA-256 of its other files,
written before the rename and checked before a resume uses the checkpoint. A damaged
checkpoint is refused with an error that names the file, what is wrong with it and the
newest older checkpoint that verifies (``load_checkpoint(..., name="round-0001")``, on the
command line ``--resume-from round-0001``). Checkpoints written before manifests existed
still load, with a warning that they were not verified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from splitfed.adapters.merge import split_merge_key
from splitfed.errors import CorruptFileError
from splitfed.protocols.base import Protocol
from splitfed.runtime.remote import DeviceDropped
from splitfed.wire.state import flatten, unflatten

TENSORS_FILE = "state.safetensors"
META_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
FORMAT = 2  # state.json's "format": 2 = the directory has a manifest (absent = written before manifests)
LATEST = "latest"
_ROUND_NAME = re.compile(r"round-(\d+)")
LINK = "link/"
MERGES = "merges/"
log = logging.getLogger("splitfed.checkpoint")


def save_checkpoint(protocol: Protocol, directory: Path, round_index: int, base_loss: float, *,
                    keep: int = 0, wall_s: float | None = None) -> Path:
    """Write round ``round_index``'s checkpoint and point ``latest`` at it.

    ``keep`` > 0: then delete all but the last ``keep`` round checkpoints (this one included) and
    any of later rounds (an earlier run's, which a resumed run trains again). ``wall_s``: the run's
    wall-clock time so far, so that a resumed run's summary counts the whole run."""
    tensors: dict[str, torch.Tensor] = {f"global/{k}": v for k, v in protocol.aggregator.global_state.items()}
    tensors.update({f"{MERGES}{k}": v for k, v in protocol.aggregator.merges_for(range(protocol.total_layers), 0).items()})
    meta: dict[str, object] = {"format": FORMAT, "round": round_index, "step_index": protocol.step_index,
                               "base_loss": base_loss, "merges": protocol.aggregator.version,
                               "protocol_state": protocol.export_protocol_state()}
    if wall_s is not None:
        meta["wall_s"] = wall_s
    tensors.update({f"{LINK}{k}": v for k, v in protocol.link.export_state().items()})
    for name, role in protocol.workers.items():
        try:
            role_tensors, role_meta = role.export_state()
        except DeviceDropped as error:  # an unreachable device restarts from the global adapter
            log.warning("checkpoint of round %d lacks %s: %s", round_index, name, error.reason)
            continue
        tensors.update({f"{name}/{k}": v for k, v in role_tensors.items()})
        meta[name] = role_meta
    meta["rng"] = flatten("rng", torch.get_rng_state(), tensors)

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"round-{round_index:04d}"
    staging = directory / f".staging-{round_index:04d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file(tensors, staging / TENSORS_FILE)
    (staging / META_FILE).write_text(json.dumps(meta))
    _write_manifest(staging)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    (directory / f"{LATEST}.tmp").write_text(final.name)
    os.replace(directory / f"{LATEST}.tmp", directory / LATEST)
    if keep > 0:
        prune_checkpoints(directory, round_index, keep)
    return final


def prune_checkpoints(directory: Path, newest: int, keep: int) -> None:
    """Delete the round checkpoints other than rounds ``newest - keep + 1 .. newest``."""
    for path in _rounds(directory):
        index = _round_index(path.name)
        if index > newest or index <= newest - keep:
            shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(directory: Path, name: str | None = None) -> Path:
    """The checkpoint a resume would use (``name``, or the one ``latest`` names), without reading it:
    raises ``FileNotFoundError`` when there is none and ``CorruptFileError`` when ``latest`` is damaged."""
    return _checkpoint_path(directory, name)


def checkpoint_wall_s(path: Path) -> float:
    """The run's wall-clock seconds up to checkpoint ``path`` (0 for checkpoints that did not record it)."""
    try:
        value = json.loads((path / META_FILE).read_text()).get("wall_s", 0.0)
    except (OSError, ValueError, AttributeError):
        return 0.0
    return float(value) if isinstance(value, (int, float)) else 0.0


def load_checkpoint(protocol: Protocol, directory: Path, name: str | None = None) -> tuple[int, float]:
    """Restore a checkpoint into ``protocol``; return (next round, base eval loss).

    ``name`` (``round-NNNN``) picks one; None takes the one ``latest`` names. The checkpoint
    is verified against its manifest first: a damaged one raises ``CorruptFileError`` naming
    the file and the newest older checkpoint that verifies."""
    path = _checkpoint_path(directory, name)
    try:
        tensors, meta = _read_checkpoint(path, warn=True)
    except _Damaged as damage:
        raise _refusal(directory, damage, path.name) from None
    protocol.aggregator.global_state = {k[len("global/"):]: v for k, v in tensors.items() if k.startswith("global/")}
    merges: list[dict[str, torch.Tensor]] = [{} for _ in range(int(meta.get("merges", 0)))]
    for name, tensor in tensors.items():
        if name.startswith(MERGES):
            version, key = split_merge_key(name[len(MERGES):])
            merges[version][key] = tensor
    protocol.aggregator.merges = merges
    protocol.merged = {}  # every role is sent every merge again; a base that holds them skips them
    protocol.merge_local()
    protocol.import_protocol_state(meta.get("protocol_state", {}))
    protocol.link.import_state({k[len(LINK):]: v for k, v in tensors.items() if k.startswith(LINK)})
    for worker, role in protocol.workers.items():
        if worker not in meta:
            continue
        prefix = f"{worker}/"
        role.import_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta[worker])
    torch.set_rng_state(unflatten(meta["rng"], tensors))
    protocol.step_index = meta["step_index"]
    log.info("resuming from checkpoint %s (round %d done)", path, meta["round"])
    return meta["round"] + 1, meta["base_loss"]


class _Damaged(Exception):
    """One checkpoint file that failed verification (internal: becomes a CorruptFileError)."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(directory: Path) -> None:
    files = {name: {"size": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
             for name in (TENSORS_FILE, META_FILE)}
    (directory / MANIFEST_FILE).write_text(json.dumps({"format": FORMAT, "files": files}, indent=1))


def _round_index(name: str) -> int | None:
    match = _ROUND_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def _rounds(directory: Path) -> list[Path]:
    """The round checkpoints in ``directory``, oldest first."""
    found = [p for p in directory.iterdir() if p.is_dir() and _round_index(p.name) is not None] if directory.is_dir() else []
    return sorted(found, key=lambda p: _round_index(p.name))


def _checkpoint_path(directory: Path, name: str | None) -> Path:
    """The checkpoint directory to resume from: ``name``, or the one ``latest`` names."""
    available = ", ".join(p.name for p in _rounds(directory)) or "none"
    if name is not None:
        index = _round_index(name) if not name.isdigit() else int(name)
        if index is None:
            raise FileNotFoundError(f"checkpoint {name!r}: expected a name like round-0001; in {directory}: {available}")
        path = directory / f"round-{index:04d}"
        if not path.is_dir():
            raise FileNotFoundError(f"no checkpoint {path.name} in {directory}; available: {available}")
        return path
    latest = directory / LATEST
    if not latest.is_file():
        fallback = _newest_verified(directory, before=None)
        hint = f"; the newest checkpoint there that verifies is {fallback}: {_how_to_resume(fallback)}" if fallback else ""
        raise FileNotFoundError(f"no checkpoint to resume from in {directory} (no {LATEST!r} file){hint}")
    try:
        target = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise _refusal(directory, _Damaged(latest, f"unreadable ({error})")) from None
    if _round_index(target) is None:
        raise _refusal(directory, _Damaged(latest, f"damaged (it holds {target[:40]!r}, not a round-NNNN name)"))
    path = directory / target
    if not path.is_dir():
        raise _refusal(directory, _Damaged(latest, f"stale (it names {target}, which does not exist)"),
                       before=_round_index(target))
    return path


def _read_checkpoint(path: Path, warn: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """Verify one checkpoint directory against its manifest and read it; raise ``_Damaged``."""
    manifest_path = path / MANIFEST_FILE
    verified = manifest_path.is_file()
    if verified:
        try:
            files = json.loads(manifest_path.read_text())["files"]
            entries = {name: (int(files[name]["size"]), str(files[name]["sha256"])) for name in (TENSORS_FILE, META_FILE)}
        except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise _Damaged(manifest_path, f"not a valid manifest ({_short(error)})") from None
        for name, (size, digest) in entries.items():
            file = path / name
            if not file.is_file():
                raise _Damaged(file, "missing (listed in the manifest)")
            actual = file.stat().st_size
            if actual != size:
                raise _Damaged(file, f"truncated or overwritten ({actual} bytes where the manifest says {size})")
            if _sha256(file) != digest:
                raise _Damaged(file, "corrupted (its SHA-256 differs from the manifest's)")
    for name in (TENSORS_FILE, META_FILE):
        if not (path / name).is_file():
            raise _Damaged(path / name, "missing")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except ValueError as error:
        raise _Damaged(path / META_FILE, f"not valid JSON ({_short(error)})") from None
    wanted = ("round", "step_index", "base_loss", "rng")
    if not isinstance(meta, dict) or any(key not in meta for key in wanted):
        raise _Damaged(path / META_FILE, f"not checkpoint state (expected an object with {', '.join(wanted)})")
    if not verified and meta.get("format", 1) >= FORMAT:
        raise _Damaged(manifest_path, "missing (this checkpoint was written with one)")
    try:
        tensors = load_file(path / TENSORS_FILE)
    except (SafetensorError, OSError) as error:
        raise _Damaged(path / TENSORS_FILE, f"truncated or corrupt (safetensors: {_short(error)})") from None
    if not verified and warn:
        log.warning("checkpoint %s has no %s (written by an older splitfed); not verified", path, MANIFEST_FILE)
    return tensors, meta


def _short(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _newest_verified(directory: Path, before: int | None) -> str | None:
    """The newest round checkpoint older than round ``before`` (any, if None) that verifies."""
    for path in reversed(_rounds(directory)):
        if before is not None and _round_index(path.name) >= before:
            continue
        try:
            _read_checkpoint(path, warn=False)
        except _Damaged:
            continue
        return path.name
    return None


def _how_to_resume(name: str) -> str:
    return f"resume from it with `--resume-from {name}` (Python: run(..., resume_from={name!r}))"


def _refusal(directory: Path, damage: _Damaged, name: str | None = None, before: int | None = None) -> CorruptFileError:
    """The error for checkpoint ``name`` (or ``latest``) that cannot be used, naming the way back: the newest
    checkpoint older than ``name`` (or round ``before``) that verifies."""
    what = f"cannot resume from checkpoint {name}" if name is not None else "cannot resume"
    fallback = _newest_verified(directory, before=_round_index(name) if name is not None else before)
    if fallback:
        advice = (f"the newest older checkpoint that verifies is {fallback}: {_how_to_resume(fallback)}; "
                  "the rounds after it are trained again")
    else:
        advice = f"no older checkpoint in {directory} verifies; start the run again with --overwrite instead of --resume"
    return CorruptFileError(f"{what}: {damage.path} is {damage.problem}; {advice}")
