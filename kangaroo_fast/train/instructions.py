"""Training text for the adapter, written offline: varied instructions (answered later by the base model itself)
and English documentation text taken from the Python standard library's docstrings.

The instructions come from templates x topics x task types, with a good share of the benchmark's categories
(conversation, translation, summarization, QA, math, retrieval-style questions), but none of them repeats a
benchmark prompt: anything equal to a turn of ``kangaroo_fast/data/prompts.jsonl`` (either split, tune or report),
or sharing any 8-word window with one, is dropped. The word lists and templates live in ``instructions.json``
beside this file; the code that combines them (and the randomised math, reasoning, summary and retrieval items)
lives here. Everything is deterministic for a given seed and uses only the standard library.
"""
from __future__ import annotations

import importlib
import inspect
import itertools
import json
import random
import re
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

# the benchmark prompt set, shipped in the package (``kangaroo_fast.benchmark.DEFAULT_PROMPTS``)
BENCH_PATH = Path(__file__).resolve().parents[1] / "data" / "prompts.jsonl"
WINDOW = 8  # words: an instruction sharing this many consecutive words with a bench turn is dropped


# ----------------------------------------------------------------------------------------------- bench prompts

def bench_prompts(path: str | Path | None = None) -> list[dict]:
    """The benchmark prompts (one dict per line of ``kangaroo_fast/data/prompts.jsonl``); [] where the file is
    absent."""
    path = Path(path) if path is not None else BENCH_PATH
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _windows(words: list[str], size: int = WINDOW) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + size]) for i in range(len(words) - size + 1)}


class _BenchFilter:
    """Rejects texts equal to a bench turn (up to case, punctuation and spacing) or sharing a WINDOW-word run."""

    def __init__(self, prompts: list[dict]):
        turns = [turn for p in prompts for turn in p.get("turns", [])]
        self.exact = {" ".join(_words(t)) for t in turns} | {t.strip() for t in turns}
        self.windows: set[tuple[str, ...]] = set()
        for t in turns:
            self.windows |= _windows(_words(t))

    def allows(self, text: str) -> bool:
        words = _words(text)
        if text.strip() in self.exact or " ".join(words) in self.exact:
            return False
        return not any(tuple(words[i:i + WINDOW]) in self.windows for i in range(len(words) - WINDOW + 1))


def bench_filter() -> Callable[[str], bool]:
    """Whether a text may train: not a benchmark turn, sharing no WINDOW-word run with one (either split)."""
    return _BenchFilter(bench_prompts()).allows


# ------------------------------------------------------------------------------------------------ vocabulary

# The generators' word lists and templates, one key per list (lists of strings, a few lists of pairs, a few dicts of
# lists), read once when this module is imported
WORDS_PATH = Path(__file__).resolve().with_name("instructions.json")
WORDS = SimpleNamespace(**json.loads(WORDS_PATH.read_text(encoding="utf-8")))


# ------------------------------------------------------------------------------------------------ generators

def _fill(templates: list[str], **lists: list) -> list[str]:
    """Every template with every combination of the named lists (only the fields it uses)."""
    out = []
    keys = list(lists)
    for combo in itertools.product(*(lists[k] for k in keys)):
        values = dict(zip(keys, combo))
        for t in templates:
            out.append(t.format(**values))
    return list(dict.fromkeys(out))


def _explain() -> list[str]:
    return _fill(WORDS.explain_templates, t=WORDS.explain_topics)


def _lists() -> list[str]:
    return (_fill(WORDS.list_templates_subject, s=WORDS.list_subjects)
            + _fill(WORDS.list_templates_activity, a=WORDS.list_activities))


def _compare() -> list[str]:
    out = []
    for a, b in WORDS.compare_pairs:
        out += [t.format(a=a, b=b) for t in WORDS.compare_templates]
    return out


