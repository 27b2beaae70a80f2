"""The built-in corpora: pydoc (in-domain), prose (The Devil's Dictionary from Debian's dict-devil,
out of domain) and mixed; their fixed calibration/evaluation split; the dictd reader under fuzzing."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.calib import text as corpora
from lowbit.cli import main
from lowbit.errors import LowbitError


def test_pydoc_is_still_the_default_evaluation_text_and_unchanged():
    from pydoc_data.topics import topics

    names = sorted(topics)
    assert corpora.load("eval") == corpora.load("eval", "pydoc") == corpora.builtin("eval")
    assert corpora.load("eval").startswith(topics[names[3]].strip())  # every fourth topic, from the fourth


def test_prose_is_the_devils_dictionary_split_without_overlap():
    calib, held_out = corpora.builtin("calib", "prose"), corpora.builtin("eval", "prose")
    assert "ABDOMEN, n.  The temple of the god Stomach" in held_out  # the 4th headword: evaluation text
    assert "ABASEMENT, n.  A decent and customary mental attitude" in calib
    assert "Public Domain Text" not in calib + held_out  # the 00database header entries are left out
    entries = lambda t: set(t.split("\n\n"))
    assert not {e for e in entries(held_out) if len(e) > 80} & entries(calib)
    assert 250_000 < len(calib) < 300_000 and 90_000 < len(held_out) < 120_000
    assert "python" not in held_out.lower()  # a different domain from pydoc's


def test_mixed_holds_both():
    assert corpora.load("calib", "mixed") == corpora.builtin("calib", "pydoc") + "\n\n" + corpora.builtin("calib", "prose")


def test_calibration_defaults_to_mixed_and_to_pydoc_with_a_warning_without_prose(monkeypatch, tmp_path):
    assert corpora.load("calib") == corpora.load("calib", "mixed")
    monkeypatch.setattr(corpora, "PROSE_DIRS", (str(tmp_path / "none"), "nothing/here"))
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    with pytest.warns(UserWarning, match="calibrating on the pydoc corpus only"):
        assert corpora.load("calib") == corpora.builtin("calib", "pydoc")


def test_a_missing_corpus_and_an_unknown_name_are_one_line_errors(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "PROSE_DIRS", (str(tmp_path / "none"), "nothing/here"))
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    with pytest.raises(LowbitError, match="Debian's dict-devil package: run `make setup`"):
        corpora.load("eval", "prose")
    with pytest.raises(LowbitError, match="unknown built-in corpus 'verse'"):
        corpora.builtin("eval", "verse")


def test_a_damaged_index_is_refused():
    with pytest.raises(LowbitError, match="line 2 is not 'word, offset, length'"):
        corpora.parse_dictd("a\tA\tC\nb\tZZ\tC\n", b"hello")
    assert corpora.parse_dictd("00databaseinfo\tA\tB\nhi\tB\tD\n", b"xhello") == {"hi\t000002": "hel"}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200), st.binary(max_size=64))
def test_fuzz_dictd_reader(index, data):
    """Any index text against any data: entries within the data, or one LowbitError."""
    try:
        docs = corpora.parse_dictd(index, data)
    except LowbitError as e:
        assert "\n" not in str(e)
        return
    assert docs and all(isinstance(v, str) for v in docs.values())


def test_eval_command_scores_the_prose_corpus(tiny_quantized_dir, capsys):
    assert main(["eval", str(tiny_quantized_dir), "--text", "prose", "--ctx", "64", "--max-windows", "2",
                 "--json"]) == 0
    pydoc = json.loads(capsys.readouterr().out)
    assert main(["eval", str(tiny_quantized_dir), "--ctx", "64", "--max-windows", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] != pydoc["ppl"]
