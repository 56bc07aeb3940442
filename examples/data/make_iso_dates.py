"""Regenerate the ISO-date data of examples/smollm2.yaml: `python examples/data/make_iso_dates.py`.

Task: write a date given in words ("March 5, 2024", "5 Mar 2024") as ISO 8601 ("2024-03-05"). The held-out
file asks in other words than the training file (no instruction wording is shared) and uses other dates.
"""

import json
import random
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
TRAIN = [
    "Convert this date to ISO 8601 (YYYY-MM-DD): {d}",
    "Rewrite {d} in ISO format.",
    "What is {d} in YYYY-MM-DD form?",
    "ISO date for {d}:",
    "Give the ISO 8601 form of the date {d}.",
    "Format the date {d} as year-month-day with dashes.",
]
HELD_OUT = [
    "Please express {d} as an ISO-8601 date.",
    "Turn the date {d} into the YYYY-MM-DD format.",
    "{d} -> ISO date?",
    "I need {d} written the ISO way (year-month-day).",
]


def spell(rng: random.Random, y: int, m: int, d: int) -> str:
    name = MONTHS[m - 1]
    return rng.choice([f"{name} {d}, {y}", f"{d} {name} {y}", f"{name[:3]} {d} {y}", f"{d} {name[:3]}, {y}"])


def records(rng: random.Random, templates: list[str], n: int, seen: set) -> list[dict]:
    out = []
    while len(out) < n:
        y, m = rng.randint(1950, 2049), rng.randint(1, 12)
        d = rng.randint(1, DAYS[m - 1])
        if (y, m, d) in seen:
            continue
        seen.add((y, m, d))
        prompt = rng.choice(templates).format(d=spell(rng, y, m, d))
        out.append({"messages": [{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": f"{y:04d}-{m:02d}-{d:02d}"}]})
    return out


def main() -> None:
    rng, seen = random.Random(0), set()
    here = Path(__file__).parent
    for name, templates, n in (("iso_dates_train.jsonl", TRAIN, 2000), ("iso_dates_eval.jsonl", HELD_OUT, 100)):
        rows = records(rng, templates, n, seen)
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