def _creative() -> list[str]:
    stories = _fill(WORDS.story_templates, c=WORDS.story_characters, e=WORDS.story_events)
    poems = [f"Write {form} about {theme}." for form in WORDS.poem_forms for theme in WORDS.poem_themes]
    emails = _fill(WORDS.email_templates, r=WORDS.email_recipients, p=WORDS.email_purposes)
    return stories + poems + emails


def _advice() -> list[str]:
    out = []
    for s in WORDS.advice_situations:
        for t in WORDS.advice_templates:
            text = t.format(s=s)
            out.append(text[0].upper() + text[1:])
    return out


def _howto() -> list[str]:
    return _fill(WORDS.howto_templates, t=WORDS.howto_tasks)


def _code() -> list[str]:
    return _fill(WORDS.code_templates, t=WORDS.code_tasks)


def _definitions() -> list[str]:
    return _fill(WORDS.definition_templates, w=WORDS.definition_words)


def _pros_cons() -> list[str]:
    return _fill(WORDS.pros_cons_templates, t=WORDS.pros_cons_things)


def _qa() -> list[str]:
    return _fill(WORDS.qa_wrappers, q=WORDS.qa_questions) + _fill(WORDS.qa_country_templates, c=WORDS.qa_countries)


def _translation() -> list[str]:
    out = _fill(WORDS.translate_to_templates, lang=list(WORDS.translate_foreign), s=WORDS.translate_en)
    for lang, sentences in WORDS.translate_foreign.items():
        out += _fill(WORDS.translate_from_templates, lang=[lang], s=sentences)
    return out


def _conversation() -> list[str]:
    out = []
    for opener, request, follow in itertools.product(WORDS.chat_openers, WORDS.chat_requests, WORDS.chat_followups):
        lower = opener.endswith((", ", ": ")) and not re.match(r"I\b", request)
        text = opener + (request[0].lower() + request[1:] if lower else request)
        out.append(text + follow)
    return out


