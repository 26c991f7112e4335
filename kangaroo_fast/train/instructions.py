"""Training text for the adapter, written offline: varied instructions (answered later by the base model itself)
and English documentation text taken from the Python standard library's docstrings.

The instructions come from templates x topics x task types, with a good share of the benchmark's categories
(conversation, translation, summarization, QA, math, retrieval-style questions), but none of them repeats a
benchmark prompt: anything equal to a turn of ``kangaroo_fast/data/prompts.jsonl``, or sharing any 8-word window
with one, is dropped. Everything here is deterministic for a given seed and uses only the standard library.
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


# ------------------------------------------------------------------------------------------------ vocabulary

NAMES = ["Anna", "Ben", "Carlos", "Dina", "Emil", "Fatima", "George", "Hana", "Ivan", "Julia", "Kofi", "Laura",
         "Mateo", "Nadia", "Oscar", "Paula", "Quinn", "Rosa", "Samir", "Tara", "Umar", "Vera", "Will", "Yuki",
         "Zoe", "Amir", "Bella", "Chen", "Daniel", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jonas", "Keiko",
         "Leo", "Mia", "Noah", "Olga", "Pedro", "Ruth", "Sofia", "Theo", "Uma", "Victor", "Wendy", "Xavier"]

EXPLAIN_TOPICS = [
    "photosynthesis", "the water cycle", "compound interest", "black holes", "the immune system", "gravity",
    "how a rainbow forms", "plate tectonics", "the greenhouse effect", "how the internet works", "supply and demand",
    "the theory of evolution", "electric circuits", "how batteries store energy", "the phases of the Moon",
    "why the ocean is salty", "how airplanes stay in the air", "the scientific method", "recycling",
    "how a credit score works", "machine learning", "what DNA does", "how volcanoes erupt", "the food chain",
    "how earthquakes happen", "the solar system", "how a bill becomes a law", "renewable energy",
    "how memory works in the brain", "the difference between a virus and a bacterium", "how soap cleans",
    "why we dream", "the stock market", "how a camera captures an image", "the Pythagorean theorem",
    "fractions", "how bread rises", "how tides work", "the Industrial Revolution", "how GPS finds your location",
    "how muscles grow", "the carbon cycle", "how a search engine ranks pages", "what a blockchain is",
    "how the ear hears sound", "why ice floats", "how a microwave oven heats food", "the Roman Empire",
    "how an electric motor works", "static electricity", "how bees make honey", "what an algorithm is",
    "how taxes pay for public services", "magnetism", "how clouds form", "the speed of light",
    "how a thermometer works", "cell division", "how coffee is made from beans", "erosion",
    "how a wind turbine makes electricity", "what an atom is made of", "the nitrogen cycle", "probability",
    "how the kidneys work", "why leaves change color in autumn", "how a lock and key work",
    "what a percentage is", "how fish breathe underwater", "the history of the printing press",
    "how a compass works", "what a metaphor is", "how a bicycle's gears work", "the difference between mass and weight",
    "how email gets delivered", "why cats purr", "how glass is made", "the role of a central bank",
    "how a solar panel works", "what a calorie is",
]

EXPLAIN_TEMPLATES = [
    "Explain {t} in simple terms.",
    "Give a short, clear explanation of {t}.",
    "Explain {t} to a ten-year-old.",
    "Write a paragraph that explains {t}.",
    "I never understood {t}. Can you explain it?",
    "Describe {t} in three or four sentences.",
    "Explain {t} using an everyday analogy.",
    "What should a high school student know about {t}?",
]

LIST_SUBJECTS = [
    "elephants", "the planet Mars", "the human brain", "the Amazon rainforest", "octopuses", "Japan", "Canada",
    "the Moon", "chocolate", "the Great Wall of China", "penguins", "volcanoes", "the Sahara desert", "owls",
    "the Pacific Ocean", "dolphins", "ancient Egypt", "the piano", "coffee", "sharks", "Mount Everest", "bamboo",
    "the Eiffel Tower", "honey", "tigers", "the Arctic", "Brazil", "the violin", "whales", "mushrooms",
    "Antarctica", "the Nile River", "Australia", "butterflies", "the Olympic Games", "trees", "Iceland",
    "spiders", "tea", "the Sun",
]
LIST_ACTIVITIES = [
    "learning a new language", "saving money", "studying for exams", "staying focused while working from home",
    "eating healthier", "making new friends in a new city", "getting better at public speaking",
    "keeping a small apartment tidy", "traveling on a tight budget", "writing a good résumé",
    "reducing plastic waste at home", "starting a vegetable garden", "taking better photos with a phone",
    "staying calm before a test", "being more productive in the morning", "reading more books",
    "learning to cook", "training a puppy", "running a successful meeting", "improving handwriting",
    "keeping a journal", "preparing for a long flight", "organizing a birthday party", "learning to swim as an adult",
    "drinking more water", "managing stress", "caring for a cat", "packing light for a trip",
    "writing clear emails", "getting started with meditation",
]
LIST_TEMPLATES_SUBJECT = [
    "List five interesting facts about {s}.",
    "Give me three fun facts about {s}.",
    "Tell me some surprising things about {s}.",
    "Write a short list of key facts about {s} for a school project.",
]
LIST_TEMPLATES_ACTIVITY = [
    "Give me five tips for {a}.",
    "List some practical ideas for {a}.",
    "What are the most common mistakes people make when {a}?",
    "Make a short checklist for {a}.",
    "Share three simple habits that help with {a}.",
]

COMPARE_PAIRS = [
    ("cats", "dogs"), ("tea", "coffee"), ("trains", "planes"), ("renting", "buying a home"), ("email", "phone calls"),
    ("e-books", "paper books"), ("summer", "winter"), ("cities", "the countryside"), ("walking", "cycling"),
    ("solar power", "wind power"), ("Python", "JavaScript"), ("a laptop", "a desktop computer"),
    ("crocodiles", "alligators"), ("weather", "climate"), ("a lake", "a sea"), ("viruses", "bacteria"),
    ("frogs", "toads"), ("baking", "frying"), ("stocks", "bonds"), ("a hurricane", "a tornado"),
    ("mammals", "reptiles"), ("Mars", "Venus"), ("a violin", "a cello"), ("running", "swimming"),
    ("working in an office", "working from home"), ("butter", "olive oil"), ("a debit card", "a credit card"),
    ("rivers", "canals"), ("the Sun", "other stars"), ("democracy", "monarchy"), ("tablets", "smartphones"),
    ("fiction", "non-fiction"), ("rabbits", "hares"), ("plastic bags", "paper bags"), ("an apple", "an orange"),
    ("classical music", "jazz"), ("the Arctic", "Antarctica"), ("speaking", "writing"), ("bees", "wasps"),
    ("a museum", "a zoo"),
]
COMPARE_TEMPLATES = [
    "Compare {a} and {b}.",
    "What are the main differences between {a} and {b}?",
    "How are {a} and {b} similar, and how are they different?",
    "Write a short comparison of {a} and {b}.",
    "Give me a quick side-by-side comparison of {a} versus {b}.",
]

STORY_CHARACTERS = [
    "a shy robot", "a young baker", "a lost kitten", "an old lighthouse keeper", "a curious girl", "a tired dragon",
    "a retired teacher", "a clumsy wizard", "a brave mouse", "a lonely astronaut", "a talking tree",
    "a street musician", "a boy who loves maps", "a nervous firefighter", "a grandmother and her grandson",
    "a fox who cannot run fast", "two rival chefs", "a penguin in the desert", "a delivery driver",
    "a princess who hates castles",
]
STORY_EVENTS = [
    "finds a mysterious key", "gets lost in a big city", "learns to be brave", "makes an unexpected friend",
    "discovers a hidden garden", "has to fix a broken machine", "wins a competition by accident",
    "travels to the Moon", "keeps a big secret", "helps a stranger on a rainy night", "loses something important",
    "opens a tiny shop", "finds a message in a bottle", "wakes up with a strange power",
    "has to be home before midnight", "plants a magic seed", "meets a famous person", "learns to say sorry",
    "goes on a long train journey", "builds a boat",
]
STORY_TEMPLATES = [
    "Write a short story about {c} who {e}.",
    "Tell me a bedtime story about {c} who {e}.",
    "Write a 150-word story about {c} who {e}.",
]
POEM_FORMS = ["a short poem", "a haiku", "a four-line rhyming poem", "a limerick", "a short free-verse poem"]
POEM_THEMES = [
    "the ocean", "autumn leaves", "a cup of morning coffee", "friendship", "the city at night", "a rainy day",
    "the first snow", "a cat sleeping in the sun", "growing old", "the mountains", "home", "a long journey",
    "the stars", "spring flowers", "a busy kitchen", "an old photograph", "the wind", "a library",
    "the last day of summer", "a river", "learning something new", "a lighthouse", "the moon", "silence",
    "a garden", "a train station", "hope", "a forest path", "a grandmother's kitchen", "the desert",
]
EMAIL_RECIPIENTS = ["my manager", "a teacher", "my landlord", "a colleague", "a customer", "my neighbor",
                    "a hotel", "a friend", "the school principal", "a job recruiter"]
EMAIL_PURPOSES = [
    "asking for a day off next Friday", "apologizing for missing a meeting", "asking for a deadline extension",
    "reporting a broken heater", "thanking them for their help", "inviting them to a small party",
    "asking about a job opening", "confirming a reservation", "following up on an unanswered message",
    "complaining politely about noise", "requesting a refund", "introducing myself",
]
EMAIL_TEMPLATES = ["Write a short email to {r} {p}.", "Draft a polite message to {r} {p}."]

ADVICE_SITUATIONS = [
    "I feel nervous every time I have to speak in class", "I keep putting off important tasks",
    "I just moved to a new city and don't know anyone", "my roommate never cleans the kitchen",
    "I want to change careers but I'm scared", "I spend too much time on my phone",
    "I can't decide which university to choose", "my friend forgot my birthday and I feel hurt",
    "I have two job offers and can't choose", "I want to learn to code but don't know where to start",
    "I get tired every afternoon at work", "I have trouble saying no to people",
    "my neighbor's dog barks all night", "I want to save for a holiday next year",
    "I feel overwhelmed by all my homework", "I'm starting my first job next week",
    "my grandmother wants to learn to use a smartphone", "I want to get back into reading",
    "I argued with my brother and want to make up", "I need to give a presentation tomorrow",
    "I can't stick to a workout routine", "I want to be more organized", "my team at work doesn't communicate well",
    "I'm thinking about adopting a dog", "I have too many subscriptions", "I'm bored with my daily routine",
]
ADVICE_TEMPLATES = [
    "{s}. What should I do?",
    "{s}. Do you have any advice?",
    "{s}. How can I handle this?",
    "Can you give me some advice? {s}.",
]

HOWTO_TASKS = [
    "boil an egg", "change a flat bicycle tire", "make a paper airplane", "plant tomatoes", "write a haiku",
    "tie a tie", "make pancakes", "clean a laptop keyboard", "set up a simple budget", "brew good tea",
    "fold a fitted sheet", "back up photos from my phone", "make a simple salad dressing", "start a blog",
    "wash a wool sweater", "learn a song on the piano", "remove a coffee stain", "prepare for a job interview",
    "make a smoothie", "hang a picture on the wall", "study for a math test", "cook rice on the stove",
    "create a strong password", "make a to-do list that works", "bake banana bread", "repot a plant",
    "write a thank-you note", "take care of a goldfish", "make a cup of hot chocolate", "clean a window without streaks",
    "sharpen a kitchen knife safely", "start a compost bin", "make a simple birdhouse", "pack a suitcase efficiently",
    "read a nutrition label", "memorize a short speech", "organize a bookshelf", "make lemonade",
    "set up a new email account", "unclog a sink without chemicals",
]
HOWTO_TEMPLATES = [
    "How do I {t}? Give step-by-step instructions.",
    "Explain the steps to {t}.",
    "What's the easiest way to {t}?",
    "Write simple instructions for how to {t}.",
]

CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "counts the vowels in a sentence",
    "returns the largest number in a list", "converts Celsius to Fahrenheit", "checks if a word is a palindrome",
    "computes the factorial of a number", "returns the Fibonacci numbers up to n", "removes duplicates from a list",
    "counts how often each word appears in a text", "sorts a list of names alphabetically",
    "calculates the average of a list of numbers", "merges two dictionaries", "reads a text file and counts its lines",
    "finds the second smallest number in a list", "checks whether a year is a leap year",
    "capitalizes the first letter of every word", "flattens a list of lists", "returns the sum of the digits of a number",
    "converts a list of strings to uppercase", "finds common elements in two lists", "generates a random password",
    "prints a multiplication table", "checks if two words are anagrams", "counts even and odd numbers in a list",
    "computes the greatest common divisor of two numbers", "converts minutes into hours and minutes",
    "returns the longest word in a sentence", "removes punctuation from a string", "simulates rolling a die",
    "finds the index of an item in a list", "splits a list into chunks of a given size",
    "validates a simple email address", "calculates simple interest", "reverses the order of words in a sentence",
    "checks whether a list is sorted", "computes the area of a circle", "counts the characters in a string without spaces",
    "returns a dictionary of letter frequencies", "converts a number to binary",
]
CODE_TEMPLATES = [
    "Write a Python function that {t}.",
    "Show me a simple Python program that {t}.",
    "Write a short Python script that {t}, and explain how it works.",
    "Can you give me beginner-friendly Python code that {t}?",
]

DEFINITION_WORDS = [
    "ephemeral", "resilience", "empathy", "democracy", "ecosystem", "nostalgia", "metaphor", "gravity", "inflation",
    "biodiversity", "algorithm", "procrastination", "irony", "hypothesis", "photosynthesis", "sustainability",
    "mindfulness", "diplomacy", "entrepreneur", "curiosity", "archipelago", "symbiosis", "paradox", "dialect",
    "renaissance", "vaccine", "gratitude", "migration", "allergy", "budget", "folklore", "humidity", "molecule",
    "satire", "velocity", "tradition", "census", "altitude", "fossil", "privacy", "optimism", "monopoly",
    "solstice", "pollination", "ambiguity", "encryption", "empire", "glacier", "idiom", "peninsula",
]
DEFINITION_TEMPLATES = [
    "What does the word \"{w}\" mean?",
    "Define \"{w}\" and use it in a sentence.",
    "Give a simple definition of {w}, with an example.",
    "What is the meaning of \"{w}\"? Explain it simply.",
]

PROS_CONS_THINGS = [
    "working from home", "electric cars", "social media", "living in a big city", "online shopping",
    "homeschooling", "public transport", "nuclear energy", "owning a pet", "school uniforms", "a four-day work week",
    "video games for children", "studying abroad", "self-driving cars", "buying second-hand clothes",
    "living alone", "smartphones for teenagers", "getting up early", "freelancing", "learning online",
    "tiny houses", "credit cards", "team sports", "fast food", "renting an apartment", "cash payments",
    "traveling by train", "open-plan offices", "reading the news every day", "vegetarian diets",
]
PROS_CONS_TEMPLATES = [
    "What are the pros and cons of {t}?",
    "List the advantages and disadvantages of {t}.",
    "Is {t} a good idea? Give arguments for and against.",
]

QA_QUESTIONS = [
    "How many bones are there in the adult human body?", "What is the boiling point of water at sea level?",
    "Why do cats have whiskers?", "What is the tallest mountain in the world?", "How far away is the Moon?",
    "What language has the most native speakers?", "Why do onions make people cry?",
    "What is the smallest planet in our solar system?", "How do birds know where to migrate?",
    "What is the chemical symbol for gold?", "Who painted the Mona Lisa?", "Why do we get goosebumps?",
    "How long does it take light from the Sun to reach Earth?", "What is the longest river in Africa?",
    "Why does bread go stale?", "What are the three states of matter?", "Who was the first person to walk on the Moon?",
    "Why do zebras have stripes?", "What is the hardest natural substance?", "How does a bee sting work?",
    "What is the capital of Australia, and why isn't it Sydney?", "Why is the Dead Sea so salty?",
    "What do the lungs do?", "How many continents are there, and what are they?", "Why do we have time zones?",
    "How does a rainbow get its colors?", "What is the difference between an ocean and a sea?",
    "Who invented the telephone?", "Why do stars twinkle?", "What is the speed of sound in air?",
    "How do chameleons change color?", "What causes thunder?", "Why do some animals hibernate?",
    "How old is the Earth?", "What is an eclipse?", "What do red blood cells do?", "Why is Mars red?",
    "How does a compass always point north?", "What causes hiccups?", "Who wrote Pride and Prejudice?",
    "How many players are on a soccer team?", "What is the largest desert in the world?",
    "Why do apples turn brown after being cut?", "What is the Great Barrier Reef?",
    "How do submarines dive and surface?", "Why does the Moon change shape during the month?",
    "What was the Silk Road?", "How do fireflies glow?", "What is the main gas in Earth's atmosphere?",
    "What is a light-year?", "Why do we need vitamins?", "How does a seed grow into a plant?",
    "Why does metal feel colder than wood at the same temperature?", "What is the purpose of the United Nations?",
    "Why do our ears pop on an airplane?", "How do noise-cancelling headphones work?",
    "What is the difference between a frog and a toad?", "What do bees do in winter?",
    "Why is exercise good for the heart?", "What is the function of the liver?",
]
QA_COUNTRIES = [
    "France", "Japan", "Brazil", "Kenya", "Canada", "India", "Egypt", "Norway", "Mexico", "Argentina", "Italy",
    "Spain", "Germany", "Thailand", "Peru", "Vietnam", "Morocco", "Greece", "Turkey", "Chile", "Sweden",
    "Portugal", "Indonesia", "South Korea", "Ireland", "New Zealand", "Poland", "Ghana", "Colombia", "Finland",
]
QA_COUNTRY_TEMPLATES = [
    "What is the capital of {c}?",
    "What language or languages are spoken in {c}?",
    "What is {c} famous for?",
    "Tell me a few basic facts about the geography of {c}.",
    "What is the climate like in {c}?",
]
QA_WRAPPERS = ["{q}", "Quick question: {q}", "{q} Please keep the answer short.", "I've always wondered: {q}",
               "{q} Explain briefly."]

# translation: short everyday sentences, in English and in each source language
TRANSLATE_EN = [
    "Good morning, how are you?", "My name is Paul and I am a teacher.", "Can you help me, please?",
    "The shop opens at nine o'clock.", "I am looking for the bus stop.", "We had a wonderful dinner last night.",
    "How much does this jacket cost?", "I don't understand, can you repeat that?", "My sister lives in London.",
    "It is very cold outside today.", "I like to read books in the evening.", "Where can I buy a ticket?",
    "The museum is closed on Mondays.", "We are going to the beach on Sunday.", "I have two brothers and one sister.",
    "Could I have the bill, please?", "The train is late again.", "She works at a bank in the city center.",
    "I need a room for two nights.", "Do you speak English?", "The cat is sleeping on the sofa.",
    "I would like to order a pizza.", "What time is it?", "He plays football every Saturday.",
    "The library is next to the school.", "I am hungry, let's eat something.", "Happy birthday! I hope you have a great day.",
    "My favorite color is green.", "It's raining, so take an umbrella.", "We visited our grandparents last summer.",
    "The soup is too hot.", "Please close the window.", "I'm sorry, I am late.", "My phone battery is almost empty.",
    "The doctor will see you now.", "Our flight leaves at seven in the morning.", "I love walking in the forest.",
    "This is my first time in this city.", "Can I pay by card?", "Turn left at the next street.",
    "The children are at school.", "I drink tea every morning.", "See you tomorrow!", "The water is very clear here.",
    "My friend is coming to visit next week.", "I lost my keys.", "The concert starts at eight.",
    "We need to buy milk and eggs.", "He is learning to play the piano.", "The hotel has a beautiful garden.",
    "I usually take the bus to work.", "Is this seat free?", "The weather will be sunny tomorrow.",
    "I am allergic to nuts.", "Our house has three bedrooms.", "What do you recommend?",
    "She is reading a newspaper in the café.", "I forgot my umbrella at home.", "The bakery sells fresh bread every morning.",
    "Thank you for the lovely gift.",
]
TRANSLATE_FOREIGN = {
    "French": [
        "Bonjour, je voudrais un café, s'il vous plaît.", "Il fait beau aujourd'hui.", "Où est la gare ?",
        "J'aime beaucoup la musique classique.", "Nous allons au cinéma ce soir.", "Mon frère habite à Paris.",
        "Le magasin ferme à dix-neuf heures.", "Je suis fatigué après le travail.", "Elle parle trois langues.",
        "Les enfants jouent dans le jardin.", "Combien coûte ce livre ?", "Je ne trouve pas mes lunettes.",
        "Nous avons mangé au restaurant hier soir.", "Le train part dans dix minutes.", "J'ai un chat noir.",
        "Il pleut depuis ce matin.", "Pouvez-vous parler plus lentement ?", "La bibliothèque est fermée le dimanche.",
        "Ma mère prépare une soupe aux légumes.", "Je vais à la plage avec mes amis.",
    ],
    "German": [
        "Guten Morgen, wie geht es dir?", "Ich wohne in einer kleinen Stadt.", "Wo ist die Apotheke?",
        "Wir fahren am Wochenende in die Berge.", "Das Wetter ist heute schlecht.", "Mein Vater kocht sehr gern.",
        "Ich trinke keinen Kaffee.", "Der Zug hat zehn Minuten Verspätung.", "Kannst du mir bitte helfen?",
        "Die Katze schläft auf dem Bett.", "Ich lerne seit zwei Jahren Deutsch.", "Wie viel kostet das Ticket?",
        "Wir haben heute keine Schule.", "Meine Schwester spielt Gitarre.", "Das Restaurant ist sehr beliebt.",
        "Ich habe meinen Schlüssel verloren.", "Im Winter gibt es hier viel Schnee.", "Er arbeitet in einem Krankenhaus.",
        "Der Park ist sehr schön im Frühling.", "Ich möchte ein Zimmer reservieren.",
    ],
    "Spanish": [
        "Buenos días, ¿cómo estás?", "Me gusta mucho la comida italiana.", "¿Dónde está el baño?",
        "Vivo en una casa cerca del mar.", "Mi hermano tiene doce años.", "Hoy hace mucho calor.",
        "Vamos a cenar en casa de mis padres.", "El autobús llega a las ocho.", "No entiendo esta palabra.",
        "Ella trabaja en una escuela.", "¿Cuánto cuesta esta camisa?", "Los niños están en el parque.",
        "Necesito comprar pan y leche.", "Mi perro se llama Max.", "El museo abre a las diez.",
        "Estudio español desde hace un año.", "Me duele la cabeza.", "Nos vemos el próximo lunes.",
        "La película fue muy divertida.", "Quiero viajar a México el año que viene.",
    ],
}
TRANSLATE_TO_TEMPLATES = [
    "Translate into {lang}: {s}",
    "How would you say \"{s}\" in {lang}?",
    "Please translate this sentence to {lang}: \"{s}\"",
    "Translate the following English sentence into {lang}.\n\n{s}",
    "I'm learning {lang}. How do I say: \"{s}\"?",
]
TRANSLATE_FROM_TEMPLATES = [
    "Translate this {lang} sentence into English: \"{s}\"",
    "What does \"{s}\" mean in English?",
    "Translate from {lang} to English: {s}",
    "Please give me the English translation of this {lang} sentence: {s}",
    "My {lang} friend wrote \"{s}\". What does that mean?",
]

CHAT_OPENERS = ["", "Hi! ", "Hello, ", "Hey there. ", "Good evening! ", "Hi there, quick one: "]
CHAT_REQUESTS = [
    "How are you doing today?", "I'm bored. Can you suggest something fun to do this afternoon?",
    "Can you tell me a joke?", "What's a good movie to watch with my family tonight?",
    "I just got a new puppy! What should I name her?", "I'm feeling a bit down today. Can you cheer me up?",
    "What would you do with a free Sunday?", "Can you recommend a good book for a long trip?",
    "I passed my driving test today!", "What's your favorite season, and why?",
    "I can't decide what to cook for dinner. Any ideas?", "Tell me something interesting I probably don't know.",
    "I'm going to Italy next month. What should I not miss?", "Can you help me plan a relaxing evening?",
    "Let's play a word game. Can you think of an animal for every letter from A to E?",
    "What's a nice gift for a friend who loves gardening?", "I just finished a marathon and I'm exhausted!",
    "Can you suggest a fun name for a book club?", "I'd like to start a new hobby. What do you suggest?",
    "What are some good conversation starters at a party?", "Can you tell me a riddle?",
    "I have a free hour. Should I read, walk, or nap?", "My best friend is moving away. How can I say goodbye?",
    "What's a good way to celebrate a small win at work?", "I'm learning to bake. What should I try first?",
    "Do you have any ideas for a picnic menu?", "Can you recommend some calming music for studying?",
    "I want to surprise my parents. Any ideas?", "What's a good board game for four people?",
    "Can you give me a motivational quote and explain it?",
]
CHAT_FOLLOWUPS = [
    "", " Keep it short, please.", " Thanks!", " I'd love a few options.", " Please explain your reasons.",
]

REASONING_JOBS = ["a doctor", "a pilot", "a teacher", "a chef", "an artist", "a lawyer", "a farmer", "an engineer"]
REASONING_COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]
REASONING_SUFFIXES = ["Explain your reasoning.", "Think it through step by step.", "Show how you figured it out.",
                      "Walk me through the logic."]

# summarization: passages assembled from facts about a subject, or filled-in report templates
SUMMARY_FACTS = {
    "the octopus": [
        "The octopus is a soft-bodied animal with eight arms and no bones.",
        "It belongs to a group of animals called cephalopods, which also includes squids and cuttlefish.",
        "Octopuses can change the color and texture of their skin in a fraction of a second to hide from predators.",
        "Each arm contains many nerve cells, so the arms can react to touch and taste almost on their own.",
        "In experiments, octopuses have opened jars, solved simple mazes, and escaped from their tanks.",
        "Most species live for only one or two years, and females usually die soon after their eggs hatch.",
        "When threatened, an octopus can squirt a cloud of dark ink and jet away through the water.",
        "Scientists study octopuses to learn how intelligence can evolve in animals very different from us.",
    ],
    "tea": [
        "Tea is made from the leaves of a plant called Camellia sinensis.",
        "According to legend, it was first brewed in China thousands of years ago.",
        "Green, black, and oolong teas come from the same plant but are processed in different ways.",
        "Black tea is fully oxidized, which gives it a darker color and a stronger flavor.",
        "Tea spread to Europe in the seventeenth century and quickly became popular in Britain.",
        "Today, it is the most widely consumed drink in the world after water.",
        "Many people drink tea for its calming effect, although it also contains caffeine.",
        "Large tea plantations are found in India, Sri Lanka, Kenya, and China.",
    ],
    "public libraries": [
        "Public libraries lend books, films, and music to anyone with a library card, usually for free.",
        "Many libraries also offer free internet access and computers for people who do not have them at home.",
        "Librarians help visitors find information and teach skills such as searching online safely.",
        "Children's reading programs encourage young people to read during the summer holidays.",
        "Some libraries now lend unusual items, such as tools, musical instruments, and board games.",
        "Libraries are often funded by local governments and rely on volunteers for extra activities.",
        "In small towns, the library can be one of the few free indoor public spaces.",
        "Digital lending lets members borrow e-books and audiobooks without visiting the building.",
    ],
    "volcanoes": [
        "A volcano is an opening in the Earth's crust through which melted rock, gas, and ash escape.",
        "Melted rock below the surface is called magma; once it reaches the surface, it is called lava.",
        "Most volcanoes are found along the edges of tectonic plates, especially around the Pacific Ocean.",
        "Some eruptions are gentle, with lava flowing slowly, while others are explosive.",
        "Volcanic ash can travel thousands of kilometers and disrupt air traffic.",
        "Over time, volcanic soil becomes very fertile, which is why farms are often found near volcanoes.",
        "Scientists monitor earthquakes and gas levels to predict when a volcano might erupt.",
        "Some islands, such as Hawaii and Iceland, were formed almost entirely by volcanic activity.",
    ],
    "urban gardening": [
        "Urban gardening means growing plants and food in cities, on balconies, rooftops, or shared plots.",
        "It can provide fresh vegetables for families who live far from large supermarkets.",
        "Community gardens also give neighbors a place to meet and work together.",
        "Plants on rooftops help cool buildings in summer and absorb rainwater.",
        "Gardeners in cities must often deal with small spaces, poor soil, and limited sunlight.",
        "Raised beds and containers allow people to grow food even where the ground is paved.",
        "Schools use gardens to teach children where food comes from.",
        "Some cities offer free seeds and workshops to encourage more residents to start gardening.",
    ],
    "the Moon": [
        "The Moon is Earth's only natural satellite and is about a quarter of Earth's width.",
        "It takes about 27 days to orbit the Earth, and the same side always faces us.",
        "The Moon has no air to breathe, and its surface is covered in dust and craters.",
        "Its gravity pulls on the oceans and causes the tides.",
        "Twelve astronauts walked on the Moon between 1969 and 1972.",
        "Scientists believe the Moon formed after a large object crashed into the young Earth.",
        "Temperatures on the Moon range from extremely hot in sunlight to extremely cold in shadow.",
        "Several countries are now planning new missions to explore the Moon's south pole.",
    ],
    "sleep in animals": [
        "Almost all animals sleep or rest in some way, but they do it very differently.",
        "Dolphins let one half of the brain sleep at a time, so they can keep swimming and breathing.",
        "Giraffes sleep only a few hours a day, often in short naps while standing.",
        "Bats can sleep up to twenty hours a day, hanging upside down.",
        "Some birds can sleep while flying during long migrations.",
        "Scientists think sleep helps animals save energy and repair their bodies.",
        "Even tiny animals such as fruit flies show sleep-like behavior.",
        "Studying animal sleep helps researchers understand why humans need sleep too.",
    ],
    "the history of chocolate": [
        "Chocolate is made from the seeds of the cacao tree, which grows in tropical regions.",
        "The ancient Maya and Aztecs made a bitter drink from roasted cacao beans.",
        "Cacao beans were so valuable that the Aztecs sometimes used them as money.",
        "Spanish explorers brought cacao to Europe in the sixteenth century, where sugar was added.",
        "In the nineteenth century, new machines made it possible to produce solid chocolate bars.",
        "Milk chocolate was developed in Switzerland by mixing chocolate with powdered milk.",
        "Today, most of the world's cacao is grown in West Africa.",
        "Many companies now try to buy cacao from farms that pay fair wages.",
    ],
    "electric bicycles": [
        "An electric bicycle has a small motor that helps the rider while pedaling.",
        "The motor is powered by a rechargeable battery, usually mounted on the frame.",
        "E-bikes make it easier to climb hills and travel longer distances without getting tired.",
        "Many commuters use them to avoid traffic and save money on fuel and parking.",
        "Most e-bikes can travel between 40 and 100 kilometers on a single charge.",
        "In many countries, e-bikes are limited to a top speed of about 25 kilometers per hour.",
        "Critics point out that the batteries are expensive and must be recycled carefully.",
        "Sales of electric bicycles have grown quickly in Europe and Asia over the past decade.",
    ],
    "learning a second language": [
        "Learning a second language can open up new job opportunities and make travel easier.",
        "Children often pick up pronunciation more easily, but adults can learn grammar and vocabulary quickly.",
        "Regular practice, even fifteen minutes a day, is more effective than long, rare study sessions.",
        "Speaking with native speakers helps learners understand everyday expressions.",
        "Some studies suggest that bilingual people are better at switching between tasks.",
        "Watching films with subtitles is a popular way to improve listening skills.",
        "Making mistakes is a normal part of learning and should not discourage learners.",
        "Many people find that learning a language also teaches them about another culture.",
    ],
    "the Great Wall of China": [
        "The Great Wall of China is a series of walls and fortifications built over many centuries.",
        "Its main purpose was to protect Chinese states from raids by groups from the north.",
        "Most of the wall that visitors see today was built during the Ming dynasty.",
        "Including all its branches, the wall stretches for thousands of kilometers.",
        "Soldiers used watchtowers along the wall to send signals with smoke and fire.",
        "Builders used earth, wood, bricks, and stone, depending on the local materials.",
        "Parts of the wall have been damaged by weather and by people taking its stones.",
        "Today it is one of the most visited tourist attractions in the world.",
    ],
    "recycling plastic": [
        "Plastic is used in packaging, clothing, cars, and countless everyday products.",
        "Only a small share of all the plastic ever made has been recycled.",
        "Different types of plastic must be sorted before they can be recycled.",
        "Recycled plastic is often turned into lower-quality products, such as park benches or fibers.",
        "Food waste and dirt left in containers can make recycling more difficult.",
        "Many cities now ban single-use plastic bags to reduce waste.",
        "Researchers are developing new methods to break plastic down into its original chemicals.",
        "Using fewer plastic products is still the most effective way to reduce plastic waste.",
    ],
}
SUMMARY_TEMPLATES = [
    "Summarize this text in one sentence:\n\n{p}",
    "Read the passage and give me a brief summary.\n\n{p}",
    "Give the main idea of the following paragraph in two or three sentences.\n\n{p}",
    "{p}\n\nSummarize the paragraph above in a few words.",
    "Turn this text into three short bullet points:\n\n{p}",
    "Here is a paragraph about {subject}:\n\n{p}\n\nWhat is it mainly about? Answer in one or two sentences.",
    "Please write a short summary of this passage for a busy reader.\n\n{p}",
]
TOWNS = ["Millbrook", "Stonebridge", "Ashford", "Lakeview", "Fernhill", "Oakdale", "Redwater", "Pinecrest",
         "Harrowgate", "Silverton", "Brookfield", "Eastwick"]
FACILITIES = ["swimming pool", "skate park", "community center", "bicycle path", "public library branch",
              "farmers' market", "playground", "sports hall", "concert hall", "repair café"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]

# retrieval-style: invented entities described by a few short "documents"
RAG_COMPANIES = ["Brightwave", "Northpeak", "Lumora", "Tidewell", "Quillstone", "Verdant Labs", "Orbitex",
                 "Kestrel Foods", "Silvergate", "Hollowbrook Tools", "Zephyr Audio", "Cobalt Bikes"]
RAG_PRODUCTS = ["a smart thermostat", "a folding bicycle", "noise-cancelling earbuds", "a solar lantern",
                "a coffee grinder", "a children's tablet", "a robot vacuum", "a water filter bottle",
                "an electric kettle", "a fitness tracker"]
RAG_CITIES = ["Portsmouth", "Valencia", "Gdansk", "Tampere", "Porto", "Leeds", "Lyon", "Graz", "Utrecht", "Bergen",
              "Bologna", "Cork"]
RAG_PLACES = ["Corvin Island", "Mount Alder", "the Rusk Valley", "Lake Ombra", "the Fellow Hills", "Port Sable",
              "the Harlan Plateau", "Windmere Forest", "the Isle of Tresk", "Cape Marlow"]
RAG_ANIMALS = ["the blue-tailed marsh lizard", "the striped river shrew", "the golden cliff owl",
               "the spotted dune beetle", "the silver reef eel", "the crested valley finch"]
RAG_INTROS = [
    "Read the following documents and answer the question.",
    "Below are some search results. Use them to answer.",
    "Context documents are given below.",
    "Here is some background material.",
    "I found these snippets online.",
]
RAG_QUESTION_LEADS = ["Question:", "Q:", "Based only on the text above:", "Using these documents, answer:"]


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
    return _fill(EXPLAIN_TEMPLATES, t=EXPLAIN_TOPICS)


def _lists() -> list[str]:
    return _fill(LIST_TEMPLATES_SUBJECT, s=LIST_SUBJECTS) + _fill(LIST_TEMPLATES_ACTIVITY, a=LIST_ACTIVITIES)


def _compare() -> list[str]:
    out = []
    for a, b in COMPARE_PAIRS:
        out += [t.format(a=a, b=b) for t in COMPARE_TEMPLATES]
    return out


def _creative() -> list[str]:
    stories = _fill(STORY_TEMPLATES, c=STORY_CHARACTERS, e=STORY_EVENTS)
    poems = [f"Write {form} about {theme}." for form in POEM_FORMS for theme in POEM_THEMES]
    emails = _fill(EMAIL_TEMPLATES, r=EMAIL_RECIPIENTS, p=EMAIL_PURPOSES)
    return stories + poems + emails


def _advice() -> list[str]:
    out = []
    for s in ADVICE_SITUATIONS:
        for t in ADVICE_TEMPLATES:
            text = t.format(s=s)
            out.append(text[0].upper() + text[1:])
    return out


def _howto() -> list[str]:
    return _fill(HOWTO_TEMPLATES, t=HOWTO_TASKS)


def _code() -> list[str]:
    return _fill(CODE_TEMPLATES, t=CODE_TASKS)


def _definitions() -> list[str]:
    return _fill(DEFINITION_TEMPLATES, w=DEFINITION_WORDS)


def _pros_cons() -> list[str]:
    return _fill(PROS_CONS_TEMPLATES, t=PROS_CONS_THINGS)


def _qa() -> list[str]:
    return _fill(QA_WRAPPERS, q=QA_QUESTIONS) + _fill(QA_COUNTRY_TEMPLATES, c=QA_COUNTRIES)


def _translation() -> list[str]:
    out = _fill(TRANSLATE_TO_TEMPLATES, lang=list(TRANSLATE_FOREIGN), s=TRANSLATE_EN)
    for lang, sentences in TRANSLATE_FOREIGN.items():
        out += _fill(TRANSLATE_FROM_TEMPLATES, lang=[lang], s=sentences)
    return out


def _conversation() -> list[str]:
    out = []
    for opener, request, follow in itertools.product(CHAT_OPENERS, CHAT_REQUESTS, CHAT_FOLLOWUPS):
        lower = opener.endswith((", ", ": ")) and not re.match(r"I\b", request)
        text = opener + (request[0].lower() + request[1:] if lower else request)
        out.append(text + follow)
    return out


def _math_problem(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
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
        a, b, c = rng.sample(NAMES, 3)
        adj, sup = rng.choice([("taller", "tallest"), ("older", "oldest"), ("faster", "fastest"),
                               ("heavier", "heaviest")])
        text = f"{a} is {adj} than {b}, and {b} is {adj} than {c}. Who is the {sup}?"
    elif kind == 1:
        a, b, c = rng.sample(NAMES, 3)
        x, y, z = rng.sample(REASONING_JOBS, 3)
        text = (f"{a}, {b} and {c} are {x}, {y} and {z}, in some order. {a} is not {x}, {b} is not {x} and "
                f"{b} is not {y}. Who has which job?")
    elif kind == 2:
        a, b = rng.sample(NAMES, 2)
        c1, c2 = rng.sample(REASONING_COLORS, 2)
        n1, n2 = rng.randint(2, 6), rng.randint(2, 6)
        text = (f"A bag has {n1} {c1} balls and {n2} {c2} balls. {a} takes out one ball without looking. "
                f"What is the chance that it is {c1}?")
    elif kind == 3:
        first, weeks = rng.choice(WEEKDAYS), rng.randint(1, 4)
        extra = rng.randint(1, 6)
        text = f"Today is {first}. What day of the week will it be in {weeks * 7 + extra} days?"
    else:
        a = rng.choice(NAMES)
        n_socks = rng.choice([2, 3, 4])
        text = (f"{a} has a drawer with socks in {n_socks} different colors, all mixed up, and the room is dark. "
                f"How many socks must {a} take out to be sure of having a matching pair?")
    return f"{text} {rng.choice(REASONING_SUFFIXES)}"


def _summary_passage(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.7:
        subject = rng.choice(sorted(SUMMARY_FACTS))
        facts = SUMMARY_FACTS[subject]
        k = rng.randint(4, min(7, len(facts)))
        chosen = sorted(rng.sample(range(len(facts)), k))
        if chosen[0] != 0 and rng.random() < 0.7:
            chosen = [0] + chosen[:-1]
        return subject, " ".join(facts[i] for i in chosen)
    town, facility = rng.choice(TOWNS), rng.choice(FACILITIES)
    cost, months, day = rng.randint(2, 40) * 100_000, rng.randint(3, 18), rng.choice(WEEKDAYS)
    a, b = rng.sample(NAMES, 2)
    visitors = rng.randint(2, 30) * 50
    parts = [
        f"The town of {town} opened its new {facility} on {day}, after {months} months of construction.",
        f"The project cost {cost:,} dollars, paid partly by the regional government and partly by local donations.",
        f"Mayor {a} said the {facility} would give young people and families a safe place to spend their free time.",
        f"About {visitors} people came to the opening, and many of them said they had waited years for it.",
        f"Some residents, including shop owner {b}, complained about the noise and traffic during the building work.",
        f"The {facility} will be open every day except {rng.choice(WEEKDAYS)}, and entry is free for children.",
        f"A small celebration with music and food is planned for the first weekend of {rng.choice(MONTHS)}.",
    ]
    keep = [parts[0]] + [p for p in parts[1:] if rng.random() < 0.75]
    return f"a new {facility} in {town}", " ".join(keep)


def _summarization_item(rng: random.Random) -> str:
    subject, passage = _summary_passage(rng)
    return rng.choice(SUMMARY_TEMPLATES).format(p=passage, subject=subject)


def _rag_item(rng: random.Random) -> str:
    kind = rng.randrange(3)
    docs: list[str]
    if kind == 0:
        company, other = rng.sample(RAG_COMPANIES, 2)
        product = rng.choice(RAG_PRODUCTS)
        city, other_city = rng.sample(RAG_CITIES, 2)
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
                      f"which also makes {rng.choice(RAG_PRODUCTS)}.")
        keys = rng.sample(sorted(facts), rng.randint(2, 3))
        docs = [facts[k][0] for k in keys] + [distractor]
        question = facts[rng.choice(keys)][1]
    elif kind == 1:
        place, other = rng.sample(RAG_PLACES, 2)
        animal = rng.choice(RAG_ANIMALS)
        height, visitors, month = rng.randint(200, 4500), rng.randint(5, 300) * 1000, rng.choice(MONTHS)
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
        name, other = rng.sample(NAMES, 2)
        town = rng.choice(TOWNS)
        open_h, close_h = rng.randint(7, 10), rng.randint(16, 21)
        fee, day = rng.choice([0, 3, 5, 8, 10]), rng.choice(WEEKDAYS)
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
            docs.append(f"{other} now runs a bakery in {rng.choice(TOWNS)}.")
        question = facts[rng.choice(keys)][1]
    rng.shuffle(docs)
    style = rng.randrange(3)
    if style == 0:
        body = "\n".join(f"Document {i}: {d}" for i, d in enumerate(docs, 1))
    elif style == 1:
        body = "\n".join(f"({chr(97 + i)}) {d}" for i, d in enumerate(docs))
    else:
        body = "\n".join(f"* {d}" for d in docs)
    return f"{rng.choice(RAG_INTROS)}\n\n{body}\n\n{rng.choice(RAG_QUESTION_LEADS)} {question}"


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

BOOTSTRAP_SUMMARIZE = [
    "Summarize the following text in a few sentences:\n\n{p}",
    "Give a one-paragraph summary of this:\n\n{p}",
    "What are the main points of the passage below?\n\n{p}",
    "Write a short summary, at most three sentences, of the following text.\n\n{p}",
    "Here is an article:\n\n{p}\n\nSummarize it for someone who has no time to read it.",
    "Condense this into a few bullet points:\n\n{p}",
    "Read this and tell me briefly what it says.\n\n\"{p}\"",
]
BOOTSTRAP_CONTEXT_QA = [
    "Use the context below to answer the question.\n\nContext: {p}\n\nQuestion: {q}",
    "Answer the question using only the information in the document.\n\nDocument:\n{p}\n\nQuestion: {q}",
    "{p}\n\nBased on the text above, {q_lower}",
    "Here are my notes:\n{p}\n\nFrom these notes, {q_lower}",
]
BOOTSTRAP_SENTENCE = [
    "Can you explain this in more detail: \"{s}\"",
    "Give me an example that illustrates this: {s}",
    "Is this true? \"{s}\" Explain why or why not.",
    "Rewrite this sentence in simpler words: {s}",
    "Translate into {lang}: {s}",
    "How would you say this in {lang}? \"{s}\"",
    "Please translate the following sentence to {lang}.\n\n{s}",
    "Turn this sentence into a question and answer it: {s}",
]
BOOTSTRAP_REWRITE = [
    "Rewrite the following paragraph so that a child could understand it:\n\n{p}",
    "Make this text more formal:\n\n{p}",
    "Shorten this paragraph without losing its meaning:\n\n{p}",
    "Suggest a good title for this text and explain your choice.\n\n{p}",
]
BOOTSTRAP_LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese"]
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
                text = rng.choice(BOOTSTRAP_SUMMARIZE).format(p=p)
            elif p is not None and kind == "rewrite":
                text = rng.choice(BOOTSTRAP_REWRITE).format(p=p)
            elif p is not None and len(instructions[i]) <= 200 and "\n" not in instructions[i]:
                q = instructions[i].strip()
                text = rng.choice(BOOTSTRAP_CONTEXT_QA).format(p=p, q=q, q_lower=q[0].lower() + q[1:])
        else:
            sentences = _sentences(answers[i])
            if sentences:
                text = rng.choice(BOOTSTRAP_SENTENCE).format(s=rng.choice(sentences),
                                                             lang=rng.choice(BOOTSTRAP_LANGUAGES))
        if text is None or text in seen or not keep.allows(text):
            misses += 1
            continue
        seen.add(text)
        out.append(text)
    return out
