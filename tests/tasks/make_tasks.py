"""Writes the two offline lm-eval tasks shipped for tests and examples, from the embedded King James
corpus (dist_llama/data/corpus/kjv.jsonl.gz), deterministically:

- kjv_next.jsonl (multiple choice): the first words of a verse, then four candidate next phrases:
  the verse's own, and three made of its letters (each word reversed, each word's letters shuffled,
  all letters shuffled); a model learning the corpus soon prefers the real words (chance: 0.25).
- kjv_ppl.jsonl (perplexity): whole verses, scored by rolling log-likelihood.

    python tests/tasks/make_tasks.py
"""

import gzip
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parents[1] / "dist_llama" / "data" / "corpus" / "kjv.jsonl.gz"


def verses() -> list[str]:
    out = []
    with gzip.open(CORPUS, "rt") as f:
        for line in f:
            for v in json.loads(line)["text"].split("\n"):
                words = v.split()
                if len(words) >= 14 and words[0].isdigit():
                    out.append(" ".join(words[1:]))
    return out


def main() -> None:
    rng = random.Random(0)
    pool = verses()
    picks = rng.sample(pool, 200)
    with open(HERE / "kjv_next.jsonl", "w") as f:
        for v in picks:
            words = v.split()
            cut = 6
            phrase = words[cut : cut + 4]
            true = " ".join(phrase)
            letters = list(true.replace(" ", ""))
            rng.shuffle(letters)
            at, flat = 0, []
            for w in phrase:  # all letters shuffled, the word lengths kept
                flat.append("".join(letters[at : at + len(w)]))
                at += len(w)
            others = [" ".join(w[::-1] for w in phrase),
                      " ".join("".join(rng.sample(w, len(w))) for w in phrase), " ".join(flat)]
            choices = [true, *others]
            rng.shuffle(choices)
            f.write(json.dumps({"context": " ".join(words[:cut]), "choices": choices,
                                "gold": choices.index(true)}) + "\n")
    with open(HERE / "kjv_ppl.jsonl", "w") as f:
        for v in rng.sample(pool, 40):
            f.write(json.dumps({"text": v}) + "\n")


if __name__ == "__main__":
    main()