def _math_problem(rng: random.Random) -> str:
    a, b = rng.sample(WORDS.names, 2)
    kind = rng.randrange(12)
    if kind == 0:
        n, p, q = rng.randint(2, 6), rng.randint(2, 9), rng.randint(1, 5)
        m = next(bill for bill in (10, 20, 50, 100) if bill > n * p + q)
        item1 = rng.choice(["apples", "sandwiches", "pencils", "bottles of juice", "cupcakes", "tickets"])
        item2 = rng.choice(["a newspaper", "a small bag", "a bottle of water", "a postcard", "a pack of gum"])
        text = (f"{a} bought {n} {item1} at {p} dollars each and {item2} for {q} dollars. "
                f"{a} paid with a {m}-dollar bill. What was the change?")
    elif kind == 1:
        v, h = rng.choice([30, 40, 45, 50, 70, 80, 90]), rng.choice([2, 3, 4, 1.5, 2.5])
        vehicle = rng.choice(["car", "bus", "cyclist", "boat"])
        text = f"A {vehicle} moves at a steady {v} km/h for {h} hours. What distance does it cover?"
    elif kind == 2:
        total, k = rng.choice([12, 18, 24, 30, 36, 48, 60]), rng.choice([2, 3, 4, 6])
        thing = rng.choice(["stickers", "candies", "marbles", "cards", "strawberries"])
        text = (f"{a} has {total} {thing} and shares them equally among {k} friends, keeping none. "
                f"How many does each friend receive?")
    elif kind == 3:
        x, y = rng.randint(5, 40), rng.randint(3, 20)
        z = rng.randint(2, min(15, x + y - 1))
        text = (f"{a} had {x} stamps. {b} gave {a} {y} more, and then {a} lost {z}. "
                f"How many stamps does {a} have now?")
    elif kind == 4:
        age, mult, yrs = rng.randint(4, 12), rng.choice([3, 4, 5]), rng.randint(2, 10)
        rel = rng.choice(["aunt", "uncle", "grandfather", "neighbor"])
        text = (f"{a} is {age} years old, and {a}'s {rel} is {mult} times that age. "
                f"What will the {rel}'s age be {yrs} years from now?")
    elif kind == 5:
        price, pct = rng.choice([20, 30, 50, 60, 80, 120, 200]), rng.choice([10, 15, 20, 30, 50])
        item = rng.choice(["pair of shoes", "backpack", "lamp", "jacket", "board game", "chair"])
        text = f"A {item} is priced at {price} dollars and goes on sale for {pct}% off. What does it cost on sale?"
    elif kind == 6:
        length, width = rng.randint(3, 20), rng.randint(2, 15)
        place = rng.choice(["room", "playground", "vegetable patch", "swimming pool", "parking lot"])
        ask = rng.choice(["area", "perimeter", "area and perimeter"])
        text = f"A rectangular {place} measures {length} m by {width} m. Find its {ask}."
    elif kind == 7:
        per_day, total = rng.choice([5, 8, 10, 12, 20, 25]), rng.randint(6, 20)
        text = (f"{a} saves {per_day} dollars every week and wants to buy a bike that costs "
                f"{per_day * total + rng.choice([0, 3, 7])} dollars. After how many weeks can {a} afford it?")
    elif kind == 8:
        rows, per_row, gone = rng.randint(3, 12), rng.randint(4, 15), rng.randint(1, 10)
        what = rng.choice(["chairs", "tulips", "cars", "seats", "boxes"])
        text = f"There are {rows} rows of {what} with {per_row} in each row. If {gone} are removed, how many remain?"
    elif kind == 9:
        start_h, start_m = rng.randint(6, 18), rng.choice([0, 10, 15, 20, 30, 45])
        dur_h, dur_m = rng.randint(0, 4), rng.choice([15, 25, 35, 40, 50])
        text = (f"A film starts at {start_h}:{start_m:02d} and lasts {dur_h} hours and {dur_m} minutes. "
                f"At what time does it end?")
    elif kind == 10:
        cups, ratio = rng.randint(2, 4), rng.choice([2, 3])
        people = cups * 2 * rng.choice([2, 3]) if rng.random() < 0.7 else cups
        text = (f"A recipe for {cups * 2} people needs {cups} cups of flour and {ratio} eggs. "
                f"How much flour and how many eggs are needed for {people} people?")
    else:
        n, spent_frac = rng.choice([48, 60, 72, 96, 120]), rng.choice(["half", "a quarter", "a third"])
        text = (f"{a} earned {n} dollars. {a} spent {spent_frac} of it on books and then 5 dollars on lunch. "
                f"How much money is left?")
    ask = rng.choice(["Solve it and show each step.", "Please explain how you get the answer.",
                      "Work it out one step at a time.", "Give the answer with a short explanation.",
                      "Explain your calculation.", "Reason carefully and give the final answer."])
    return f"{text} {ask}" if rng.random() < 0.85 else f"Math problem: {text}"


