"""After a run: eval and generate from the exported artefacts, compare run directories, TensorBoard
events, and the run's plots and summary warnings."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from splitfed.cli import app
from splitfed.data.batches import TokenDataset, tokenize_document
from splitfed.data.sources import Document, Record
from splitfed.evaluate import generation_scores, prompt_completion_examples
from splitfed.models.loading import load_model, load_tokenizer
from splitfed.report import print_summary, write_plots
from splitfed.run import run
from tests.conftest import tiny_run_config

runner = CliRunner()

PROTOCOLS = {
    "sfl": {"devices": {"count": 4, "cuts": [2]}},
    "memsfl": {"devices": {"count": 4, "cuts": [1, 2, 4]}},
    "hsplitlora": {"devices": {"count": 3, "cuts": [], "memory_mb": [1.0, 2.0, 4.0]}, "aggregation": {"method": "stack"}},
    "centralized": {"devices": {"count": 4, "cuts": [2]}},
}


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, corpus_dir, tmp_path_factory):
    """Three finished tiny runs (the sfl one with TensorBoard on)."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for protocol, sections in PROTOCOLS.items():
        tracking = {"tracking": {"tensorboard": True}} if protocol == "sfl" else {}
        config = tiny_run_config(tiny_llama_dir, corpus_dir, protocol, **sections, **tracking)
        run(config, base / protocol, progress=False)
        out[protocol] = base / protocol
    return out


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_eval_reproduces_the_reported_eval_loss(runs):
    for protocol in ("sfl", "memsfl", "hsplitlora"):  # hsplitlora: from merged/
        result = runner.invoke(app, ["eval", str(runs[protocol]), "--write"])
        assert result.exit_code == 0, result.output
        assert "ppl" in result.output
        summary = _summary(runs[protocol])
        scores = summary["eval"]
        assert scores["loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-5)
        assert scores["ppl"] == pytest.approx(math.exp(scores["loss"]))
        assert scores["data"] == "run eval set"
        assert "bleu" not in scores  # plain text: no prompts, no generation metrics


def test_eval_on_prompt_completion_data_writes_generation_metrics(runs, tmp_path):
    data = tmp_path / "qa.jsonl"
    pairs = [("Who said it? ", "Hamlet"), ("Where? ", "Rome"), ("When? ", "winter"), ("Why? ", "to be")]
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    run_dir = runs["centralized"]
    result = runner.invoke(app, ["eval", str(run_dir), "--data", str(data), "--write", "--max-new-tokens", "6",
                                 "--beams", "2"])
    assert result.exit_code == 0, result.output
    scores = _summary(run_dir)["eval"]
    assert scores["data"] == str(data) and scores["rows"] == 4 and scores["generated"] == 4 and scores["beams"] == 2
    for key in ("bleu", "chrf", "rougeL"):
        assert 0.0 <= scores[key] <= 100.0, key
    assert math.isfinite(scores["loss"]) and scores["tokens"] > 0
    assert [s["reference"].replace(" ", "") for s in scores["samples"]] == ["Hamlet", "Rome", "winter"]


def test_generation_scores_are_100_for_exact_answers_and_low_for_wrong_ones():
    refs = ["the cat sat on the mat", "to be or not to be"]
    perfect = generation_scores(refs, refs)
    assert perfect == pytest.approx({"bleu": 100.0, "chrf": 100.0, "rougeL": 100.0})
    wrong = generation_scores(["a dog ran", "xyz"], refs)
    assert all(wrong[k] < 30 for k in wrong)


def test_prompt_completion_rows_give_prompt_and_reference(tiny_llama_dir):
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    doc = Document("qa", (Record("Q: hi", "A: yo"), Record("Q: x", "A: zz")))
    rows = tokenize_document(doc, tokenizer, 16)
    examples = prompt_completion_examples(rows, tokenizer.eos_token_id)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert [(e.prompt_ids, e.reference_ids) for e in examples] == [
        (encode("Q: hi"), encode("A: yo")), (encode("Q: x"), encode("A: zz"))]
    text = tokenize_document(Document("t", (Record("", "plain text " * 5),)), tokenizer, 16)
    assert prompt_completion_examples(text, tokenizer.eos_token_id) == []
    # a two-turn chat row (loss on both assistant turns): the reference is the first assistant turn
    ids = torch.tensor([[10, 11, 12, 13, 1, 14, 15, 16, 1, 1]])
    labels = torch.tensor([[-100, -100, 12, 13, 1, -100, -100, 16, 1, -100]])
    mask = torch.tensor([[1] * 9 + [0]])
    chat = prompt_completion_examples(TokenDataset(ids, labels, mask), eos_id=1)
    assert [(e.prompt_ids, e.reference_ids) for e in chat] == [([10, 11], [12, 13])]


def test_generate_prints_a_completion(runs):
    result = runner.invoke(app, ["generate", str(runs["sfl"]), "--prompt", "To be, or not", "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert result.output.strip()
    missing = runner.invoke(app, ["generate", str(runs["sfl"].parent / "nope"), "--prompt", "x"])
    assert missing.exit_code == 2 and "not a run directory" in missing.output


def test_auto_peft_loads_the_exported_adapter(runs):
    from peft import AutoPeftModelForCausalLM, PeftModel

    adapter = runs["memsfl"] / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    auto = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
    source = json.loads((runs["memsfl"] / "config.json").read_text())["model"]["source"]
    manual = PeftModel.from_pretrained(load_model(source), str(adapter)).eval()
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    with torch.no_grad():
        torch.testing.assert_close(auto(input_ids=ids).logits, manual(input_ids=ids).logits)
        plain = load_model(source)(input_ids=ids).logits
    assert not torch.allclose(auto(input_ids=ids).logits, plain)  # the adapter is applied


def test_compare_writes_table_and_plots(runs, tmp_path):
    out = tmp_path / "cmp"
    dirs = [str(runs[p]) for p in PROTOCOLS]
    result = runner.invoke(app, ["compare", *dirs, "--out", str(out)])
    assert result.exit_code == 0, result.output
    markdown = (out / "compare.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| |"))
    assert header == "| | " + " | ".join(PROTOCOLS) + " |"
    for row in ("protocol", "cuts", "LoRA ranks", "final perplexity", "bytes up (MB)", "bytes down (MB)",
                "peak memory device (MB)", "peak memory server (MB)", "trainable params device",
                "simulated time (s)", "wall time (s)"):
        assert f"| {row} |" in markdown, row
    final = [f"{_summary(runs[p])['final_eval_ppl']:.2f}" for p in PROTOCOLS]
    assert f"| final perplexity | {' | '.join(final)} |" in markdown
    for name in ("compare_ppl_round.png", "compare_ppl_bytes.png", "compare_ppl_sim.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "final perplexity" in result.output
    missing = runner.invoke(app, ["compare", dirs[0], str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "summary.json" in missing.output


def test_tensorboard_events_hold_the_metrics_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = runs["sfl"] / "tensorboard"
    assert list(events.glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"round/eval_loss", "round/eval_ppl", "round/bytes_up", "round/sim_s", "step/loss/device_0",
            "step/loss/device_3"} <= tags
    records = [json.loads(line) for line in (runs["sfl"] / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["kind"] == "round"]
    logged = [(e.step, e.value) for e in accumulator.Scalars("round/eval_loss")]
    assert logged == [(r["round"], pytest.approx(r["eval_loss"], rel=1e-6)) for r in rounds]
    assert not (runs["memsfl"] / "tensorboard").exists()  # off by default


def test_loss_plot_has_integer_steps_round_boundaries_and_device_lines(runs, tmp_path, monkeypatch):
    import splitfed.report as report

    figures = []
    monkeypatch.setattr(report.plt, "close", figures.append)
    records = [json.loads(line) for line in (runs["sfl"] / "metrics.jsonl").read_text().splitlines()]
    write_plots(records, _summary(runs["sfl"]), tmp_path)
    loss_axes = figures[0].axes[0]
    labels = [line.get_label() for line in loss_axes.get_lines()]
    assert [f"device {d}" for d in range(4)] + ["mean over devices", "round boundary"] == labels
    boundary = loss_axes.get_lines()[-1]
    assert boundary.get_linestyle() == "--" and list(boundary.get_xdata()) == [3.5, 3.5]  # 3 local steps
    ticks = [t for t in loss_axes.get_xticks() if loss_axes.get_xlim()[0] <= t <= loss_axes.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    bytes_axes = figures[2].axes[0]
    assert len(bytes_axes.patches) == 2 * 2  # up and down bars for each of the 2 rounds


def test_plots_of_a_one_round_run_and_the_divergence_warning(runs, tmp_path):
    records = [json.loads(line) for line in (runs["sfl"] / "metrics.jsonl").read_text().splitlines()]
    summary = _summary(runs["sfl"])
    write_plots([r for r in records if r.get("round", 0) == 0], summary, tmp_path)
    for name in ("loss.png", "perplexity.png", "bytes.png", "memory.png"):
        assert (tmp_path / name).stat().st_size > 1000, name

    console = Console(record=True, width=200)
    print_summary(summary, tmp_path, console)
    assert "% lower" in console.export_text() and "warning" not in console.export_text()
    for final_loss in (summary["base_eval_loss"] + 20.0, float("nan")):
        diverged = {**summary, "final_eval_loss": final_loss, "final_eval_ppl": math.exp(min(final_loss, 50.0)),
                    "ppl_reduction": 1.0 - math.exp(min(final_loss, 50.0)) / summary["base_eval_ppl"]}
        console = Console(record=True, width=200)
        print_summary(diverged, tmp_path, console)
        text = console.export_text()
        assert "warning:" in text and "lower" not in text.split("warning:")[0], text
