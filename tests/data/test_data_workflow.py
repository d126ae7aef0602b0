"""Data you can see: the truncation policy and its counts, chat records with loss on the assistant turns,
a separate eval file that is never trained on, and `splitfed data`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from splitfed.cli import app
from splitfed.config import ConfigError
from splitfed.data.batches import IGNORE_INDEX, tokenize_records
from splitfed.data.sources import DataError, Document, Record, load_documents
from splitfed.run import build_data, plan_run
from tests.conftest import char_tokenizer, tiny_run_config

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def chars(ids, skip_special: bool = False) -> str:
    """The text of character-level token ids (``decode`` would put spaces between the characters)."""
    tokens = char_tokenizer().convert_ids_to_tokens([int(i) for i in ids])
    return "".join(t for t in tokens if not (skip_special and t in ("<eos>", "<unk>")))


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def qa_records() -> list[dict]:
    """10 records of which 3 are longer than 32 characters (= tokens) with EOS, and one has no completion."""
    short = [{"prompt": f"Q{i}?", "completion": f" answer {i}"} for i in range(6)]
    long = [{"prompt": "Why " * 8 + f"{i}?", "completion": " because " * 3 + f"END{i}"} for i in range(3)]
    return [*short, *long, {"prompt": "nothing?", "completion": ""}]


@pytest.mark.parametrize("policy", ["keep_end", "drop", "error"])
def test_long_records_follow_the_policy_and_are_counted(tiny_llama_dir, tmp_path, policy):
    source = write_jsonl(tmp_path / "qa.jsonl", qa_records())
    config = tiny_run_config(tiny_llama_dir, source, "memsfl",
                             data={"truncation": policy, "partition": "iid", "eval_fraction": 0.2},
                             devices={"count": 2, "cuts": [2]})
    if policy == "error":
        with pytest.raises(ConfigError, match=r"qa\.jsonl:7: the record is \d+ tokens, longer than train\.seq_len = 32"):
            build_data(plan_run(config), char_tokenizer())
        return
    data = build_data(plan_run(config), char_tokenizer())
    report = data.report.to_dict()
    records = report["records"]
    assert records["records"] == 10 and records["whole"] == 6
    if policy == "keep_end":
        assert records["truncated"] == 3 and records["dropped_by_reason"] == {"empty completion": 1}
    else:
        assert records["truncated"] == 0
        assert records["dropped_by_reason"] == {"empty completion": 1, "longer than seq_len": 3}
    kept = records["whole"] + records["truncated"]
    assert sum(d["rows"] for d in report["devices"]) + report["eval"]["rows"] == kept
    assert sum(d["truncated_rows"] for d in report["devices"]) + report["eval"]["truncated_rows"] == records["truncated"]
    rows = torch.cat([*(d.input_ids for d in data.train), data.eval.input_ids])  # (kept, seq)
    texts = [chars(r, skip_special=True) for r in rows]
    ends = [t for t in texts if "END" in t]
    if policy == "keep_end":  # the completion's end survives, the prompt's start is cut
        assert sorted(t[-4:] for t in ends) == ["END0", "END1", "END2"]
        assert all(not t.startswith("Why") for t in ends)
    else:
        assert ends == []


def test_summary_entry_is_json(tiny_llama_dir, tmp_path):
    source = write_jsonl(tmp_path / "qa.jsonl", qa_records())
    config = tiny_run_config(tiny_llama_dir, source, "memsfl", data={"partition": "iid"},
                             devices={"count": 2, "cuts": [2]})
    report = build_data(plan_run(config), char_tokenizer()).report.to_dict()
    assert json.loads(json.dumps(report)) == report
    assert report["truncation"] == "keep_end" and report["eval"]["source"] == "tail of each document"


def chat_tokenizer():
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_chat_records_have_loss_on_assistant_turns_only(tmp_path):
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                    {"role": "assistant", "content": "ciao"}]
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}, {"prompt": "2+2?", "completion": "4"}])
    (doc,) = load_documents(source)
    tokenizer = chat_tokenizer()
    ds, counts, _ = tokenize_records(doc, tokenizer, 96, template="chat")
    assert len(ds) == 2 and counts.whole == 2
    for row, expected_text, assistant in (
        (0, "<system>be brief\n<user>hi\n<assistant>hello\n<user>bye\n<assistant>ciao\n", ["hello\n", "ciao\n"]),
        (1, "<user>2+2?\n<assistant>4\n", ["4\n"]),
    ):
        ids, labels = ds.input_ids[row], ds.labels[row]
        n = int(ds.attention_mask[row].sum())
        assert chars(ids[:n]) == expected_text
        spans, start = [], 0  # the assistant contents' character (= token) spans in the rendered text
        for text in assistant:
            start = expected_text.index("<assistant>" + text, start) + len("<assistant>")
            spans.append(range(start, start + len(text)))
        expected = [int(ids[i]) if any(i in s for s in spans) else IGNORE_INDEX for i in range(ds.seq_len)]
        assert labels.tolist() == expected
    with pytest.raises(DataError, match="needs data.template = 'chat'"):
        tokenize_records(doc, tokenizer, 96)
    with pytest.raises(DataError, match="no chat template"):
        tokenize_records(doc, char_tokenizer(), 96, template="chat")


@pytest.mark.parametrize(
    ("messages", "detail"),
    [([], "(empty)"), ([{"role": "robot", "content": "x"}], "role 'robot'"),
     ([{"role": "user", "content": 3}], "content of type int"), ([{"role": "user", "content": "x"}], "no assistant")],
)
def test_malformed_messages_name_file_and_line(tmp_path, messages, detail):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError) as err:
        load_documents(str(path))
    assert str(err.value).startswith("bad.jsonl:2") and detail in str(err.value)


def test_chat_run_config_trains_on_assistant_tokens(tiny_llama_dir, tmp_path):
    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}!"}]}
               for i in range(12)]
    source = write_jsonl(tmp_path / "chat.jsonl", records)
    config = tiny_run_config(tiny_llama_dir, source, "memsfl", data={"template": "chat", "partition": "iid"},
                             devices={"count": 2, "cuts": [2]})
    data = build_data(plan_run(config), chat_tokenizer())
    for ds in (*data.train, data.eval):
        for ids, labels in zip(ds.input_ids, ds.labels):
            assert chars(ids[labels != IGNORE_INDEX]).endswith("!\n")


def test_eval_source_is_the_only_eval_data_and_never_trained_on(tiny_llama_dir, corpus_dir, tmp_path):
    eval_file = tmp_path / "held_out.jsonl"
    write_jsonl(eval_file, [{"text": f"EVALONLY {i} " + "marker text " * 8} for i in range(6)])
    config = tiny_run_config(tiny_llama_dir, corpus_dir, "memsfl", data={"eval_source": str(eval_file)})
    data = build_data(plan_run(config), char_tokenizer())
    decode = chars
    eval_texts = [decode(r) for r in data.eval.input_ids]
    assert eval_texts and all(set(t) <= set("EVALONLY 0123456789marker text<eos>") for t in eval_texts)
    assert any("EVALONLY" in t for t in eval_texts)
    for ds in data.train:
        for row in ds.input_ids:
            text = decode(row)
            assert "EVAL" not in text and "marker" not in text
    # every row of the training documents is trained on: no tail is held out
    seq = config.train.seq_len
    expected = sum(len(text) // seq for text in (p.read_text() for p in corpus_dir.iterdir()))
    assert sum(len(ds) for ds in data.train) == expected
    assert data.report.eval["source"] == "data.eval_source" and data.report.eval_records.records == 6


def test_directory_with_an_eval_file_is_refused(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    write_jsonl(tmp_path / "eval.jsonl", [{"text": "b"}])
    with pytest.raises(DataError, match=r"holds eval\.jsonl.*data\.eval_source"):
        load_documents(str(tmp_path))
    assert [d.name for d in load_documents(str(tmp_path / "eval.jsonl"), setting="data.eval_source")] == ["eval"]


def test_splitfed_data_prints_the_table(tiny_llama_dir, tmp_path):
    source = write_jsonl(tmp_path / "qa.jsonl", qa_records())
    config = tmp_path / "c.toml"
    config.write_text(f'protocol = "memsfl"\n[model]\nsource = "{tiny_llama_dir}"\n[data]\nsource = "{source}"\n'
                      'partition = "iid"\neval_chunks = 4\n[train]\nseq_len = 32\n[devices]\ncount = 2\ncuts = [2]\n')
    result = CliRunner().invoke(app, ["data", str(config), "--set", 'data.truncation="drop"'])
    assert result.exit_code == 0, result.output
    for text in ("device 0", "device 1", "eval (tail of each document)", "rows", "tokens", "truncated rows",
                 "records: 10; kept whole 6, truncated 0 (drop), dropped 4",
                 "1 empty completion", "3 longer than seq_len"):
        assert text in result.output, text
    failed = CliRunner().invoke(app, ["data", str(config), "--set", 'data.truncation="error"'])
    assert failed.exit_code == 2 and "qa.jsonl:7" in failed.output


def test_plain_document_rows_are_unchanged_by_the_policies(tokenizer):
    doc = Document("d", tuple(Record("", t) for t in ["x" * 100, "y" * 50]))
    for policy in ("keep_end", "drop", "error"):
        ds, counts, truncated = tokenize_records(doc, tokenizer, 16, truncation=policy)
        assert len(ds) == 9 and counts.chunked == 2 and counts.tail_tokens_dropped == 151 - 144
        assert truncated == [False] * 9


def test_run_summary_reports_the_data(tiny_llama_dir, tmp_path):
    from splitfed.run import run

    source = write_jsonl(tmp_path / "qa.jsonl", qa_records())
    config = tiny_run_config(tiny_llama_dir, source, "memsfl", data={"partition": "iid", "truncation": "drop"},
                             train={"rounds": 1, "local_steps": 1, "batch_size": 2},
                             devices={"count": 2, "cuts": [2]})
    summary = run(config, tmp_path / "run", progress=False)
    data = json.loads((tmp_path / "run" / "summary.json").read_text())["data"]
    assert data == summary["data"]
    assert data["truncation"] == "drop" and data["records"]["dropped_by_reason"]["longer than seq_len"] == 3
    assert [d["rows"] for d in data["devices"]] and data["eval"]["rows"] >= 1


def test_a_bad_eval_source_is_refused_before_any_weights_load(tiny_llama_dir, corpus_dir, tmp_path):
    config = tiny_run_config(tiny_llama_dir, corpus_dir, "memsfl", data={"eval_source": str(tmp_path / "missing.jsonl")})
    with pytest.raises(ConfigError, match="data.eval_source"):
        plan_run(config)  # reads the model's config and the data only
