"""The ``by_role`` partition (LEAF-style Shakespeare): play parsing, one speaking role per device, eval never
trained on, the errors, and the role count of the shipped corpus."""

from __future__ import annotations

import random

import pytest
import torch

from splitfed.data.partition import build_federated_data
from splitfed.data.roles import parse_play, speaking_roles
from splitfed.data.sources import DataError, Document, Record, load_documents, shakespeare_dir
from splitfed.models.loading import WEIGHTS_FILE, resolve_source

# --- parsing: one snippet per layout of the Gutenberg play texts -------------------------------------------
PARSES = [
    ("caps-heading", "ACT I.\n\nHAMLET.\nTo be.\n", [("HAMLET", "To be.")]),
    ("caps-without-period", "ACT 1\n\nLYSANDER\nHow now.\n", [("LYSANDER", "How now.")]),
    ("abbreviation-twice", "ACT I.\n\nHam.\nTo be.\n\nHor.\nMy lord.\n\nHam.\nOr not.\n\nHor.\nAy.\n",
     [("Ham", "To be.\nOr not."), ("Hor", "My lord.\nAy.")]),
    ("abbreviation-in-front-matter", "Ophelia, a lady.\n\nACT I.\n\nOph.\nMy lord.\n", [("Oph", "My lord.")]),
    ("verse-line-is-no-heading", "ACT I.\n\nHAMLET.\nTo be.\n\n[Exit Ghost.]\n\nFarewell.\nGood night.\n",
     [("HAMLET", "To be.\nFarewell.\nGood night.")]),
    ("numbered-and-two-word", "ACT I.\n\n1 Clown.\nDig.\n\nMRS. PAGE.\nWhy.\n\n1 Clown.\nDig on.\n",
     [("1 Clown", "Dig.\nDig on."), ("MRS. PAGE", "Why.")]),
    ("inline-heading", "ACT I.\n\nBUCKINGHAM.\nWell met.\nNORFOLK. I thank your Grace,\nHealthful.\n\n"
     "NORFOLK.\nAy.\n", [("BUCKINGHAM", "Well met."), ("NORFOLK", "I thank your Grace,\nHealthful.\nAy.")]),
    ("stage-directions", "ACT I.\n\n[Enter KING,\n[with train].]\n\nKING.\nWelcome [Aside.] all.\n\n[Exeunt\n\n"
     "KING. [To the Queen]\nCome.\n", [("KING", "Welcome all.\nCome.")]),
    ("scene-and-song-end-a-speech", "ACT I.\n\nKING.\nHail.\n\nSCENE II. A heath.\n\nThunder and lightning.\n\n"
     "SONG.\nHey ho.\n\nKING.\nAgain.\n\nEPILOGUE\n\nGood night all.\n", [("KING", "Hail.\nAgain.")]),
    ("front-matter-skipped", "PERSONS REPRESENTED.\n\nKING.\nOf France.\n\nTHE PROLOGUE\n\nChor.\nTwo houses.\n\n"
     "Chor.\nBoth alike.\n", [("Chor", "Two houses.\nBoth alike.")]),
    ("spellings-merged", "ACT I.\n\nLady  Capulet.\nHo.\n\nLADY CAPULET\nHa.\n\nLady Capulet.\nHe.\n",
     [("Lady Capulet", "Ho.\nHa.\nHe.")]),
    ("poem-is-no-play", "I\n\nFrom fairest creatures we desire increase,\nThat thereby beauty's rose.\n", []),
]


@pytest.mark.parametrize(("text", "roles"), [p[1:] for p in PARSES], ids=[p[0] for p in PARSES])
def test_parse_play(text, roles):
    assert parse_play(text) == roles


# --- a synthetic corpus: each role speaks only its own letters --------------------------------------------
LETTERS = {"ALPHA": "ab", "BETA": "cd", "Gam": "ef", "DELTA": "gh", "Eps": "ij", "ZETA": "kl"}
COMEDY = {"ALPHA": "mn", "OMEGA": "op"}
NOT_SPOKEN = " \n.,"  # what a role's text holds besides its letters; directions and titles use x, y, z


def speech(rng: random.Random, letters: str, lines: int = 3) -> str:
    return "\n".join(" ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(6)) + ","
                     for _ in range(lines))


