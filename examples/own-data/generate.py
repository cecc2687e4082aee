"""Writes the example files of "Your own data" and "Score your own candidates" (README)
for a small bookshop, seeded, with structure a recommender can learn (each reader keeps
to two or three topics, drifting slowly):

    interactions.csv        who read what, when
    items.csv               the books: title, description
    candidates.csv          what a retrieval stage might propose: 20 unread books per
                            reader (user_id, item_id), for `trsr score --candidates`
    interactions-day2.csv   the next day's file: interactions.csv plus new reads of 12
                            readers (10%) and 2 new readers, for `trsr summarize --update`

    python examples/own-data/generate.py      # rewrites the files next to it
"""

from __future__ import annotations

import csv
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOPICS = {
    "cooking": (["Sourdough", "Weeknight Curries", "Pasta", "Fermentation", "Vegetable Soups", "Baking Bread"],
                "recipes, techniques and kitchen know-how"),
    "hiking": (["Alpine Trails", "Long-Distance Walking", "Mountain Huts", "Trail Running", "Wild Camping", "Map Reading"],
               "routes, gear and stories from the trail"),
    "astronomy": (["Deep-Sky Objects", "Backyard Telescopes", "The Moon", "Variable Stars", "Astrophotography", "Comets"],
                  "observing guides and the science of the night sky"),
    "jazz": (["Bebop", "Modal Jazz", "Jazz Piano", "Big Bands", "Improvisation", "Blue Note Records"],
             "history, records and the players who made them"),
    "gardening": (["Vegetable Beds", "Roses", "Composting", "Shade Gardens", "Fruit Trees", "Seed Saving"],
                  "planting, pruning and the garden year"),
    "chess": (["Endgames", "The Sicilian Defence", "Tactics", "Famous Matches", "Opening Traps", "Positional Play"],
              "strategy, openings and great games"),
    "history": (["The Roman Republic", "Medieval Trade", "The Industrial Revolution", "Ancient Egypt", "The Silk Road", "Cold War Spies"],
                "people, events and how we know about them"),
    "photography": (["Street Photography", "Portrait Lighting", "Film Cameras", "Landscape Composition", "Black and White", "Darkroom Printing"],
                    "cameras, light and seeing pictures"),
}
FORMS = ["A Beginner's Guide to {}", "The Complete Book of {}", "{}: A Practical Handbook", "Notes on {}",
         "Understanding {}", "{} in Fifty Lessons", "The Story of {}", "Mastering {}"]


def main(out: Path = HERE, seed: int = 7, users: int = 120, per_topic: int = 24) -> None:
    rng = random.Random(seed)
    items = []
    for topic, (subjects, blurb) in TOPICS.items():
        for n in range(per_topic):
            subject = subjects[n % len(subjects)]
            title = FORMS[(n // len(subjects) + n) % len(FORMS)].format(subject)
            items.append({"item_id": f"B{len(items) + 1:04d}", "title": title, "topic": topic,
                          "description": f"A {topic} book about {subject.lower()}: {blurb}."})
    by_topic = {t: [i for i in items if i["topic"] == t] for t in TOPICS}
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    rows = []
    for u in range(users):
        liked = rng.sample(list(TOPICS), 3)
        weights = [0.6, 0.3, 0.1]
        when = start + timedelta(days=rng.randint(0, 60))
        seen: set[str] = set()
        for step in range(rng.randint(12, 22)):
            if step and step % 6 == 0:  # interests drift: the weights rotate
                weights = weights[1:] + weights[:1]
            topic = rng.choices(liked, weights)[0] if rng.random() > 0.1 else rng.choice(list(TOPICS))
            choices = [i for i in by_topic[topic] if i["item_id"] not in seen]
            item = rng.choice(choices)
            seen.add(item["item_id"])
            when += timedelta(hours=rng.randint(5, 200))
            rows.append({"user_id": f"U{u + 1:04d}", "item_id": item["item_id"], "timestamp": when.strftime("%Y-%m-%dT%H:%M:%SZ")})
    with open(out / "items.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["item_id", "title", "description"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(items)
    with open(out / "interactions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["user_id", "item_id", "timestamp"])
        writer.writeheader()
        writer.writerows(rows)
    # The production files come from their own generator, so the two above stay as they were.
    rng = random.Random(seed + 1)
    ids = [i["item_id"] for i in items]
    read = {}
    for row in rows:
        read.setdefault(row["user_id"], []).append(row["item_id"])
    with open(out / "candidates.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id"])
        for user, history in read.items():
            unread = [i for i in ids if i not in set(history)]
            writer.writerows([user, item] for item in rng.sample(unread, 20))
    new_rows = list(rows)
    day2 = datetime(2024, 9, 1, tzinfo=timezone.utc)
    for user in sorted(rng.sample(sorted(read), 12)) + ["U0121", "U0122"]:
        history = read.get(user, [])
        for k in range(rng.randint(1, 6) if history else 8):
            item = rng.choice([i for i in ids if i not in history])
            history = history + [item]
            stamp = (day2 + timedelta(hours=k)).strftime("%Y-%m-%dT%H:%M:%SZ")
            new_rows.append({"user_id": user, "item_id": item, "timestamp": stamp})
    with open(out / "interactions-day2.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["user_id", "item_id", "timestamp"])
        writer.writeheader()
        writer.writerows(new_rows)
    print(f"{len(items)} items, {users} users, {len(rows)} interactions (day 2: {len(new_rows)}), candidates in {out}")


if __name__ == "__main__":
    main()
