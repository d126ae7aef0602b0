"""What a finished run leaves for its users: the PEFT adapter, and the merged base weights when the
aggregation merged into the base (``aggregation.method = "stack"``), with the held-out loss of each.

With merges, the trained model is no longer "original base + one LoRA" but the original base plus
the sum of every round's merge (``roles.aggregator``). Both forms are exported:

- ``RUN_DIR/merged/``: the base with every merge added, as a model directory (safetensors, config,
  tokenizer) that ``AutoModelForCausalLM.from_pretrained`` loads. This is exactly the model the
  run evaluated after its last round.
- ``RUN_DIR/adapter/``: a PEFT adapter against the original base. Per module the summed delta is
  factored by SVD at ``aggregation.export_rank``; exact where the delta's rank fits, otherwise the
  best approximation at that rank, with the measured relative error ||D - D_r||_F / ||D||_F (over all
  modules, and the worst module) written to summary.json under ``export``.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from splitfed.adapters.aggregate import A_SUFFIX, B_SUFFIX, low_rank_factors
from peft import LoraConfig

from splitfed.adapters.lora import AdapterState, save_peft_adapter
from splitfed.adapters.merge import merge_deltas
from splitfed.data.batches import TokenDataset, iterate_batches
from splitfed.models.families import family_for
from splitfed.models.loading import load_model, load_tokenizer

MERGED_DIR = "merged"
ADAPTER_DIR = "adapter"


def export_run(out: Path, source: str, model_dir: str, global_state: AdapterState, lora_config: LoraConfig,
               deltas: dict[str, torch.Tensor] | None, export_rank: int, rows: TokenDataset, batch_size: int) -> dict:
    """Write the run's artefacts into ``out``; for a merging run also return, for summary.json, the
    export's error and the held-out loss of each artefact as loaded back from disk.

    ``deltas``: module path -> the (out, in) sum of the merges, or None when the run did not merge
    (then the adapter is the global adapter as it is)."""
    if deltas is None:
        save_peft_adapter(global_state, lora_config, out / ADAPTER_DIR, model_dir)
        return {}
    save_merged_model(source, deltas, out / MERGED_DIR)
    scaling = lora_config.lora_alpha / lora_config.r
    state, report = low_rank_adapter(deltas, export_rank, scaling)
    config = copy.deepcopy(lora_config)
    config.r, config.lora_alpha = export_rank, scaling * export_rank
    save_peft_adapter(state, config, out / ADAPTER_DIR, model_dir)
    merged_loss, _ = heldout_loss(load_model(str(out / MERGED_DIR)), rows, batch_size)
    adapter_loss, _ = heldout_loss(load_exported_adapter(source, out / ADAPTER_DIR), rows, batch_size)
    return {"export": {"merged_dir": MERGED_DIR, "merged_eval_loss": merged_loss, "adapter_eval_loss": adapter_loss,
                       **report}}


def heldout_loss(model: nn.Module, rows: TokenDataset, batch_size: int) -> tuple[float, int]:
    """Mean loss per loss-bearing token of a causal LM (the same average the run reports) and the token count."""
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for batch in iterate_batches(rows, batch_size):
            count = batch.num_tokens
            if count == 0:
                continue
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
            loss_sum, tokens = loss_sum + float(out.loss) * count, tokens + count
    return loss_sum / max(tokens, 1), tokens


def low_rank_adapter(deltas: dict[str, torch.Tensor], rank: int, scaling: float) -> tuple[AdapterState, dict]:
    """A rank-``rank`` adapter whose scaling x B @ A approximates each module's (out, in) delta, and
    the relative Frobenius error of the approximation (all modules together, and the worst one)."""
    state: AdapterState = {}
    tail_total, norm_total, worst = 0.0, 0.0, 0.0
    for module, delta in sorted(deltas.items()):
        a, b, tail = low_rank_factors(delta.double() / scaling, rank)
        state[module + A_SUFFIX], state[module + B_SUFFIX] = a.float().contiguous(), b.float().contiguous()
        norm = float((delta.double() / scaling).pow(2).sum())
        tail_total, norm_total = tail_total + tail, norm_total + norm
        worst = max(worst, math.sqrt(tail / norm) if norm > 0 else 0.0)
    relative = math.sqrt(tail_total / norm_total) if norm_total > 0 else 0.0
    return state, {"adapter_rank": rank, "adapter_rel_error": relative, "adapter_max_module_rel_error": worst}


def save_merged_model(source: str, deltas: dict[str, torch.Tensor], directory: Path) -> None:
    """The base model of ``source`` with ``deltas`` added, saved as a model directory (safetensors + tokenizer)."""
    model = load_model(source)
    merge_deltas(model, {k: v.float() for k, v in deltas.items()}, family_for(model.config).fan_in_fan_out)
    model.save_pretrained(directory, safe_serialization=True)
    load_tokenizer(source).save_pretrained(directory)


def load_exported_adapter(source: str, directory: Path) -> nn.Module:
    """The base model of ``source`` with the PEFT adapter in ``directory``, ready to evaluate."""
    from peft import PeftModel

    with warnings.catch_warnings():  # PEFT asks transformers a deprecated question while it loads
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(load_model(source), str(directory))
    return model.eval()
