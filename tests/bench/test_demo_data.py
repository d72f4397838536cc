"""The mixed tasks (bench/demo_data.MIXED): every answer checked by an oracle that reads the data back out of
the prompt and applies the skills here, in plain Python; train and test templates disjoint; seeds honoured."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from bench.demo_data import CITIES, MIXED, NAMES, OBJECTS, SKILLS, THINGS, WORDS, mixed_examples

# the skills' knowledge, written out again here (not imported), so a wrong table in the generator shows
FRENCH = {"red": "rouge", "blue": "bleu", "green": "vert", "yellow": "jaune", "black": "noir", "white": "blanc",
          "orange": "orange", "pink": "rose", "grey": "gris", "purple": "violet", "brown": "marron"}
POSITIVE = {"wonderful", "excellent", "delightful", "fantastic", "superb", "lovely", "great", "amazing", "brilliant",
            "charming"}
NEGATIVE = {"terrible", "awful", "dreadful", "horrible", "disappointing", "poor", "bad", "miserable", "boring",
            "disgusting"}
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
EMAIL = re.compile(r"[a-z]+\d+@[a-z]+\.[a-z]+")
N = 200


def one(found: list[str], what: str, prompt: str) -> str:
    assert len(found) == 1, f"expected one {what} in {prompt!r}, found {found}"
    return found[0]


def listed(prompt: str) -> list[str]:
    """The comma-separated list that ends the prompt."""
    return prompt.rsplit(": ", 1)[1].split(", ")


def name_in(prompt: str) -> str:
    return one([n for n in NAMES if re.search(rf"\b{n}\b", prompt)], "name", prompt)


def email_in(prompt: str) -> str:
    return one(EMAIL.findall(prompt), "email", prompt)


def color_in(prompt: str) -> str:
    return one([c for c in FRENCH if re.search(rf"\b{c}\b", prompt)], "color", prompt)


def iso_date_in(prompt: str) -> str:
    month = "|".join(MONTHS)
    if m := re.search(rf"\b({month}) (\d{{1,2}}), (\d{{4}})\b", prompt):
        name, day, year = m.groups()
    else:
        day, name, year = one(re.findall(rf"\b(\d{{1,2}}) ({month}) (\d{{4}})\b", prompt), "date", prompt)
    return f"{year}-{MONTHS.index(name) + 1:02d}-{int(day):02d}"


def sentiment_in(prompt: str) -> str:
    words = set(re.findall(r"[a-z]+", prompt))
    return one(["positive"] * len(words & POSITIVE) + ["negative"] * len(words & NEGATIVE), "sentiment word", prompt)


def as_json(**fields: str) -> str:
    """The JSON the demo skill json_extract answers with: keys in order, ", " and ": " separators."""
    return "{" + ", ".join(f'"{k}": "{v}"' for k, v in fields.items()) + "}"


ORACLES: dict[str, Callable[[str], str]] = {
    "reverse_upper": lambda p: ", ".join(reversed(listed(p))).upper(),
    "email_upper": lambda p: email_in(p).upper(),
    "french_upper": lambda p: FRENCH[color_in(p)].upper(),
    "french_reverse": lambda p: ", ".join(FRENCH[c] for c in reversed(listed(p))),
    "json_french": lambda p: as_json(name=name_in(p), color=FRENCH[color_in(p)]),
    "sentiment_upper": lambda p: sentiment_in(p).upper(),
    "french_reverse_upper": lambda p: ", ".join(FRENCH[c] for c in reversed(listed(p))).upper(),
    "email_json": lambda p: as_json(name=name_in(p), email=email_in(p)),
    "date_json": lambda p: as_json(name=name_in(p), born=iso_date_in(p)),
    "km_reverse": lambda p: ", ".join(str(int(x.removesuffix(" km")) * 1000) for x in reversed(listed(p))),
}

VOCAB = sorted({*NAMES, *CITIES, *WORDS, *THINGS, *OBJECTS, *FRENCH, *POSITIVE, *NEGATIVE, *MONTHS},
               key=len, reverse=True)  # longest first: "the hotel room" before any shorter word
VOCAB_RE = re.compile(r"\b(?:" + "|".join(map(re.escape, VOCAB)) + r")\b", re.IGNORECASE)


def skeleton(prompt: str) -> str:
    """The prompt's template: every datum (email, number, known word) replaced by {}, a list by one {}."""
    s = VOCAB_RE.sub("{}", re.sub(r"\d+", "{}", EMAIL.sub("{}", prompt)))
    return re.sub(r"\{\}(?:, \{\})+", "{}", s.replace("{} km", "{}"))


def test_every_task_has_an_oracle_and_enough_shapes():
    assert set(ORACLES) == set(MIXED)
    assert len(MIXED) >= 8
    assert any(len(spec["skills"]) >= 3 for spec in MIXED.values())
    for task, spec in MIXED.items():
        assert isinstance(spec["skills"], tuple) and len(spec["skills"]) >= 2, task
        assert len(set(spec["skills"])) == len(spec["skills"]), task
        assert set(spec["skills"]) <= set(SKILLS), task


@pytest.mark.parametrize("task", sorted(MIXED))
def test_answers_are_what_the_skills_compute_from_the_prompt(task):
    for split in ("train", "test"):
        pairs = mixed_examples(task, split, N, seed=5)
        for prompt, answer in pairs:
            assert ORACLES[task](prompt) == answer, (split, prompt)
            assert 0 < len(answer) <= 80, answer  # short: well under 40 tokens
        assert len({a for _, a in pairs}) > 1  # the answer follows the data, not one constant


@pytest.mark.parametrize("task", sorted(MIXED))
def test_train_and_test_templates_are_disjoint(task):
    train, test = mixed_examples(task, "train", N, seed=0), mixed_examples(task, "test", N, seed=0)
    assert not {p for p, _ in train} & {p for p, _ in test}
    train_t, test_t = {skeleton(p) for p, _ in train}, {skeleton(p) for p, _ in test}
    assert (len(train_t), len(test_t)) == (3, 2), (train_t, test_t)  # 3 training templates, 2 test ones
    assert not train_t & test_t
    # the wording before the first datum differs too (not only the tail of one shared sentence)
    assert not {t.split("{}")[0] for t in train_t} & {t.split("{}")[0] for t in test_t}


@pytest.mark.parametrize("task", sorted(MIXED))
def test_mixed_examples_are_deterministic_per_seed(task):
    for split in ("train", "test"):
        first = mixed_examples(task, split, 20, seed=1)
        assert mixed_examples(task, split, 20, seed=1) == first
        assert mixed_examples(task, split, 20, seed=2) != first
        assert mixed_examples(task, split, 5, seed=1) == first[:5]  # the n-th example does not depend on n
