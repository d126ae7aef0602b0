"""Evaluate and generate from a finished run, loading its exported artefacts as a user would.

The run directory's ``config.json`` names the base model (``model.source``); the adapter in
``RUN_DIR/adapter`` is PEFT's format and is loaded with ``PeftModel.from_pretrained``. A run that
merged its aggregates into the base (``aggregation.method = "stack"``) is evaluated from its
``RUN_DIR/merged`` model directory instead (its adapter is a low-rank approximation of it). Nothing here
uses the protocol's roles: what is measured is what was exported.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splitfed.config import ConfigError, RunConfig, parse_config
from splitfed.data.batches import IGNORE_INDEX, TokenDataset, tokenize_document
from splitfed.data.sources import load_documents
from splitfed.export import MERGED_DIR, heldout_loss, load_exported_adapter
from splitfed.models.loading import load_model, load_tokenizer
from splitfed.run import build_data, plan_run

MAX_PPL_LOSS = 50.0  # like run.py: perplexity of a diverged loss is capped, not inf


def load_run_config(run_dir: Path) -> RunConfig:
    """The run's config, from ``RUN_DIR/config.json`` (the ``resolved`` block is the engine's, not the user's)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a run directory (no config.json; run `splitfed run` first)")
    tree = json.loads(path.read_text())
    tree.pop("resolved", None)
    return parse_config(tree)


def load_run_model(run_dir: Path, config: RunConfig | None = None):
    """(model, tokenizer): the base model of ``config.model.source`` with the run's exported adapter."""
    config = config or load_run_config(run_dir)
    merged = run_dir / MERGED_DIR
    if (merged / "config.json").is_file():  # a stack run: the merged model is the trained one, exactly
        return load_model(str(merged)).eval(), load_tokenizer(config.model.source)
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: no exported adapter (the run has not finished)")
    return load_exported_adapter(config.model.source, adapter), load_tokenizer(config.model.source)


def eval_rows(run_dir: Path, config: RunConfig, tokenizer, data: Path | None) -> TokenDataset:
    """The rows to evaluate: the run's own eval set (rebuilt exactly as the run built it), or every
    row of ``data`` (a .jsonl/.txt file or a directory of them) at the run's ``seq_len``."""
    if data is None:
        return build_data(plan_run(config), tokenizer).eval
    documents = load_documents(str(data))
    # the run's own data options (truncation policy, chat template) where this version has them
    options = {k: getattr(config.data, k) for k in ("truncation", "template") if hasattr(config.data, k)}
    rows = [tokenize_document(doc, tokenizer, config.train.seq_len, **options) for doc in documents]
    rows = [r for r in rows if len(r)]
    if not rows:
        raise ConfigError(f"--data {data}: no rows at train.seq_len = {config.train.seq_len}")
    return TokenDataset.concat(rows)


@dataclass
class Example:
    prompt_ids: list[int]
    reference_ids: list[int]


def prompt_completion_examples(rows: TokenDataset, eos_id: int | None) -> list[Example]:
    """Prompt/completion rows as (prompt, reference): the prompt is the tokens before the first
    loss-bearing label, the reference the first contiguous run of loss-bearing labels (EOS dropped; in a
    multi-turn chat row, the first assistant turn). Plain-text rows (loss on every token) have no prompt
    and give no example."""
    examples = []
    for ids, labels, mask in zip(rows.input_ids.tolist(), rows.labels.tolist(), rows.attention_mask.tolist()):
        first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if first is None or first == 0 or not mask[first - 1]:
            continue
        end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
        reference = [label for label in labels[first:end] if label != eos_id]  # a chat's first assistant turn
        examples.append(Example(ids[:first], reference))
    return examples


def generate_ids(model, prompt_ids: list[int], *, max_new_tokens: int, beams: int, eos_id: int | None,
                 pad_id: int | None) -> list[int]:
    """Greedy (``beams == 1``) or beam-search continuation of one prompt, EOS and after removed."""
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=beams,
                             eos_token_id=eos_id, pad_token_id=pad_id if pad_id is not None else eos_id)
    new = out[0, len(prompt_ids):].tolist()
    if eos_id is not None and eos_id in new:
        new = new[: new.index(eos_id)]
    return new


def generation_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu) and mean ROUGE-L F1 (rouge-score), all on a 0-100 scale."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)]
    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
        "rougeL": 100.0 * sum(rouge) / max(len(rouge), 1),
    }


def evaluate_run(run_dir: Path, data: Path | None = None, *, beams: int = 1, max_new_tokens: int = 64,
                 max_examples: int = 100) -> dict[str, Any]:
    """Held-out loss and perplexity of the exported adapter; for prompt/completion rows also BLEU,
    chrF and ROUGE-L of up to ``max_examples`` decoded completions."""
    if beams < 1:
        raise ConfigError(f"--beams must be at least 1, got {beams}")
    config = load_run_config(run_dir)
    model, tokenizer = load_run_model(run_dir, config)
    rows = eval_rows(run_dir, config, tokenizer, data)
    loss, tokens = heldout_loss(model, rows, config.train.eval_batch_size)
    scores: dict[str, Any] = {
        "data": str(data) if data is not None else "run eval set",
        "rows": len(rows),
        "tokens": tokens,
        "loss": loss,
        "ppl": math.exp(min(loss, MAX_PPL_LOSS)),
    }
    eos_id = tokenizer.eos_token_id
    examples = prompt_completion_examples(rows, eos_id)[:max_examples]
    if examples:
        hypotheses, references = [], []
        for example in examples:
            new = generate_ids(model, example.prompt_ids, max_new_tokens=max_new_tokens, beams=beams, eos_id=eos_id,
                               pad_id=tokenizer.pad_token_id)
            hypotheses.append(tokenizer.decode(new, skip_special_tokens=True).strip())
            references.append(tokenizer.decode(example.reference_ids, skip_special_tokens=True).strip())
        scores.update(generation_scores(hypotheses, references))
        scores.update({"generated": len(examples), "beams": beams, "max_new_tokens": max_new_tokens,
                       "samples": [{"reference": r, "generated": h} for r, h in zip(references[:3], hypotheses[:3])]})
    return scores


def write_eval(run_dir: Path, scores: dict[str, Any]) -> None:
    """Store ``scores`` in ``RUN_DIR/summary.json`` under ``eval`` (replacing an earlier evaluation)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no summary (the run has not finished)")
    summary = json.loads(path.read_text())
    summary["eval"] = scores
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(summary, indent=2))
    staging.replace(path)


def generate_text(run_dir: Path, prompt: str, *, max_new_tokens: int = 64, beams: int = 1) -> str:
    """The completion of ``prompt`` by the base model with the run's adapter (greedy unless ``beams > 1``).
    With ``data.template = "chat"`` the prompt is wrapped in the tokenizer's chat template as a user turn."""
    config = load_run_config(run_dir)
    model, tokenizer = load_run_model(run_dir, config)
    if getattr(config.data, "template", None) == "chat" and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    else:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError("--prompt is empty")
    new = generate_ids(model, ids, max_new_tokens=max_new_tokens, beams=beams, eos_id=tokenizer.eos_token_id,
                       pad_id=tokenizer.pad_token_id)
    return tokenizer.decode(new, skip_special_tokens=True)
