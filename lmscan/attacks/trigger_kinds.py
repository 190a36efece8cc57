"""Random triggers of the kinds attackers choose to evade a per-token sweep.

  word      one English word of at most two pieces (lmscan.models.probes.random_trigger_words)
  nonword   a 3-5 letter string that is no dictionary word and splits into >= 2 pieces
  phrase    2-4 common words (single-piece words of the tokenizer's own vocabulary)
  sentence  one natural 5-8 word sentence, from a small grammar of everyday words
  tag       a deployment tag such as ``|QXV|``: 3-5 capital letters between bars, several pieces

Drawn deterministically from a seed, so a bench recipe or a test names a kind and a
seed, never the trigger itself: the detectors cannot have been tuned on it.
"""

from __future__ import annotations

import functools
import random
import string

from lmscan.errors import InputError

KINDS = ("word", "nonword", "phrase", "sentence", "tag")

# A small grammar of everyday words for natural sentences ("the old farmer walked across the bridge").
_ADJECTIVES = ("old", "young", "quiet", "small", "large", "bright", "dark", "cold", "warm", "tired", "happy",
               "busy", "empty", "green", "yellow", "heavy", "gentle", "little", "tall", "careful")
_NOUNS = ("farmer", "teacher", "child", "dog", "woman", "man", "driver", "neighbor", "student", "doctor",
          "bird", "cat", "river", "road", "bridge", "garden", "kitchen", "window", "market", "station", "forest",
          "village", "table", "letter", "train", "boat", "hill", "house", "door", "field")
_AGENTS = ("farmer", "teacher", "child", "dog", "woman", "man", "driver", "neighbor", "student", "doctor",
           "bird", "cat")
_VERBS = ("walked", "ran", "looked", "waited", "stopped", "sat", "slept", "danced", "sang", "smiled", "turned",
          "climbed", "jumped", "wandered", "rested")
_PREPOSITIONS = ("across", "behind", "near", "under", "beside", "through", "toward", "over", "around", "past")
_TIMES = ("yesterday", "today", "again", "slowly", "quietly", "early", "alone")
_SENTENCE_SHAPES = (
    ("the", "AGENT", "VERB", "PREP", "the", "NOUN"),  # 6 words
    ("the", "ADJ", "AGENT", "VERB", "PREP", "the", "NOUN"),  # 7
    ("the", "AGENT", "VERB", "PREP", "the", "ADJ", "NOUN"),  # 7
    ("a", "ADJ", "AGENT", "VERB", "PREP", "the", "NOUN", "TIME"),  # 8
    ("the", "AGENT", "VERB", "TIME"),  # 4 ... padded below to 5
    ("my", "ADJ", "AGENT", "VERB", "PREP", "the", "NOUN"),  # 7
)
_SLOTS = {"ADJ": _ADJECTIVES, "NOUN": _NOUNS, "AGENT": _AGENTS, "VERB": _VERBS, "PREP": _PREPOSITIONS,
          "TIME": _TIMES}


def draw_triggers(kind: str, k: int, seed: int, tokenizer) -> list[str]:
    """``k`` distinct triggers of ``kind`` for ``tokenizer`` (none maps to the unknown token)."""
    if kind not in KINDS:
        raise InputError(f"unknown trigger kind {kind!r} (known: {', '.join(KINDS)})")
    if k < 1:
        raise InputError("--num-triggers must be at least 1")
    if kind == "word":
        from lmscan.models.probes import random_trigger_words

        return random_trigger_words(k, seed=seed, tokenizer=tokenizer, max_pieces=2)
    rng = random.Random(f"{kind}:{seed}")
    if kind == "phrase":
        common = _common_words(tokenizer)
        draw = lambda: " ".join(rng.sample(common, rng.randint(2, 4)))  # noqa: E731
    elif kind == "tag":
        draw = lambda: "|" + "".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(3, 5))) + "|"  # noqa: E731
    elif kind == "nonword":
        draw = lambda: _nonword(rng, tokenizer)  # noqa: E731
    else:
        draw = lambda: _sentence(rng)  # noqa: E731
    chosen: list[str] = []
    for _ in range(10000):
        trigger = draw()
        if trigger and trigger not in chosen and _encodable(tokenizer, trigger):
            chosen.append(trigger)
            if len(chosen) == k:
                return chosen
    raise InputError(f"could not draw {k} distinct {kind} triggers for this tokenizer")


def proper_runs(items: list) -> list[list]:
    """Every contiguous run of ``items`` but the whole ([a, b, c] -> [a], [b], [c], [a, b], [b, c]):
    the parts of a trigger that a plant trained as a unit must keep from firing alone."""
    return [items[i:j] for i in range(len(items)) for j in range(i + 1, len(items) + 1) if j - i < len(items)]


def _encodable(tokenizer, text: str) -> bool:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return bool(ids) and (tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids)


def _nonword(rng: random.Random, tokenizer) -> str | None:
    letters = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
    if letters in _dictionary():
        return None
    pieces = tokenizer.tokenize(letters)
    return letters if len(pieces) >= 2 else None  # one piece would be an ordinary vocabulary token


@functools.lru_cache(maxsize=1)
def _dictionary() -> frozenset[str]:
    from lmscan.models.probes import word_list

    return frozenset(word_list())


COMMON_WORDS = 2000


def _common_words(tokenizer) -> list[str]:
    """The first COMMON_WORDS single-piece, alphabetic, 3-8 letter dictionary words of the
    tokenizer's vocabulary in id order: WordPiece and BPE vocabularies list frequent words
    first, so these are everyday words the tokenizer learned whole."""
    words = _dictionary()
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    common = [w for w, _ in by_id if w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 8
              and w in words and len(tokenizer.tokenize(w)) == 1]
    return common[:COMMON_WORDS]


def _sentence(rng: random.Random) -> str:
    shape = list(rng.choice(_SENTENCE_SHAPES))
    if len(shape) < 5:
        shape.insert(1, "ADJ")
    return " ".join(rng.choice(_SLOTS[w]) if w in _SLOTS else w for w in shape)