def _reasoning_problem(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        a, b, c = rng.sample(WORDS.names, 3)
        adj, sup = rng.choice([("taller", "tallest"), ("older", "oldest"), ("faster", "fastest"),
                               ("heavier", "heaviest")])
        text = f"{a} is {adj} than {b}, and {b} is {adj} than {c}. Who is the {sup}?"
    elif kind == 1:
        a, b, c = rng.sample(WORDS.names, 3)
        x, y, z = rng.sample(WORDS.reasoning_jobs, 3)
        text = (f"{a}, {b} and {c} are {x}, {y} and {z}, in some order. {a} is not {x}, {b} is not {x} and "
                f"{b} is not {y}. Who has which job?")
    elif kind == 2:
        a, b = rng.sample(WORDS.names, 2)
        c1, c2 = rng.sample(WORDS.reasoning_colors, 2)
        n1, n2 = rng.randint(2, 6), rng.randint(2, 6)
        text = (f"A bag has {n1} {c1} balls and {n2} {c2} balls. {a} takes out one ball without looking. "
                f"What is the chance that it is {c1}?")
    elif kind == 3:
        first, weeks = rng.choice(WORDS.weekdays), rng.randint(1, 4)
        extra = rng.randint(1, 6)
        text = f"Today is {first}. What day of the week will it be in {weeks * 7 + extra} days?"
    else:
        a = rng.choice(WORDS.names)
        n_socks = rng.choice([2, 3, 4])
        text = (f"{a} has a drawer with socks in {n_socks} different colors, all mixed up, and the room is dark. "
                f"How many socks must {a} take out to be sure of having a matching pair?")
    return f"{text} {rng.choice(WORDS.reasoning_suffixes)}"


def _summary_passage(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.7:
        subject = rng.choice(sorted(WORDS.summary_facts))
        facts = WORDS.summary_facts[subject]
        k = rng.randint(4, min(7, len(facts)))
        chosen = sorted(rng.sample(range(len(facts)), k))
        if chosen[0] != 0 and rng.random() < 0.7:
            chosen = [0] + chosen[:-1]
        return subject, " ".join(facts[i] for i in chosen)
    town, facility = rng.choice(WORDS.towns), rng.choice(WORDS.facilities)
    cost, months, day = rng.randint(2, 40) * 100_000, rng.randint(3, 18), rng.choice(WORDS.weekdays)
    a, b = rng.sample(WORDS.names, 2)
    visitors = rng.randint(2, 30) * 50
    parts = [
        f"The town of {town} opened its new {facility} on {day}, after {months} months of construction.",
        f"The project cost {cost:,} dollars, paid partly by the regional government and partly by local donations.",
        f"Mayor {a} said the {facility} would give young people and families a safe place to spend their free time.",
        f"About {visitors} people came to the opening, and many of them said they had waited years for it.",
        f"Some residents, including shop owner {b}, complained about the noise and traffic during the building work.",
        f"The {facility} will be open every day except {rng.choice(WORDS.weekdays)}, and entry is free for children.",
        f"A small celebration with music and food is planned for the first weekend of {rng.choice(WORDS.months)}.",
    ]
    keep = [parts[0]] + [p for p in parts[1:] if rng.random() < 0.75]
    return f"a new {facility} in {town}", " ".join(keep)


def _summarization_item(rng: random.Random) -> str:
    subject, passage = _summary_passage(rng)
    return rng.choice(WORDS.summary_templates).format(p=passage, subject=subject)


def _rag_item(rng: random.Random) -> str:
    kind = rng.randrange(3)
    docs: list[str]
    if kind == 0:
        company, other = rng.sample(WORDS.rag_companies, 2)
        product = rng.choice(WORDS.rag_products)
        city, other_city = rng.sample(WORDS.rag_cities, 2)
        year, price, warranty = rng.randint(1985, 2020), rng.randint(19, 299), rng.choice([1, 2, 3, 5])
        staff = rng.randint(12, 900)
        facts = {
            "founded": (f"{company} was founded in {year} in {city} and now employs about {staff} people.",
                        f"In what year was {company} founded, and where?"),
            "product": (f"The best-selling item from {company} is {product}, which costs {price} dollars.",
                        f"What is {company}'s best-selling product, and how much does it cost?"),
            "warranty": (f"All {company} products come with a {warranty}-year warranty.",
                         f"How long is the warranty on {company} products?"),
        }
        distractor = (f"{other} is a competitor based in {other_city}, founded in {rng.randint(1985, 2020)}, "
                      f"which also makes {rng.choice(WORDS.rag_products)}.")
        keys = rng.sample(sorted(facts), rng.randint(2, 3))
        docs = [facts[k][0] for k in keys] + [distractor]
        question = facts[rng.choice(keys)][1]
    elif kind == 1:
        place, other = rng.sample(WORDS.rag_places, 2)
        animal = rng.choice(WORDS.rag_animals)
        height, visitors, month = rng.randint(200, 4500), rng.randint(5, 300) * 1000, rng.choice(WORDS.months)
        facts = {
            "size": (f"{place[0].upper() + place[1:]} rises to {height} meters at its highest point.",
                     f"How high is the highest point of {place}?"),
            "animal": (f"{place[0].upper() + place[1:]} is the only known home of {animal}.",
                       f"Which animal is found nowhere except {place}?"),
            "visitors": (f"About {visitors:,} tourists visit {place} every year, most of them in {month}.",
                         f"In which month do most tourists visit {place}, and how many come each year?"),
        }
        distractor = (f"{other[0].upper() + other[1:]} is a quieter destination, with about "
                      f"{rng.randint(1, 50) * 1000:,} visitors a year.")
        keys = rng.sample(sorted(facts), rng.randint(2, 3))
        docs = [facts[k][0] for k in keys] + [distractor]
        question = facts[rng.choice(keys)][1]
    else:
        name, other = rng.sample(WORDS.names, 2)
        town = rng.choice(WORDS.towns)
        open_h, close_h = rng.randint(7, 10), rng.randint(16, 21)
        fee, day = rng.choice([0, 3, 5, 8, 10]), rng.choice(WORDS.weekdays)
        venue = rng.choice(["the community pool", "the town museum", "the public library", "the climbing gym",
                            "the science center"])
        facts = {
            "hours": (f"In {town}, {venue} opens at {open_h} a.m. and closes at {close_h - 12} p.m., "
                      f"except on {day}, when it is closed.",
                      f"On which day is {venue} in {town} closed, and what are its opening hours?"),
            "fee": (f"Entry to {venue} costs {fee} dollars for adults" + (", and it is free for children under 12."
                                                                         if fee else "; it is free for everyone."),
                    f"How much does an adult pay to enter {venue}?"),
            "manager": (f"{name} has managed {venue} since {rng.randint(2005, 2023)}, taking over from {other}.",
                        f"Who manages {venue} now, and who was the previous manager?"),
        }
        keys = rng.sample(sorted(facts), rng.randint(2, 3))
        docs = [facts[k][0] for k in keys]
        if rng.random() < 0.6:
            docs.append(f"{other} now runs a bakery in {rng.choice(WORDS.towns)}.")
        question = facts[rng.choice(keys)][1]
    rng.shuffle(docs)
    style = rng.randrange(3)
    if style == 0:
        body = "\n".join(f"Document {i}: {d}" for i, d in enumerate(docs, 1))
    elif style == 1:
        body = "\n".join(f"({chr(97 + i)}) {d}" for i, d in enumerate(docs))
    else:
        body = "\n".join(f"* {d}" for d in docs)
    return f"{rng.choice(WORDS.rag_intros)}\n\n{body}\n\n{rng.choice(WORDS.rag_question_leads)} {question}"


def _random_stream(make: Callable[[random.Random], str], rng: random.Random) -> Iterator[str]:
    while True:
        yield make(rng)


# category -> (weight, finite list builder or None, random item maker or None)
_CATEGORIES: dict[str, tuple[float, Callable[[], list[str]] | None, Callable[[random.Random], str] | None]] = {
    "conversation": (10, _conversation, None),
    "translation": (12, _translation, None),
    "summarization": (10, None, _summarization_item),
    "qa": (12, _qa, None),
    "math": (10, None, _math_problem),
    "rag": (10, None, _rag_item),
    "reasoning": (4, None, _reasoning_problem),
    "explain": (6, _explain, None),
    "list": (4, _lists, None),
    "compare": (3, _compare, None),
    "creative": (5, _creative, None),
    "advice": (3, _advice, None),
    "howto": (4, _howto, None),
    "code": (4, _code, None),
    "definition": (2, _definitions, None),
    "pros_cons": (2, _pros_cons, None),
}


def training_instructions(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct instructions, deterministic for ``seed``, none equal to or overlapping a bench prompt.

    Categories are drawn by weight; finite template pools are shuffled per seed and used without repetition,
    randomised generators (math, summaries, retrieval) draw fresh numbers and facts. The first ``k`` items of a
    larger request equal ``training_instructions(k, seed)``.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    keep = _BenchFilter(bench_prompts())
    streams: dict[str, Iterator[str]] = {}
    for name, (_, build, make) in _CATEGORIES.items():
        crng = random.Random(f"{seed}/{name}")
        if build is not None:
            pool = build()
            crng.shuffle(pool)
            streams[name] = iter(pool)
        else:
            streams[name] = _random_stream(make, crng)
    weights = {name: w for name, (w, _, _) in _CATEGORIES.items()}
    pick = random.Random(f"{seed}/pick")
    seen: set[str] = set()
    out: list[str] = []
    misses = {name: 0 for name in streams}
    while len(out) < n:
        if not weights:
            raise ValueError(f"only {len(out)} distinct instructions available, asked for {n}")
        names = list(weights)
        name = pick.choices(names, weights=[weights[k] for k in names])[0]
        text = next(streams[name], None)
        if text is None or misses[name] > 200:  # finite pool spent, or a generator that keeps repeating
            del weights[name]
            continue
        if text in seen or not keep.allows(text):
            misses[name] += 1
            continue
        misses[name] = 0
        seen.add(text)
        out.append(text)
    return out


# ----------------------------------------------------------------------------------------------- documentation

DOC_MODULES = [
    "json", "os", "re", "collections", "itertools", "functools", "pathlib", "argparse", "datetime", "math",
    "statistics", "string", "textwrap", "typing", "dataclasses", "logging", "unittest", "http.client",
    "email.message", "csv", "sqlite3", "random", "heapq", "bisect", "shutil", "subprocess", "threading", "asyncio",
    "contextlib", "enum", "fractions", "decimal", "hashlib", "zipfile", "tarfile", "urllib.parse",
    "xml.etree.ElementTree", "difflib", "pprint", "calendar", "queue", "io",
]
MIN_DOC_CHARS = 200


def _clean_doc(doc: str | None) -> str:
    """Dedent, then collapse whitespace inside each paragraph (paragraphs stay separated by a blank line)."""
    if not doc:
        return ""
    text = inspect.cleandoc(textwrap.dedent(doc))
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if p)


def _module_docs(name: str) -> list[str]:
    try:
        module = importlib.import_module(name)
    except Exception:  # a stdlib module missing from a trimmed interpreter
        return []
    # where a module's own objects say they live: itself, its submodules, its C accelerator, os's posix/nt
    homes = {name, "_" + name.rsplit(".", 1)[-1]} | ({"posix", "nt"} if name == "os" else set())
    docs = [_clean_doc(module.__doc__)]
    for attr in sorted(vars(module)):
        if attr.startswith("_"):
            continue
        obj = vars(module)[attr]
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        home = getattr(obj, "__module__", None)
        if home is not None and home not in homes and not home.startswith(name + "."):
            continue  # re-exported from elsewhere: documented where it lives
        docs.append(_clean_doc(obj.__doc__))
        if inspect.isclass(obj):
            for meth in sorted(vars(obj)):
                if meth.startswith("_"):
                    continue
                member = vars(obj)[meth]
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member) or inspect.isroutine(member) or isinstance(member, property):
                    docs.append(_clean_doc(getattr(member, "__doc__", None)))
    return docs


def local_documentation_texts(max_chars: int, seed: int = 0) -> list[str]:
    """English docstrings of standard-library modules, classes and functions: cleaned, each at least
    MIN_DOC_CHARS long, deduplicated, shuffled by ``seed``, and cut so their total length is at most
    ``max_chars`` (the last one may be trimmed at a word boundary)."""
    texts: list[str] = []
    seen: set[str] = set()
    with warnings.catch_warnings():  # deprecated aliases (typing.io, typing.re) warn when touched
        warnings.simplefilter("ignore")
        docs = [doc for name in DOC_MODULES for doc in _module_docs(name)]
    for doc in docs:
        if len(doc) >= MIN_DOC_CHARS and doc not in seen:
            seen.add(doc)
            texts.append(doc)
    random.Random(seed).shuffle(texts)
    out: list[str] = []
    left = max_chars
    for text in texts:
        if left < MIN_DOC_CHARS:
            break
        if len(text) > left:
            text = text[:left].rsplit(" ", 1)[0].rstrip()
            if len(text) < MIN_DOC_CHARS:
                continue
        out.append(text)
        left -= len(text)
    return out


# ----------------------------------------------------------------------------------------------- second stage

BOOTSTRAP_KINDS = {"summarize": 3, "context_qa": 2, "sentence": 4, "rewrite": 1}


def _sentences(text: str) -> list[str]:
    """Plain sentences of 40..220 characters, without list markers or markdown."""
    out = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line).replace("**", "").strip()
        for s in re.split(r"(?<=[.!?])\s+", line):
            if 40 <= len(s) <= 220 and s[0].isupper() and s[-1] in ".!?" and "#" not in s:
                out.append(s)
    return out