def tragedy(seed: int = 0) -> str:
    """Front matter, acts and scenes, stage directions (nested, unclosed, unbracketed), a song and the corpus'
    heading styles; ZETA says too little for one row of 16 characters, a verse line "Abab." looks like a heading."""
    rng = random.Random(seed)

    def say(role: str, lines: int = 3) -> str:
        return speech(rng, LETTERS[role], lines)

    return (f"THE TRAGEDY OF XYZZY\n\nPERSONS REPRESENTED.\n\nALPHA, a lord.\nBETA, a lady.\nEpsilon, a ghost.\n\n"
            f"SCENE: Xyz.\n\n\n\nACT I.\n\nSCENE I. Xyz. A yzx.\n\n[Enter ALPHA and BETA, [with XYZ].]\n\n"
            f"ALPHA.\n{say('ALPHA')}\n\n[Aside.]\n\nAbab.\n{say('ALPHA')}\n\nBETA\n{say('BETA')}\n\n[Exit BETA.]\n\n"
            f"Gam.\n{say('Gam')}\n\nDELTA.\n{say('DELTA')}\nALPHA. {say('ALPHA', 1)}\n{say('ALPHA')}\n\n"
            f"[Exeunt xyz\nyzx.\n\nSCENE II. Zyx.\n\nXyzzy yzx xyz.\n\nGam.\n{say('Gam')}\n\nSONG.\nxyz zyx.\n\n"
            f"DELTA.\n{say('DELTA')}\n\nZETA.\nkl.\n\nEps.\n{say('Eps', 6)}\n\nACT II.\n\nSCENE 1. Zxy.\n\n"
            f"[Enter BETA.]\n\nBETA\n{say('BETA')}\n\nZETA.\nlk.\n\nGam.\n{say('Gam')}\n\nEPILOGUE\n\nxyz yzx.\n\n"
            "THE END\n")


def comedy(seed: int = 1) -> str:
    rng = random.Random(seed)
    return "".join(f"\n{role}.\n{speech(rng, COMEDY[role])}\n" for role in ["ALPHA", "OMEGA"] * 2).join(
        ["THE COMEDY OF ZYX\n\nACT I.\n", "\nTHE END\n"])


CORPUS = [Document("comedy", (Record("", comedy()),)), Document("sonnets", (Record("", "I\n\nxyz, zyx.\n" * 20),)),
          Document("tragedy", (Record("", tragedy()),))]
QUALIFYING = [("comedy", "ALPHA"), ("comedy", "OMEGA"), ("tragedy", "ALPHA"), ("tragedy", "BETA"), ("tragedy", "Gam"),
              ("tragedy", "DELTA"), ("tragedy", "Eps")]  # in corpus order; tragedy's ZETA has no 16-token row


def build(tokenizer, num_devices: int = len(QUALIFYING), **overrides):
    settings = dict(num_devices=num_devices, seq_len=16, partition="by_role", dirichlet_alpha=0.5, eval_fraction=0.2,
                    eval_chunks=1000, max_train_chunks_per_device=0, seed=3)
    return build_federated_data(CORPUS, tokenizer, **(settings | overrides))


def texts(tokenizer, ds) -> list[str]:
    """The text of every row (one token per character)."""
    return ["".join(tokenizer.convert_ids_to_tokens(row)) for row in ds.input_ids.tolist()]


def alphabet(play: str, role: str) -> set[str]:
    return set((COMEDY if play == "comedy" else LETTERS)[role] + NOT_SPOKEN)


def test_corpus_roles():
    roles = speaking_roles(CORPUS)
    assert [(r.play, r.name) for r in roles] == [*QUALIFYING[:6], ("tragedy", "ZETA"), ("tragedy", "Eps")]
    for role in roles:
        assert set(role.text.lower()) <= alphabet(role.play, role.name), role


def test_one_role_per_device_and_only_its_text(tokenizer):
    data = build(tokenizer)
    devices = data.report.devices
    assert [(d["play"], d["role"]) for d in devices] == QUALIFYING  # all roles: corpus order
    assert data.device_documents == [[f"{play}/{role}"] for play, role in QUALIFYING]
    for device, rows in zip(devices, data.train):
        text = "".join(texts(tokenizer, rows))
        assert len(rows) > 0 and set(text.lower()) <= alphabet(device["play"], device["role"]), device
    assert data.report.eval["source"] == "tail of each speaking role"


@pytest.mark.parametrize("eval_source", [False, True], ids=["role-tails", "eval-source"])
def test_eval_text_is_never_trained_on(tokenizer, eval_source):
    held_out = [Document("held", (Record("", speech(random.Random(9), "qrst", 30)),))] if eval_source else None
    data = build(tokenizer, eval_documents=held_out)
    trained = ["".join(texts(tokenizer, rows)) for rows in data.train]  # each device: its role's text, in order
    evaluated = texts(tokenizer, data.eval)
    assert len(evaluated) >= len(QUALIFYING)
    assert not any(row in text for row in evaluated for text in trained)
    train_rows = {tuple(r) for rows in data.train for r in rows.input_ids.tolist()}
    assert not train_rows & {tuple(r) for r in data.eval.input_ids.tolist()}
    if eval_source:
        assert set("".join(evaluated)) <= set("qrst" + NOT_SPOKEN)


