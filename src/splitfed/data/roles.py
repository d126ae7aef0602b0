"""Speaking roles of play texts: the ``by_role`` partition's devices (as in the LEAF Shakespeare benchmark).

A play is a plain-text document whose body starts at its first ``ACT``, ``PROLOGUE`` or ``INDUCTION``
line (the title and the list of persons before it are front matter) and in which each speech follows a
speaker heading: a line of its own, after a blank line, such as ``HAMLET.``, ``Ham.``, ``KING RICHARD.``,
``MRS. PAGE.`` or ``1 Clown.`` (an all-capitals heading may omit the period, or carry the speech's first
words after it: ``NORFOLK. I thank your Grace,``). Stage directions in ``[brackets]`` are dropped (nested
ones too; an unclosed one ends at the next blank line); act, scene, song and epilogue lines, and capitals
lines that name no speaker (``THE END``), end the current speech. A mixed-case heading counts only when its
name heads at least two speeches or occurs in the front matter (``Ham.``: ``Hamlet, Son to ...``), so a
one-word verse line such as ``Farewell.`` after a blank line is not taken for a speaker. Text after a blank
line that is no heading (e.g. after an ``[Exit]``) continues the current speech. Spellings of one name that
differ only in case, spacing or the final period (``Lady Capulet.``, ``LADY CAPULET``) are one role.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from splitfed.data.sources import DataError, Document, Record

_NUMBERED = r"(?:THE\s+)?(?:ACT|Act|SCENE|Scene)\s+(?:[IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b"
_OPENING = r"(?:THE\s+|The\s+)?(?:PROLOGUE|Prologue|INDUCTION|Induction)\.?[ \t]*$"
_BODY_START = re.compile(rf"^(?:{_NUMBERED}|{_OPENING})", re.MULTILINE)
_SECTION = re.compile(  # "ACT I.", "Scene II. A room.", "EPILOGUE", "SONG.", a song's "II.": the speech ends
    rf"{_NUMBERED}|{_OPENING}|(?:EPILOGUE|Epilogue|SONG|Song|DUMB\s+SHOW|THE\s+END)\.?$|[IVXL]+\.$")
_STAGE_DIRECTION = re.compile(r"[\[{][^\[\]{}]*?(?:[\]}]|\n[ \t]*\n)")  # "[...]" ("{Aside.]" too), or to a blank line
_WORD = r"(?:\d+|[A-Z][A-Za-z'\-]*\.?)"  # "Ham.", "KING", "MRS.", "1"
_CONNECTOR = r"(?:and|of|the|de|du|la|le|&)"
_NAME = re.compile(rf"{_WORD}(?: (?:{_WORD}|{_CONNECTOR}))*")
_CAPS_INLINE = re.compile(r"([A-Z][A-Z'\-]*(?:\.? [A-Z][A-Z'\-]*)*)\.\s+(\S.*)")  # "NORFOLK. I thank your Grace,"
_MAX_NAME_WORDS, _MAX_NAME_CHARS = 5, 40
_REQUIRED = ("data.partition = 'by_role' needs play texts with speaker headings (a line such as 'HAMLET.' or "
             "'Ham.' before each speech, after an 'ACT I', 'PROLOGUE' or 'INDUCTION' line), e.g. "
             "data.source = 'shakespeare'")


@dataclass(frozen=True)
class Role:
    """One speaking role of one play: everything it says, speech after speech, one line per verse line."""

    play: str
    name: str
    text: str

    @property
    def document(self) -> Document:
        """The role as a plain-text document named ``<play>/<role>``."""
        return Document(f"{self.play}/{self.name}", (Record("", self.text, where=f"{self.play}: {self.name}"),))


def _key(name: str) -> str:
    """Case- and spacing-blind identity of a speaker name ("Lady  Montague." == "LADY MONTAGUE")."""
    return " ".join(name.upper().rstrip(".").split())


def _heading(line: str) -> str | None:
    """The speaker name if ``line`` (stripped, spaces collapsed) has the shape of a whole-line heading."""
    if (len(line) > _MAX_NAME_CHARS or len(line.split()) > _MAX_NAME_WORDS or not _NAME.fullmatch(line)
            or _SECTION.match(line)):
        return None
    if sum(c.isalpha() for c in line) < 2 or not (line.endswith(".") or line.isupper()):
        return None  # mixed case needs the period ("Ham."); "LYSANDER" may omit it
    return line.rstrip(".")


def _lines(body: str) -> list[str]:
    """The body without stage directions (nested ones too), each line stripped with runs of spaces collapsed."""
    removed = 1
    while removed:
        body, removed = _STAGE_DIRECTION.subn(lambda m: "" if m.group().endswith(("]", "}")) else "\n\n", body)
    return [" ".join(line.split()) for line in body.split("\n")]


def parse_play(text: str) -> list[tuple[str, str]]:
    """``(speaker, text)`` of every role of one play, in order of first speech; ``[]`` for a text that is not a
    play (no act/prologue/induction line, or no speaker heading). The speaker is its most frequent spelling."""
    start = _BODY_START.search(text)
    if start is None:
        return []
    front = " ".join(text[: start.start()].upper().split())
    lines = _lines(text[start.start():])

    # pass 1: whole-line headings after a blank line, with the speech on the next line
    seen: Counter[str] = Counter()
    capitals: set[str] = set()
    for before, line, after in zip(["", *lines], lines, [*lines[1:], ""]):
        name = _heading(line) if not before and after else None
        if name:
            seen[_key(name)] += 1
            if name.isupper():
                capitals.add(_key(name))
    known = {key for key, n in seen.items()
             if n >= 2 or key in capitals or re.search(rf"\b{re.escape(key)}", front)}

    # pass 2: every text line goes to the current speaker
    speeches: dict[str, list[str]] = {}
    spellings: dict[str, Counter[str]] = {}
    speaker: str | None = None
    for before, line in zip(["", *lines], lines):
        name, said = _heading(line), ""
        if name is None and (inline := _CAPS_INLINE.fullmatch(line)):
            name, said = inline.group(1), inline.group(2)
        if name and _key(name) in known and (not before or name.isupper()):
            speaker = _key(name)
            spellings.setdefault(speaker, Counter())[name] += 1
            speeches.setdefault(speaker, [])
        elif _SECTION.match(line) or (name and not said and name.isupper()):
            speaker = None  # an act, scene or song line, or a capitals line naming no speaker (a title)
        else:
            said = line
        if said and speaker is not None:
            speeches[speaker].append(said)
    return [(spellings[key].most_common(1)[0][0], "\n".join(text)) for key, text in speeches.items() if text]


def speaking_roles(documents: list[Document]) -> list[Role]:
    """Every speaking role of every play among ``documents``, play by play, in order of first speech.

    Documents that are not plays (poems, JSONL records) have no roles; if none has any, a ``DataError``
    says what ``by_role`` needs.
    """
    roles = [Role(doc.name, name, said) for doc in documents if doc.is_plain_text
             for name, said in parse_play("\n".join(r.completion for r in doc.records))]
    if not roles:
        names = ", ".join(d.name for d in documents[:5]) + (f" (+{len(documents) - 5})" if len(documents) > 5 else "")
        raise DataError(f"{_REQUIRED}; none of the {len(documents)} document(s) ({names}) has any: use "
                        "data.partition = 'by_document', 'iid' or 'dirichlet'")
    return roles
