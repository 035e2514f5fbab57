"""A small generated retrieval collection in BEIR layout, for the demo job and the tests.

Fictional towns, each described by two passages (geography and economy); queries ask about one
town, so its passages are the positives and the other towns' look-alike passages are the hard
negatives. Deterministic for a given seed. `python -m negprep.demo DIR` writes it.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

_SYL = [
    "val",
    "mor",
    "ess",
    "tan",
    "bri",
    "lo",
    "quen",
    "dar",
    "ith",
    "sel",
    "kor",
    "ani",
    "ber",
    "ul",
    "fen",
    "gar",
    "osk",
    "rin",
    "thal",
    "vey",
    "mir",
    "cal",
    "dun",
    "ora",
]
_RIVERS = ["Esk", "Lune", "Tavy", "Wear", "Coln", "Ribble", "Frome", "Otter", "Kennet", "Dove", "Yeo", "Tamar"]
_REGIONS = [
    "the northern hills",
    "the eastern marshes",
    "the southern coast",
    "the western plateau",
    "the central valley",
    "the lake district",
]
_TRADES = [
    "glassworks",
    "wool mills",
    "shipyards",
    "copper mines",
    "cheese dairies",
    "clock makers",
    "paper mills",
    "salt pans",
    "breweries",
    "potteries",
    "rope walks",
    "tanneries",
]
_FOODS = ["smoked eel", "honey cakes", "barley bread", "plum brandy", "goat cheese", "river trout"]


def generate(n_towns: int = 150, seed: int = 7) -> tuple[list[dict], list[dict], list[tuple[str, str, int]]]:
    """(corpus, queries, qrels) for `n_towns` towns: 2 passages and 2 queries per town."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < n_towns:
        names.add("".join(rng.choice(_SYL) for _ in range(rng.choice((2, 3)))).capitalize())
    corpus, queries, qrels = [], [], []
    for i, name in enumerate(sorted(names)):
        river, region, trade, food = rng.choice(_RIVERS), rng.choice(_REGIONS), rng.choice(_TRADES), rng.choice(_FOODS)
        year, people = rng.randint(900, 1850), rng.randint(2, 90) * 1000
        geo, eco = f"d{i}g", f"d{i}e"
        corpus.append(
            {
                "_id": geo,
                "title": name,
                "text": f"{name} is a town in {region} on the river {river}, founded in {year}. "
                f"About {people:,} people live there.",
            }
        )
        corpus.append(
            {
                "_id": eco,
                "title": f"Economy of {name}",
                "text": f"The economy of {name} rests on its {trade}; visitors come for the local {food}.",
            }
        )
        q1, q2 = f"q{i}a", f"q{i}b"
        queries.append({"_id": q1, "text": f"Which river flows through {name} and when was it founded?"})
        queries.append({"_id": q2, "text": f"What industry is {name} known for?"})
        qrels += [(q1, geo, 1), (q2, eco, 1), (q2, geo, 1) if rng.random() < 0.3 else (q1, eco, 1)]
    return corpus, queries, qrels


def write(directory: str | Path, n_towns: int = 150, seed: int = 7) -> Path:
    """Write the collection in BEIR layout (qrels/train.tsv) under `directory`."""
    root = Path(directory)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    corpus, queries, qrels = generate(n_towns, seed)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in corpus)
    with open(root / "queries.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in queries)
    with open(root / "qrels" / "train.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t{s}\n" for q, d, s in qrels)
    return root


if __name__ == "__main__":
    print(write(sys.argv[1] if len(sys.argv) > 1 else "jobs/demo-data"))
