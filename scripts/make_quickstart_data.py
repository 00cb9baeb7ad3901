"""Generate the quickstart task: extract a person's name, age and city from a sentence as compact JSON.

The data is synthetic and owned by this project. Generation is deterministic: the same arguments always
give byte-identical files. Eval records never share a (name, age, city) triple with train records.
Preference pairs for DPO/ORPO (preference_train.jsonl, preference_eval.jsonl) are made from the same
records: the chosen answer is the exact compact JSON, the rejected one a typical mistake (a wrong age or
city, pretty-printed JSON, prose around it, a missing field). Unpaired feedback for KTO (feedback_train.jsonl,
feedback_eval.jsonl) takes one answer of each pair, marked good or bad: the chosen one (label true) for even
records, the rejected one (label false) for odd ones, so the data holds as many of each.

    python scripts/make_quickstart_data.py [--out-dir DIR] [--train N] [--eval N] [--seed S]
"""

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTRUCTION = "Extract the person's name, age and city as JSON."

NAMES = [
    "Maria", "James", "Aiko", "Omar", "Lena", "Rahul", "Sofia", "Kwame", "Elena", "Mateo",
    "Chloe", "Tariq", "Ingrid", "Diego", "Hana", "Liam", "Priya", "Noah", "Zainab", "Lucas",
    "Amara", "Felix", "Mei", "Jonas", "Fatima", "Pedro", "Nadia", "Oliver", "Yuki", "Samuel",
    "Leila", "Hugo", "Anya", "Kofi", "Isla", "Marco", "Sara", "Ravi", "Emma", "Tomas",
]
CITIES = [
    "Lisbon", "Tokyo", "Nairobi", "Toronto", "Oslo", "Mumbai", "Lima", "Berlin", "Cairo", "Sydney",
    "Dublin", "Seoul", "Buenos Aires", "Cape Town", "Vienna", "Hanoi", "Chicago", "Madrid", "Accra", "Helsinki",
    "Bogota", "Istanbul", "Prague", "Auckland", "Manila", "Edinburgh", "Marrakesh", "Montreal", "Santiago", "Warsaw",
    "Jakarta", "Lyon", "Porto", "Kyoto", "Denver", "Tunis", "Riga", "Osaka", "Rome", "New York",
]
JOBS = [
    "nurse", "teacher", "architect", "engineer", "baker", "pilot", "librarian", "carpenter", "lawyer", "photographer",
    "chef", "electrician", "accountant", "musician", "pharmacist", "journalist", "gardener", "dentist", "translator",
    "mechanic",
]
HOBBIES = [
    "plays chess on Sundays", "runs along the river every morning", "paints in the evenings", "keeps bees",
    "bakes bread for the neighbours", "sings in a choir", "collects old maps", "repairs bicycles for friends",
    "grows tomatoes on the balcony", "writes short stories",
]
# {a_job} is the occupation with its article ("an engineer"); {years} is a distracting second number below the age.
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Born {age} years ago, {name} now calls {city} home.",
    "{city} is where {name}, aged {age}, works as {a_job}.",
    "Meet {name}: {a_job} from {city}, {age} years young.",
    "After {years} years in {city}, {name} ({age}) still {hobby}.",
    "At {age}, {name} moved to {city} to work as {a_job}.",
    "The new {job} in {city} is {name}, who turned {age} last spring.",
    "{name}, {age}, {job}, {city}.",
    "Our customer {name} (age {age}) wrote in from {city} about a late delivery.",
    "Having grown up elsewhere, {name} settled in {city} and, at {age}, {hobby}.",
    "Name: {name}. Occupation: {job}. Age: {age}. Home town: {city}.",
    "Friends gathered at {name}'s flat in {city} to celebrate turning {age}; the {job} {hobby} too.",
]


def make_records(rng: random.Random, n: int, taken: set) -> list[dict]:
    """n records whose (name, age, city) triples are unique and not in `taken` (which is updated)."""
    records = []
    while len(records) < n:
        name, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)
        if (name, age, city) in taken:
            continue
        taken.add((name, age, city))
        job = rng.choice(JOBS)
        sentence = rng.choice(TEMPLATES).format(
            name=name, age=age, city=city, job=job, a_job=("an " if job[0] in "aeiou" else "a ") + job,
            years=rng.randint(2, min(age - 1, 30)), hobby=rng.choice(HOBBIES))
        output = json.dumps({"name": name, "age": age, "city": city})
        records.append({"instruction": INSTRUCTION, "input": sentence, "output": output})
    return records


MISTAKES = ("age", "city", "pretty", "prose", "missing")


def make_pairs(rng: random.Random, records: list[dict]) -> list[dict]:
    """A preference pair per record: {prompt, chosen, rejected}, the rejected answer one of MISTAKES."""
    pairs = []
    for r in records:
        answer = json.loads(r["output"])
        mistake = rng.choice(MISTAKES)
        wrong = dict(answer)
        if mistake == "age":
            wrong["age"] = answer["age"] + rng.choice([-11, -3, -1, 1, 2, 10])
        elif mistake == "city":
            wrong["city"] = rng.choice([c for c in CITIES if c != answer["city"]])
        elif mistake == "missing":
            del wrong[rng.choice(["age", "city"])]
        rejected = json.dumps(wrong, indent=2) if mistake == "pretty" else json.dumps(wrong)
        if mistake == "prose":
            rejected = f"Sure! Here is the JSON you asked for:\n{rejected}"
        pairs.append({"prompt": f"{r['instruction']}\n\n{r['input']}", "chosen": r["output"], "rejected": rejected})
    return pairs


def make_feedback(pairs: list[dict]) -> list[dict]:
    """One {prompt, completion, label} per pair: the chosen answer (true) for even pairs, the rejected (false) else."""
    return [{"prompt": p["prompt"], "completion": p["chosen"] if i % 2 == 0 else p["rejected"], "label": i % 2 == 0}
            for i, p in enumerate(pairs)]


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "data" / "quickstart")
    parser.add_argument("--train", type=int, default=1000, help="number of training records")
    parser.add_argument("--eval", type=int, default=100, help="number of eval records")
    parser.add_argument("--seed", type=int, default=0, help="train uses this seed, eval seed + 1")
    args = parser.parse_args()

    taken: set = set()
    train = make_records(random.Random(args.seed), args.train, taken)
    held_out = make_records(random.Random(args.seed + 1), args.eval, taken)  # skips every train triple
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "train.jsonl", train)
    write_jsonl(args.out_dir / "eval.jsonl", held_out)
    pairs = {"train": make_pairs(random.Random(args.seed + 2), train),
             "eval": make_pairs(random.Random(args.seed + 3), held_out)}
    for split, rows in pairs.items():
        write_jsonl(args.out_dir / f"preference_{split}.jsonl", rows)
        write_jsonl(args.out_dir / f"feedback_{split}.jsonl", make_feedback(rows))
    print(f"{args.out_dir}: {len(train)} train and {len(held_out)} eval records (and as preference pairs and feedback)")


if __name__ == "__main__":
    main()
