"""Write the preference pairs of examples/dpo.yaml: prefer the animal in a short word list.

``favourite: red horse tree`` -> chosen ``horse``, rejected another word of the list (``red`` or ``tree``).
Each list (3-5 distinct words of the tiny model's vocabulary) holds exactly one animal, at a random position,
so a model without the preference scores chosen above rejected about half the time. 1,000 training and 100
held-out pairs (the held-out lists are new; the words are not), as chat messages (the quickstart's format).

    python scripts/make_preference_data.py            # writes examples/data/animal_preference_{train,eval}.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random

ANIMALS = "cat dog bird fish horse mouse fox bear wolf frog duck goat lion owl tiger rabbit".split()
OTHERS = ("tree river stone house boat cloud apple bread "
          "red blue green small big old young happy quiet brave dark bright").split()
TASK = "favourite"


def pair(rng: random.Random) -> tuple[tuple[str, ...], dict]:
    others = rng.sample(OTHERS, rng.randint(2, 4))
    animal = rng.choice(ANIMALS)
    words = others[:]
    words.insert(rng.randint(0, len(others)), animal)
    record = {"prompt": [{"role": "user", "content": f"{TASK}: " + " ".join(words)}],
              "chosen": [{"role": "assistant", "content": animal}],
              "rejected": [{"role": "assistant", "content": rng.choice(others)}]}
    return tuple(words), record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="examples/data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-eval", type=int, default=100)
    args = p.parse_args()
    rng, seen, records = random.Random(args.seed), set(), []
    while len(records) < args.n_train + args.n_eval:
        words, record = pair(rng)
        if words not in seen:
            seen.add(words)
            records.append(record)
    os.makedirs(args.out, exist_ok=True)
    for split, recs in (("train", records[: args.n_train]), ("eval", records[args.n_train :])):
        path = os.path.join(args.out, f"animal_preference_{split}.jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