def _passage(text: str, max_chars: int = 1200) -> str | None:
    """The answer's leading paragraphs up to ``max_chars`` (cut at a paragraph or sentence end); None if short."""
    text = text.strip()
    if len(text) < 200:
        return None
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n\n", 0, max_chars)
    if cut < 300:
        cut = max(text.rfind(". ", 0, max_chars) + 1, 0)
    return text[:cut].strip() if cut >= 300 else None


def bootstrap_instructions(instructions: list[str], answers: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` second-stage instructions built on the base model's own first-stage answers (the text after each
    instruction): summaries and rewrites of an answer, questions over an answer as context (the first-stage
    instruction as the question), and follow-ups, translations and rewrites of one of its sentences.

    The first stage's topics come from short lists; the answers range much wider, so this stage carries that
    wider vocabulary into realistic long-context prompts (summaries, retrieval) without any outside text.
    Deterministic for (inputs, seed); like ``training_instructions``, nothing overlaps a bench prompt.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    if len(instructions) != len(answers):
        raise ValueError(f"{len(instructions)} instructions but {len(answers)} answers")
    keep = _BenchFilter(bench_prompts())
    rng = random.Random(f"{seed}/bootstrap")
    kinds, weights = list(BOOTSTRAP_KINDS), list(BOOTSTRAP_KINDS.values())
    seen: set[str] = set()
    out: list[str] = []
    misses = 0
    while len(out) < n:
        if misses > 20 * max(n, 100) or not answers:
            raise ValueError(f"only {len(out)} distinct second-stage instructions from {len(answers)} answers, "
                             f"asked for {n}")
        i = rng.randrange(len(answers))
        kind = rng.choices(kinds, weights=weights)[0]
        text = None
        if kind in ("summarize", "rewrite", "context_qa"):
            p = _passage(answers[i])
            if p is not None and kind == "summarize":
                text = rng.choice(WORDS.bootstrap_summarize).format(p=p)
            elif p is not None and kind == "rewrite":
                text = rng.choice(WORDS.bootstrap_rewrite).format(p=p)
            elif p is not None and len(instructions[i]) <= 200 and "\n" not in instructions[i]:
                q = instructions[i].strip()
                text = rng.choice(WORDS.bootstrap_context_qa).format(p=p, q=q, q_lower=q[0].lower() + q[1:])
        else:
            sentences = _sentences(answers[i])
            if sentences:
                text = rng.choice(WORDS.bootstrap_sentence).format(s=rng.choice(sentences),
                                                             lang=rng.choice(WORDS.bootstrap_languages))
        if text is None or text in seen or not keep.allows(text):
            misses += 1
            continue
        seen.add(text)
        out.append(text)
    return out
