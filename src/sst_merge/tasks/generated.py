"""Utility tasks the project generates itself (design §9).

Each task is a seeded generator of short, exactly-checkable answers. They were chosen so that SmolLM2-135M does
badly on them out of the box (it answers in sentences, miscounts or loses track of which fact belongs to whom)
and a few minutes of LoRA training fixes that: the answers are copied or computed from the prompt, in a fixed
format. Every prompt asks for the bare answer, so the base model is told the format too.
"""

from __future__ import annotations

import random

from sst_merge.tasks.base import GeneratedTask

FIRST_NAMES = """
    Ana Omar Lena Kenji Priya Tomas Zara Felix Ines Malik Sofia Ravi Elena Hugo Amara Jonas Leila Mateo Yuki Nadia
    Oscar Freya Diego Hana Ivan Mira Samir Clara Tariq Greta Rosa Kofi Alba Emil Noor Pablo Vera Aditi Lukas Selin
""".split()
LAST_NAMES = """
    Silva Haddad Novak Tanaka Sharma Berg Okafor Moreau Rossi Kowalski Nguyen Larsen Costa Petrov Mendez Fischer
    Abebe Dubois Kim Santos Yilmaz Ortiz Lindqvist Murphy Ivanova Sato Bauer Khan Romero Weber
""".split()
CITIES = """
    Oslo Lima Porto Quito Dakar Hanoi Kyoto Tunis Riga Perth Accra Bergen Cusco Graz Lyon Malmo Nantes Osaka Split
    Turin Utrecht Vilnius Zagreb Cork Leeds Basel Bremen Gdansk Seville Tallinn
""".split()
JOBS = """
    baker pilot nurse teacher plumber chemist farmer lawyer painter tailor dentist engineer librarian carpenter chef
    florist jeweler architect butcher gardener
""".split()
PETS = ["cat", "dog", "parrot", "rabbit", "turtle", "hamster", "goldfish", "ferret", "lizard", "pony"]
OBJECTS = """
    lamp chair kettle mirror basket candle blanket ladder bucket clock pillow wallet helmet compass teapot violin
    shovel anchor rope jacket bottle hammer saddle trumpet kite carpet drum scarf umbrella stool
""".split()
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "grey", "pink", "teal"]
WORDS = """
    river stone cloud apple tiger bread glass music paper ocean forest candle silver garden window planet honey
    winter bridge castle pepper rocket violet marble feather island lemon shadow thunder velvet copper maple desert
    harbor meadow pencil saddle tunnel walnut zebra
""".split()

ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth"]


def _passage_qa(rng: random.Random) -> tuple[str, str]:
    people = []
    names = rng.sample(FIRST_NAMES, 3)
    surnames = rng.sample(LAST_NAMES, 3)
    cities, jobs, pets = rng.sample(CITIES, 3), rng.sample(JOBS, 3), rng.sample(PETS, 3)
    for i in range(3):
        people.append({"name": f"{names[i]} {surnames[i]}", "city": cities[i], "job": jobs[i], "pet": pets[i]})
    passage = " ".join(
        f"{p['name']} lives in {p['city']} and works as a {p['job']}. {p['name'].split()[0]} has a pet {p['pet']}."
        for p in people
    )
    who = rng.choice(people)
    attr = rng.choice(["city", "job", "pet"])
    question = {
        "city": f"In which city does {who['name']} live?",
        "job": f"What does {who['name']} work as?",
        "pet": f"What kind of pet does {who['name']} have?",
    }[attr]
    prompt = f"Read the passage and answer with one word from it.\n\nPassage: {passage}\n\nQuestion: {question}"
    return prompt, who[attr]


def _table_lookup(rng: random.Random) -> tuple[str, str]:
    objs = rng.sample(OBJECTS, 4)
    rows = [(o, rng.randint(2, 99), rng.choice(COLOURS), rng.randint(1, 40)) for o in objs]
    table = "item | price | colour | stock\n" + "\n".join(f"{o} | {p} | {c} | {s}" for o, p, c, s in rows)
    obj, price, colour, stock = rng.choice(rows)
    col = rng.choice(["price", "colour", "stock"])
    answer = {"price": str(price), "colour": colour, "stock": str(stock)}[col]
    prompt = (
        f"Look up the answer in the table and reply with the value only.\n\n{table}\n\nWhat is the {col} of the {obj}?"
    )
    return prompt, answer


UNITS = [
    ("kilometres", "metres", 1000),
    ("metres", "centimetres", 100),
    ("centimetres", "millimetres", 10),
    ("kilograms", "grams", 1000),
    ("litres", "millilitres", 1000),
    ("hours", "minutes", 60),
]


def _unit_conversion(rng: random.Random) -> tuple[str, str]:
    src, dst, factor = rng.choice(UNITS)
    n = rng.randint(2, 99) if factor == 60 else rng.randint(2, 999)
    prompt = f"Convert {n} {src} to {dst}. Reply with the number only."
    return prompt, str(n * factor)


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return f"Compute {a} + {b}. Reply with the number only.", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"Compute {a} - {b}. Reply with the number only.", str(a - b)


def _list_reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    prompt = f"Reverse the order of this list and reply with the reversed list only: {', '.join(words)}"
    return prompt, ", ".join(reversed(words))


def _nth_word(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 6)
    k = rng.randrange(6)
    prompt = f"Words: {' '.join(words)}\nWhich is the {ORDINALS[k]} word? Reply with that word only."
    return prompt, words[k]


GENERATED_TASKS = [
    GeneratedTask("passage_qa", "extractive QA over a generated three-person passage", _passage_qa),
    GeneratedTask("table_lookup", "look up one cell of a generated four-row table", _table_lookup),
    GeneratedTask("unit_conversion", "convert an integer between metric (and hour/minute) units", _unit_conversion),
    GeneratedTask("arithmetic", "two-digit addition or subtraction, bare number", _arithmetic),
    GeneratedTask("list_reverse", "reverse a list of 3-5 words", _list_reverse, max_new_tokens=24),
    GeneratedTask("nth_word", "name the k-th word of a six-word list", _nth_word),
]