def test_eval_does_not_depend_on_the_device_count(tokenizer):
    assert torch.equal(build(tokenizer).eval.input_ids, build(tokenizer, num_devices=2).eval.input_ids)


@pytest.mark.parametrize("count", [1, 3, 6])
def test_fewer_devices_take_a_seeded_subset_in_corpus_order(tokenizer, count):
    chosen = [(d["play"], d["role"]) for d in build(tokenizer, num_devices=count).report.devices]
    assert len(set(chosen)) == count and set(chosen) <= set(QUALIFYING)
    assert chosen == sorted(chosen, key=QUALIFYING.index)


def test_same_seed_same_partition(tokenizer):
    data, again = build(tokenizer, num_devices=3), build(tokenizer, num_devices=3)
    assert data.device_documents == again.device_documents
    for a, b in zip([*data.train, data.eval], [*again.train, again.eval]):
        assert torch.equal(a.input_ids, b.input_ids)
    by_seed = {tuple(map(tuple, build(tokenizer, num_devices=3, seed=s).device_documents)) for s in range(6)}
    assert len(by_seed) > 1


def test_too_many_devices(tokenizer):
    with pytest.raises(DataError, match=r"devices.count = 8 but only 7 speaking role\(s\) have a training row; "
                                        r".*devices.count <= 7.*data.partition = \"iid\""):
        build(tokenizer, num_devices=8)


@pytest.mark.parametrize("records", [
    (Record("", "Just some prose.\n\nWith paragraphs, and no speakers at all.\n" * 20),),
    (Record("Q?", "A."), Record("Why?", "Because.")),
], ids=["plain-text", "prompt-completion"])
def test_a_source_without_plays_is_refused(tokenizer, records):
    documents = [Document("notes", records)]
    with pytest.raises(DataError, match=r"data.partition = 'by_role' needs play texts with speaker headings.*"
                                        r"none of the 1 document\(s\) \(notes\) has any"):
        build_federated_data(documents, tokenizer, num_devices=1, seq_len=16, partition="by_role",
                             dirichlet_alpha=0.5, eval_fraction=0.2, eval_chunks=8, max_train_chunks_per_device=0,
                             seed=0)


def test_config_runs_by_role(tiny_llama_dir, tmp_path):
    from splitfed.run import build_data, plan_run
    from tests.conftest import char_tokenizer, tiny_run_config

    for doc in CORPUS:
        (tmp_path / f"{doc.name}.txt").write_text(doc.records[0].completion)
    config = tiny_run_config(tiny_llama_dir, tmp_path, "memsfl", data={"partition": "by_role"},
                             train={"seq_len": 16}, devices={"count": 5, "cuts": [2]})
    report = build_data(plan_run(config), char_tokenizer()).report.to_dict()
    assert len({(d["play"], d["role"]) for d in report["devices"]}) == 5


# --- the shipped corpus -------------------------------------------------------------------------------------
needs_corpus = pytest.mark.skipif(not shakespeare_dir().is_dir(),
                                  reason=f"Shakespeare corpus not prepared at {shakespeare_dir()} (run `splitfed prepare`)")


@needs_corpus
def test_shipped_corpus_roles():
    documents = load_documents("shakespeare")
    roles = speaking_roles(documents)
    plays = {role.play for role in roles}
    assert len(roles) == 1352 and len(plays) == 37  # 42 works, 5 of them poems
    assert not plays & {"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
                        "rape_of_lucrece"}
    assert len({(role.play, role.name) for role in roles}) == len(roles)
    most = {play: max((r for r in roles if r.play == play), key=lambda r: len(r.text)).name for play in plays}
    assert (most["hamlet"], most["lear"], most["romeo_and_juliet"], most["othello"]) == ("Ham", "Lear", "Romeo",
                                                                                          "IAGO")
    assert not any("[" in role.text or "\nACT " in role.text for role in roles if role.play == "hamlet")


@needs_corpus
@pytest.mark.skipif(not (resolve_source("smollm2")[0] / WEIGHTS_FILE).is_file(), reason="SmolLM2 not prepared")
def test_shipped_corpus_has_986_roles_at_seq_len_64():
    from splitfed.models.loading import load_tokenizer

    with pytest.raises(DataError, match=r"devices.count = 987 but only 986 speaking role\(s\)"):
        build_federated_data(load_documents("shakespeare"), load_tokenizer("smollm2"), num_devices=987, seq_len=64,
                             partition="by_role", dirichlet_alpha=0.5, eval_fraction=0.1, eval_chunks=32,
                             max_train_chunks_per_device=0, seed=0)
