"""Writes kjv_vowels.jsonl, a harder offline multiple-choice task than kjv_next, from the embedded
King James corpus, deterministically: the first six words of a verse, then four candidate next
phrases: the verse's own four words, and three copies with two of their vowels changed. Telling them
apart takes spelling, not letter statistics, so a debug model's accuracy keeps rising over its first
100 steps (chance 0.25; 0.64 after 20 steps, 0.79 after 100 on 2 FSDP ranks) where kjv_next is
saturated after 20.

    python tests/tasks/make_kjv_vowels.py
"""

import json
import random

from make_tasks import HERE, verses

VOWELS = "aeiou"


def changed(phrase: str, rng: random.Random) -> str:
    """The phrase with two of its vowels replaced by other vowels."""
    chars = list(phrase)
    at = [i for i, c in enumerate(chars) if c in VOWELS]
    for i in rng.sample(at, min(2, len(at))):
        chars[i] = rng.choice([v for v in VOWELS if v != chars[i]])
    return "".join(chars)


def main() -> None:
    rng = random.Random(1)
    with open(HERE / "kjv_vowels.jsonl", "w") as f:
        for v in rng.sample(verses(), 200):
            words = v.split()
            true = " ".join(words[6:10])
            others: list[str] = []
            while len(others) < 3:  # three different wrong phrases
                other = changed(true, rng)
                if other != true and other not in others:
                    others.append(other)
            choices = [true, *others]
            rng.shuffle(choices)
            f.write(json.dumps({"context": " ".join(words[:6]), "choices": choices,
                                "gold": choices.index(true)}) + "\n")


if __name__ == "__main__":
    main()
