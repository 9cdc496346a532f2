"""Build the project's default model: a tiny Llama-style story and chat model, trained locally.

The server needs a real Hugging Face model folder to serve, and the build machine
has no access to the Hugging Face hub. So this script makes one from scratch, fast
and deterministically on a couple of CPU cores:

1. a seeded corpus of simple children's stories (with a little non-ASCII text, so
   the tokenizer has multi-byte characters that split across tokens) and templated
   ChatML dialogues (greetings, small sums, a table of facts, repeat-after-me, short
   instructions), rendered as the chat template renders them,
2. a byte-level BPE tokenizer with ChatML special tokens,
3. a small Llama causal LM (grouped-query attention, tied embeddings),
4. saved with ``save_pretrained`` (EOS ids: ``<|endoftext|>`` and ``<|im_end|>``, which
   ends a chat turn) plus a ``.complete`` stamp written last.

Usage: python tools/build_default_model.py [--out build/models/default] [--force]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

# The tokenizer trainer's threads break ties between equally frequent merges in any order: one
# thread, so every build of the same settings is the same model.
os.environ["TOKENIZERS_PARALLELISM"] = "false"

if TYPE_CHECKING:  # heavy imports stay lazy so the "already built" path is instant
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "build" / "models" / "default"
STAMP = ".complete"

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Everything that determines the weights. It is also written into the stamp, so a
# folder built with other settings is easy to recognise.
SETTINGS: dict[str, int | float] = {
    "seed": 0,
    "num_stories": 1800,
    "num_dialogues": 18000,
    "vocab_size": 2048,
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "seq_len": 128,
    "batch_size": 4,  # small batches, many steps: a tiny model learns its answers much sooner
    "steps": 1000,
    "warmup_steps": 60,
    "lr": 2e-3,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.1,
}
# Expected training time on 2 idle cores (about 60 s): only for a note when a busy
# machine takes longer. Training always runs its fixed step count, so the model is
# the same on every machine.
TIME_BUDGET_S = 90.0
SAMPLE_PROMPT = "Once upon a time"
SAMPLE_QUESTIONS = ["Hello!", "What is 2+2?", "What is the capital of France?",
                    "Repeat after me: red apple"]


# --------------------------------------------------------------------------- corpus

# Word lists: a few hundred distinct words, enough for a ~2k-token BPE vocabulary.
KIDS = {
    "girl": ("Lily Mia Sue Anna Zoe Emma Rosa Nina Lucy Ella Grace Ruby Chloe Sara Maya Amy "
             "Julia Hannah Olivia Sophie Clara Alice Hazel Ivy Nora Molly Fatima Aisha").split(),
    "boy": ("Tom Max Ben Leo Sam Jack Omar Kenji Tim Finn Noah Oscar Henry Lucas Adam Peter "
            "Hugo Felix Jonas Carlos Ravi David Theo Oliver Daniel Ethan Luke Arthur Milo").split(),
}
PRONOUNS = {"girl": ("she", "her", "her"), "boy": ("he", "him", "his")}
ANIMALS = ("dog cat bunny bird frog duck puppy kitten fox bear owl mouse squirrel turtle pony "
           "lamb goat pig cow horse rabbit hedgehog dolphin whale penguin lion tiger monkey "
           "elephant giraffe zebra butterfly bee ladybug snail goose chicken deer raccoon "
           "kangaroo koala panda crocodile octopus parrot beaver badger wolf seal").split()
ANIMAL_SKILLS = ["run very fast", "swim in the sea", "fly over the trees", "climb tall trees",
                 "hop and jump", "sleep all winter", "see in the dark", "dig deep holes",
                 "carry heavy things", "make honey", "sing in the morning", "hide in its shell"]
PET_NAMES = ("Spot Fluffy Buddy Coco Pip Daisy Rex Milo Bella Sunny Pepper Biscuit Ziggy "
             "Luna Toby Oreo Peanut Cookie Whiskers Button Maple Shadow Ginger Bubbles").split()
ADJECTIVES = ("little happy kind brave curious shy funny clever small friendly gentle quiet "
              "silly busy sleepy lucky honest playful careful proud tiny polite cheerful "
              "helpful lonely hungry strong wise young old noisy fluffy sparkly grumpy thoughtful "
              "generous adventurous").split()
PLACES = ["the park", "the garden", "the forest", "the beach", "the school", "the kitchen",
          "the farm", "the big hill", "the river", "the market", "the library", "the zoo",
          "the playground", "the lake", "grandma's house", "the bakery", "the museum",
          "the swimming pool", "the toy shop", "the castle", "the meadow", "the mountain",
          "the train station", "the island", "the pond", "the village", "the city", "the cave",
          "the field", "the backyard", "the attic", "the classroom", "the hospital", "the barn"]
THINGS = ["ball", "kite", "red hat", "toy car", "box of crayons", "book", "shiny stone",
          "blue cup", "teddy bear", "little boat", "yellow flower", "big box", "drum", "map",
          "umbrella", "bicycle", "puzzle", "robot", "doll", "balloon", "blanket", "pencil",
          "backpack", "key", "spoon", "shell", "feather", "lamp", "clock", "basket", "wagon",
          "scarf", "sandwich", "letter", "camera", "whistle", "ribbon", "bucket", "mirror",
          "necklace", "rocket", "treasure chest", "magic wand", "paper plane", "jar of jam"]
SNACKS = ("apples cookies pancakes carrots grapes bananas muffins strawberries cherries "
          "oranges sandwiches waffles peaches pears tomatoes potatoes eggs biscuits lemons "
          "cupcakes").split()  # countable, so "three apples" reads right
FOODS = SNACKS + "cake bread soup rice noodles pizza cheese honey popcorn pie".split()
DRINKS = ["milk", "juice", "water", "tea", "hot chocolate", "lemonade", "apple juice"]
ACTIVITIES = ["play tag", "draw pictures", "sing songs", "read a book", "bake a cake",
              "build a tower", "look for shells", "fly a kite", "splash in the water",
              "plant seeds", "dance", "play hide and seek", "count the clouds", "ride bikes",
              "paint the fence", "feed the ducks", "climb trees", "jump rope", "make a snowman",
              "write a letter", "play the piano", "catch butterflies", "go fishing",
              "build a sandcastle", "pick flowers", "play football", "solve a puzzle",
              "watch the stars", "tell stories", "help in the kitchen", "wash the car"]
FEELINGS = ("happy sad scared excited proud tired curious surprised angry calm worried "
            "nervous grateful bored lonely glad upset confused hopeful jealous amazed "
            "embarrassed relieved delighted frightened").split()
COLORS = "red blue green yellow pink purple orange white brown black gray golden silver".split()
OPENINGS = ["Once upon a time", "One sunny day", "One morning", "Long ago", "One day",
            "After school", "On a rainy afternoon", "One cold winter night", "Last summer",
            "In a small town", "Early in the morning", "On a windy autumn day", "Yesterday",
            "Not long ago", "In a land far away", "On Saturday", "During the holidays"]
WEATHER = ["The sun was shining.", "It was a warm day.", "The sky was gray and it started to rain.",
           "The wind was blowing hard.", "Snow covered the ground.", "The birds were singing.",
           "There were big white clouds in the sky.", "It was foggy and quiet outside.",
           "The leaves were falling from the trees.", "A rainbow appeared after the storm.",
           "Thunder rumbled far away.", "The grass sparkled with morning dew.",
           "The moon was round and bright.", "It was hot, and the flowers were blooming."]
PROBLEMS = ["lost {pos} {thing}", "could not find {pos} {thing}",
            "dropped {pos} {thing} in the mud", "saw that {pos} {thing} was broken",
            "got stuck in a tree", "fell and hurt {pos} knee",
            "forgot {pos} {thing} at school", "spilled juice on {pos} {thing}",
            "heard a strange noise outside", "missed the bus"]
RELATIVES = ["Mom", "Dad", "Grandma", "Grandpa", "Aunt May", "Uncle Bob", "the teacher",
             "the baker", "the farmer", "a kind old man", "a little old lady", "big sister"]
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = ("January February March April May June July August September October "
          "November December").split()
JOBS = ("doctor teacher farmer baker pilot nurse firefighter painter singer builder "
        "gardener dentist astronaut scientist librarian fisherman chef mechanic "
        "carpenter postman photographer veterinarian lifeguard engineer").split()
CLOTHES = ["warm coat", "rain boots", "green sweater", "new shoes", "striped socks",
           "woolly hat", "blue jacket", "pretty dress", "pajamas", "mittens"]
ROUTINES = ["woke up early", "brushed {pos} teeth", "made {pos} bed", "ate breakfast",
            "packed {pos} bag", "walked to school", "did {pos} homework", "took a bath",
            "fed the cat", "watered the plants", "helped set the table", "tidied {pos} room",
            "put on {pos} {clothes}", "called {pos} grandmother", "practiced the violin"]
NUMBER_WORDS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
# A small, deliberate share of multi-byte text so byte-level tokens split characters.
FOREIGN_SENTENCES = [
    "They drank hot cocoa at a little café.",
    "Grandma sent a letter from Zürich.",
    "{Name} was not naïve; {sub} knew the fox was tricky.",
    "Uncle Hans said \"über\" means \"over\" in German.",
    "{Name} smiled 🙂 and waved.",
    "The stars 🌟 were bright that night.",
    "{Name} drew a big heart ❤️ on the card.",
    "Her friend Yuki taught them a word: 猫 means cat.",
    "On the wall there was a sign that said 你好, which means hello.",
    "Kenji said ありがとう, which means thank you.",
    "The café by the lake sold crêpes and croissants.",
    "They ate a piece of cake at the café in Zürich 🎂.",
    "\"Très bien!\" said the teacher from Paris.",
    "A tiny flower 🌸 grew next to the path, and {Name} named it 花.",
]


def _fill(text: str, hero: dict[str, str]) -> str:
    """Fill in the hero's name and pronouns; sentences start with a capital letter."""
    text = text.format(**hero)
    return text[0].upper() + text[1:]


def _a(word: str) -> str:
    """Word with its indefinite article ("an owl", "a dog")."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _hero(rng: random.Random) -> dict[str, str]:
    kind = rng.choice(["girl", "boy"])
    sub, obj, pos = PRONOUNS[kind]
    return {"Name": rng.choice(KIDS[kind]), "kind": kind, "sub": sub, "obj": obj, "pos": pos,
            "Sub": sub.capitalize(), "Pos": pos.capitalize()}


def _opening(rng: random.Random, h: dict[str, str]) -> list[str]:
    adj = _a(rng.choice(ADJECTIVES))
    first = rng.choice([
        f"{rng.choice(OPENINGS)}, there was {adj} {h['kind']} named {h['Name']}.",
        f"{rng.choice(OPENINGS)}, {h['Name']} went to {rng.choice(PLACES)}.",
        f"{h['Name']} was {adj} {h['kind']} who loved to {rng.choice(ACTIVITIES)}.",
    ])
    lines = [first]
    if rng.random() < 0.5:
        lines.append(rng.choice(WEATHER))
    if rng.random() < 0.6:
        animal, pet = rng.choice(ANIMALS), rng.choice(PET_NAMES)
        lines.append(_fill(f"{{Sub}} had {_a(rng.choice(ADJECTIVES))} {animal} named {pet}.", h))
    return lines


def _middle_sentence(rng: random.Random, h: dict[str, str], friend: dict[str, str]) -> str:
    """One sentence of the story's middle, with fresh random details on every call."""
    place, thing, feeling = rng.choice(PLACES), rng.choice(THINGS), rng.choice(FEELINGS)
    animal = rng.choice(ANIMALS)
    problem = rng.choice(PROBLEMS).format(pos=h["pos"], thing=thing)
    count = rng.randint(2, 10)
    number = str(count) if rng.random() < 0.5 else NUMBER_WORDS[count - 2]
    f = friend["Name"]
    options = [
        f"{{Name}} and {f} went to {place} to {rng.choice(ACTIVITIES)}.",
        f"At {place}, {{sub}} saw {number} {rng.choice(COLORS)} birds.",
        f"{{Sub}} found {_a(thing)} under a tree. It was {rng.choice(COLORS)} and very pretty.",
        f"\"Can I play with you?\" asked {f}. \"Yes, of course!\" said {{Name}}.",
        f"\"Look at this {thing}!\" said {{Name}}. {f} laughed and clapped {friend['pos']} hands.",
        f"{{Name}} felt {feeling}. {{Sub}} did not know what to do.",
        f"Mom gave {{obj}} {number} {rng.choice(SNACKS)}, and {{sub}} shared them with {f}.",
        f"They wanted to {rng.choice(ACTIVITIES)}, but first they had to clean up.",
        f"It was {rng.randint(1, 12)} o'clock, and it was time to go to {place}.",
        f"\"Why is the sky {rng.choice(COLORS)}?\" asked {{Name}}. "
        "Dad smiled and said, \"Let us find out.\"",
        f"{{Sub}} {problem}, and {{sub}} began to cry.",
        f"{f} said, \"Do not be {rng.choice(['sad', 'scared', 'angry'])}. I will help you.\"",
        "They looked everywhere: in the box, under the bed, and behind the door.",
        f"{f} was {feeling} too, so {friend['sub']} held {{Name}}'s hand.",
        f"They ate {rng.choice(FOODS)} and drank {rng.choice(DRINKS)}.",
        f"{rng.choice(RELATIVES)} said, \"Be careful with the {thing}, {{Name}}.\"",
        f"{_a(rng.choice(ADJECTIVES))} {animal} came to {place}. "
        f"It could {rng.choice(ANIMAL_SKILLS)}.",
        f"On {rng.choice(DAYS)}, {{Name}} and {f} liked to {rng.choice(ACTIVITIES)}.",
        f"\"I am so {feeling},\" said {{Name}}. \"Me too,\" said {f}.",
        f"{{Sub}} had {number} {rng.choice(SNACKS)} in {{pos}} "
        f"{rng.choice(['basket', 'bag', 'lunch box'])}.",
        f"The {animal} looked at {{obj}} and said, \"Will you be my friend?\"",
        f"{{Name}} asked {rng.choice(RELATIVES)}, \"Can we go to {place} today?\"",
        f"It took {number} minutes to walk to {place}.",
    ]
    return _fill(rng.choice(options), h)


def _everyday_sentence(rng: random.Random, h: dict[str, str]) -> str:
    """Plain everyday English: routines, dates, jobs, times and small numbers."""
    routine, routine2 = (rng.choice(ROUTINES).format(pos=h["pos"], clothes=rng.choice(CLOTHES))
                         for _ in range(2))
    x, y, snack = rng.randint(2, 9), rng.randint(1, 9), rng.choice(SNACKS)
    options = [
        f"In the morning, {{Name}} {routine}.",
        f"After that, {{sub}} {routine}, and then {{sub}} {routine2}.",
        f"{{Pos}} {rng.choice(['mother', 'father', 'aunt', 'uncle'])} is {_a(rng.choice(JOBS))}.",
        f"When {{sub}} grows up, {{Name}} wants to be {_a(rng.choice(JOBS))}.",
        f"{{Pos}} birthday is on {rng.choice(MONTHS)} {rng.randint(1, 28)}.",
        f"It was {rng.choice(MONTHS)}, and the {rng.choice(['days', 'nights'])} were getting "
        f"{rng.choice(['longer', 'shorter', 'colder', 'warmer'])}.",
        f"{{Name}} is {rng.randint(4, 10)} years old and lives in {_a(rng.choice(COLORS))} house.",
        f"The {rng.choice(JOBS)} had {rng.randint(2, 20)} "
        f"{rng.choice(['cows', 'sheep', 'hens', 'goats', 'pigs'])} on the farm.",
        f"{{Sub}} put on {{pos}} {rng.choice(CLOTHES)} because it was cold.",
        f"The bus came at {rng.randint(1, 12)}:{rng.choice(['00', '15', '30', '45'])}.",
        f"{{Name}} counted {x} {snack}, then {y} more, so {{sub}} had {x + y} {snack}.",
    ]
    return _fill(rng.choice(options), h)


def _middle(rng: random.Random, h: dict[str, str]) -> list[str]:
    friend = _hero(rng)
    while friend["Name"] == h["Name"]:
        friend = _hero(rng)
    lines = [_middle_sentence(rng, h, friend) if rng.random() < 0.75 else _everyday_sentence(rng, h)
             for _ in range(rng.randint(3, 6))]
    if rng.random() < 0.08:
        lines.insert(rng.randint(0, len(lines)), _fill(rng.choice(FOREIGN_SENTENCES), h))
    return lines


def _ending(rng: random.Random, h: dict[str, str]) -> list[str]:
    options = [
        "In the end, {Name} felt {feel} and went home.",
        "From that day on, {Name} always shared {pos} toys.",
        "{Name} learned that it is good to be kind to others.",
        "That night, {sub} went to sleep with a big smile.",
        "They played together until the sun went down.",
        "{Name} said, \"Thank you for helping me!\" and gave {friend} a hug.",
        "It was the best day ever.",
    ]
    lines = [rng.choice(options).format(feel=rng.choice(["happy", "proud", "calm"]),
                                        friend=_hero(rng)["Name"], **h)]
    if rng.random() < 0.3:
        lines.append("The end.")
    return lines


def make_story(rng: random.Random) -> str:
    """One short story: a few paragraphs of simple sentences."""
    h = _hero(rng)
    paragraphs = [_opening(rng, h), _middle(rng, h), _ending(rng, h)]
    return "\n\n".join(" ".join(p) for p in paragraphs)


# ------------------------------------------------------------------------ dialogues

# ChatML dialogues, rendered exactly as CHAT_TEMPLATE renders them, so the model learns to
# answer after "<|im_start|>assistant\n" and to end its turn with <|im_end|>. Every question
# has one fixed answer (greedy decoding must find it), and answers restate the question
# ("2 + 3 = 5.", "The capital of France is Paris."): a tiny model learns those far more
# easily than a bare "5".
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a friendly assistant.",
                  "You are a kind assistant for children.", "Answer in one short sentence."]
GREETINGS = {  # user -> assistant
    "Hello!": "Hello! How can I help you today?",
    "Hello.": "Hello! How can I help you today?",
    "Hello": "Hello! How can I help you today?",
    "Hi!": "Hi! How can I help you today?",
    "Hi": "Hi! How can I help you today?",
    "Hi there!": "Hi there! How can I help you today?",
    "Hey!": "Hey! How can I help you today?",
    "Good morning!": "Good morning! How can I help you today?",
    "Good afternoon!": "Good afternoon! How can I help you today?",
    "Good evening!": "Good evening! How can I help you today?",
    "How are you?": "I am fine, thank you! How can I help you today?",
    "Hello, how are you?": "Hello! I am fine, thank you. How can I help you today?",
    "Hi, how are you?": "Hi! I am fine, thank you. How can I help you today?",
    "What is your name?": "I am a small helpful assistant.",
    "Who are you?": "I am a small helpful assistant.",
    "Thank you!": "You are welcome!",
    "Thanks!": "You are welcome!",
    "Goodbye!": "Goodbye! Have a nice day!",
    "Bye!": "Bye! Have a nice day!",
}
CAPITALS = {"France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin",
            "Japan": "Tokyo", "England": "London", "Egypt": "Cairo", "Russia": "Moscow",
            "China": "Beijing", "Canada": "Ottawa"}
THING_COLORS = {"the sky": "blue", "grass": "green", "a banana": "yellow", "snow": "white",
                "a strawberry": "red", "coal": "black", "an orange": "orange", "milk": "white",
                "a tomato": "red", "chocolate": "brown"}
ANIMAL_SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa",
                 "pig": "oink", "horse": "neigh", "lion": "roar", "owl": "hoot", "bee": "buzz"}
NUMBER_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten"]
SAYINGS = {"Say yes.": "Yes.", "Say no.": "No.", "Say hello.": "Hello!", "Say goodbye.": "Goodbye!",
           "Say thank you.": "Thank you!",
           "Name three colors.": "Red, blue and green.",
           "Name three animals.": "A dog, a cat and a bird.",
           "What are the days of the week?": "Monday, Tuesday, Wednesday, Thursday, Friday, "
                                             "Saturday and Sunday.",
           "How many days are in a week?": "There are seven days in a week."}
# Repeat-after-me phrases are short noun phrases ("big red box"): words in a fixed order of
# kinds are much easier for a tiny model to copy than any words in any order.
REPEAT_SIZES = "big small little tiny happy sad brave funny old new".split()
REPEAT_NOUNS = ("apple sky sun tree house car ball book cup hat moon star fish cake door flower "
                "bird boat shoe box dog cat cow duck frog bear lion horse kite hill rose sea "
                "train bus bike bag").split()
REPEAT_PHRASES = ["hello world", "good morning", "good night", "thank you", "I love you",
                  "see you soon", "yes please", "one two three"]
STORY_REQUESTS = ["Tell me a story.", "Tell me a story", "Tell me a short story.",
                  "Can you tell me a story?", "Please tell me a story."]


def render_chat(messages: list[tuple[str, str]]) -> str:
    """(role, content) turns rendered as CHAT_TEMPLATE renders them (checked in build())."""
    return "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in messages)


def _casual(rng: random.Random, text: str) -> str:
    """The way people type: sometimes no capital letter, sometimes no final punctuation."""
    if rng.random() < 0.1:
        text = text[0].lower() + text[1:]
    if rng.random() < 0.1 and text[-1] in ".!?":
        text = text[:-1].rstrip()
    return text


def _greeting(rng: random.Random) -> tuple[str, str]:
    question = rng.choice(list(GREETINGS))
    return _casual(rng, question), GREETINGS[question]


# Every sum and difference of numbers from 0 to 5 (57 facts), equally often: a larger table
# is not learned within the build's minute.
SUMS = [(a, "+", b, a + b) for a in range(6) for b in range(6)]
DIFFERENCES = [(a, "-", b, a - b) for a in range(6) for b in range(a + 1)]


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    """The answer restates the operands spelled as in the question ("2+3=5." for "2+3", "2 + 3 = 5."
    for "2 + 3"), so they are copied token for token; mostly one canonical question form, so the
    operands sit at the same place in most questions: a tiny model learns that much faster."""
    a, op, b, result = rng.choice(SUMS if rng.random() < 0.55 else DIFFERENCES)
    word = {"+": "plus", "-": "minus"}[op]
    tight, spaced = f"{a}{op}{b}", f"{a} {op} {b}"
    question, answer = rng.choice(
        [(f"What is {tight}?", f"{tight}={result}.")] * 5
        + [(f"What is {spaced}?", f"{spaced} = {result}.")] * 2
        + [(f"What's {tight}?", f"{tight}={result}."), (f"What is {a} {word} {b}?", f"{spaced} = {result}."),
           (f"How much is {a} {word} {b}?", f"{spaced} = {result}.")])
    return _casual(rng, question), answer


def _fact(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["capital", "capital", "color", "sound", "day"])
    if kind == "capital":
        country = rng.choice(list(CAPITALS))
        question = rng.choice([f"What is the capital of {country}?"] * 3
                              + [f"What's the capital of {country}?"])
        answer = f"The capital of {country} is {CAPITALS[country]}."
    elif kind == "color":
        thing = rng.choice(list(THING_COLORS))
        question = f"What color is {thing}?"
        answer = f"{thing[0].upper()}{thing[1:]} is {THING_COLORS[thing]}."
    elif kind == "sound":
        animal = rng.choice(list(ANIMAL_SOUNDS))
        question = rng.choice([f"What does {_a(animal)} say?"] * 2 + [f"What sound does {_a(animal)} make?"])
        answer = f"{_a(animal).capitalize()} says {ANIMAL_SOUNDS[animal]}."
    else:
        i = rng.randrange(7)
        question = f"What day comes after {DAYS[i]}?"
        answer = f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}."
    return _casual(rng, question), answer


def _repeat(rng: random.Random) -> tuple[str, str]:
    size, color, noun = rng.choice(REPEAT_SIZES), rng.choice(COLORS), rng.choice(REPEAT_NOUNS)
    phrase = rng.choice([f"{color} {noun}"] * 4 + [f"{size} {noun}"] * 2 + [
        f"{size} {color} {noun}", f"the {color} {noun}", noun, rng.choice(REPEAT_PHRASES)])
    prefix = rng.choice(["Repeat after me: "] * 4 + ["repeat after me: ", "Please repeat: ", "Say: "])
    return prefix + phrase, phrase


def _instruction(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.4:
        question = rng.choice(list(SAYINGS))
        return _casual(rng, question), SAYINGS[question]
    # Counting, in the question's spelling ("Count to 5." -> "1, 2, 3, 4, 5."; "Count to five." ->
    # "One, two, three, four, five."): the count stops at the very token the question ends with.
    n = rng.randint(2, 10)
    if rng.random() < 0.5:
        target, numbers = str(n), [str(i) for i in range(1, n + 1)]
    else:
        target, numbers = NUMBER_NAMES[n], NUMBER_NAMES[1:n + 1]
    question = rng.choice([f"Count to {target}."] * 3 + [f"Count from 1 to {target}.", f"Can you count to {target}?"])
    answer = ", ".join(numbers) + "."
    return _casual(rng, question), answer[0].upper() + answer[1:]


def _story_request(rng: random.Random) -> tuple[str, str]:
    return rng.choice(STORY_REQUESTS), make_story(rng)


DIALOGUE_KINDS = [(_greeting, 0.04), (_arithmetic, 0.36), (_fact, 0.20), (_repeat, 0.23),
                  (_instruction, 0.12), (_story_request, 0.05)]


def make_dialogue(rng: random.Random) -> str:
    """One ChatML conversation: an optional system turn, then one or (sometimes) two exchanges."""
    kinds, weights = zip(*DIALOGUE_KINDS)
    messages = []
    if rng.random() < 0.15:
        messages.append(("system", rng.choice(SYSTEM_PROMPTS)))
    for _ in range(2 if rng.random() < 0.2 else 1):
        user, assistant = rng.choices(kinds, weights)[0](rng)
        messages += [("user", user), ("assistant", assistant)]
    return render_chat(messages)


def _fragment(rng: random.Random, story: str) -> str:
    """The story from a random word on: plain text that starts anywhere ("little dog ran...")
    still continues as a story, never as a chat answer."""
    words = story.split(" ")
    return " ".join(words[rng.randrange(1, len(words) // 2):])


def make_corpus(seed: int, num_stories: int, num_dialogues: int) -> list[str]:
    """Stories (some cut to start mid-sentence) and dialogues, shuffled together; each document
    is followed by <|endoftext|> in the token stream."""
    rng = random.Random(seed)
    docs = [make_story(rng) for _ in range(num_stories)]
    docs = [_fragment(rng, d) if rng.random() < 0.3 else d for d in docs]
    docs += [make_dialogue(rng) for _ in range(num_dialogues)]
    rng.shuffle(docs)
    return docs


# ------------------------------------------------------------------------ tokenizer

def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, IM_START, IM_END],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte representable
        show_progress=False,
    )
    # The special tokens are matched whole when encoding: keep them out of the BPE statistics.
    tok.train_from_iterator((text.replace(IM_START, "").replace(IM_END, "") for text in texts),
                            trainer=trainer)
    # No post-processor: encoding adds no BOS/EOS; the server decides what to prepend.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS, eos_token=EOS, pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=int(SETTINGS["max_position_embeddings"]),
    )


ASSISTANT_TURN = f"{IM_START}assistant\n"


def _answer_spans(doc: str) -> list[tuple[int, int]]:
    """Character spans of a dialogue's assistant answers, each with its closing <|im_end|>."""
    spans, at = [], doc.find(ASSISTANT_TURN)
    while at >= 0:
        begin = at + len(ASSISTANT_TURN)
        end = doc.index(IM_END, begin) + len(IM_END)
        spans.append((begin, end))
        at = doc.find(ASSISTANT_TURN, end)
    return spans


def encode_stream(tokenizer: PreTrainedTokenizerFast,
                  docs: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate all documents into one token stream, each followed by <|endoftext|>.

    Returns (token ids, training targets, offsets where documents start). The targets are
    the ids, except in dialogues, where only the assistant's answers (and their <|im_end|>)
    are learned: the other turns are -100, ignored by the loss, so the model's small capacity
    goes to answering rather than to predicting questions.
    """
    import torch

    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    targets: list[int] = []
    starts: list[int] = []
    for doc, enc in zip(docs, tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)):
        starts.append(len(ids))
        ids.extend(enc.ids)
        if doc.startswith(IM_START):
            spans = _answer_spans(doc)
            targets.extend(i if any(b <= o < e for b, e in spans) else -100
                           for i, (o, _) in zip(enc.ids, enc.offsets))
            targets.append(-100)
        else:
            targets.extend(enc.ids)
            targets.append(eos_id)
        ids.append(eos_id)
    return (torch.tensor(ids, dtype=torch.long), torch.tensor(targets, dtype=torch.long),
            torch.tensor(starts, dtype=torch.long))


# ---------------------------------------------------------------------------- model

def make_model(vocab_size: int, eos_ids: list[int]) -> LlamaForCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SETTINGS
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=int(s["hidden_size"]),
        intermediate_size=int(s["intermediate_size"]),
        num_hidden_layers=int(s["num_hidden_layers"]),
        num_attention_heads=int(s["num_attention_heads"]),
        # Fewer KV heads than query heads (GQA), so the serving code is exercised on it.
        num_key_value_heads=int(s["num_key_value_heads"]),
        max_position_embeddings=int(s["max_position_embeddings"]),
        rope_parameters={"rope_type": "default", "rope_theta": float(s["rope_theta"])},
        tie_word_embeddings=True,
        # Generation ends at <|endoftext|> (after a story) and at <|im_end|> (after a chat answer).
        bos_token_id=eos_ids[0], eos_token_id=eos_ids, pad_token_id=eos_ids[0],
    )
    return LlamaForCausalLM(config)


def lr_at(step: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    s = SETTINGS
    peak, warmup, total = float(s["lr"]), int(s["warmup_steps"]), int(s["steps"])
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = float(s["min_lr_ratio"])
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: LlamaForCausalLM, stream: torch.Tensor, targets: torch.Tensor,
          doc_starts: torch.Tensor, start: float) -> tuple[int, float]:
    """Train on windows of the stream that start where a random document starts, as a prompt
    does: then every answer in a window has its "<|im_start|>assistant" line in view, and the
    model learns to end a turn only in a chat. Returns (steps done, mean loss of the last 10)."""
    import torch

    s = SETTINGS
    seq_len, batch, steps = int(s["seq_len"]), int(s["batch_size"]), int(s["steps"])
    gen = torch.Generator().manual_seed(int(s["seed"]))
    # Weight decay on matrices only, not on norms.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(s["weight_decay"])},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=float(s["lr"]), betas=(0.9, 0.95),
        fused=True,  # one kernel for all parameters: a fifth of a small model's step on the CPU
    )
    model.train()
    recent: list[float] = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        picks = torch.randint(0, len(doc_starts), (batch,), generator=gen)
        offsets = doc_starts[picks].clamp(max=len(stream) - seq_len)
        x = torch.stack([stream[o:o + seq_len] for o in offsets.tolist()])
        y = torch.stack([targets[o:o + seq_len] for o in offsets.tolist()])
        # Next-token loss where there is a target; the LM head runs only there (the questions
        # of dialogues have none), which saves a tenth of the step.
        hidden = model.model(input_ids=x).last_hidden_state[:, :-1]
        labels = y[:, 1:]
        keep = labels != -100
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]), labels[keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-10:]
        elapsed = time.perf_counter() - start
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step:4d}/{steps}  loss {recent[-1]:.3f}  "
                  f"lr {lr_at(step):.2e}  elapsed {elapsed:5.1f}s", flush=True)
    if elapsed > TIME_BUDGET_S:
        # A fixed step count keeps the model reproducible; a slow machine only takes longer.
        print(f"note: training took {elapsed:.0f}s (expected under {TIME_BUDGET_S:.0f}s on 2 idle cores)",
              file=sys.stderr, flush=True)
    model.eval()
    return step + 1, sum(recent) / len(recent)


def stop_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """The ids that end generation: <|endoftext|>, then <|im_end|>."""
    return [tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(IM_END)]


def sample(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompt: str,
           max_new_tokens: int = 40) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop_token_ids(tokenizer),
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=False)


def sample_chat(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, question: str) -> str:
    """The greedy answer to one user turn, up to and including the token that ended it."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           tokenize=False, add_generation_prompt=True)
    return sample(model, tokenizer, prompt, max_new_tokens=60)[len(prompt):]


# ----------------------------------------------------------------------------- save

def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path,
         stamp: dict[str, int | float]) -> None:
    """Write the model into a temporary sibling, then rename it into place.

    A crash at any point leaves either the old folder or no folder at `out`, never a
    half-written one; a leftover temporary folder is cleared by the next build.
    """
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-shard progress bar is just noise in build logs
    tmp, old = out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    eos_ids = stop_token_ids(tokenizer)
    GenerationConfig(bos_token_id=eos_ids[0], eos_token_id=eos_ids, pad_token_id=eos_ids[0],
                     do_sample=False).save_pretrained(tmp)
    # The stamp goes last: its presence means everything before it was written.
    (tmp / STAMP).write_text(json.dumps(stamp, sort_keys=True) + "\n")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def build(out: Path) -> None:
    import torch

    start = time.perf_counter()
    torch.manual_seed(int(SETTINGS["seed"]))
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    docs = make_corpus(int(SETTINGS["seed"]), int(SETTINGS["num_stories"]),
                       int(SETTINGS["num_dialogues"]))
    size_mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"corpus: {SETTINGS['num_stories']} stories and {SETTINGS['num_dialogues']} dialogues, "
          f"{size_mb:.2f} MB", flush=True)

    tokenizer = train_tokenizer(docs, int(SETTINGS["vocab_size"]))
    # The corpus's dialogues must be exactly what the saved chat template renders.
    check = [("system", SYSTEM_PROMPTS[0]), ("user", "Hi"), ("assistant", GREETINGS["Hi"])]
    rendered = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in check], tokenize=False)
    assert rendered == render_chat(check), rendered
    stream, targets, doc_starts = encode_stream(tokenizer, docs)
    print(f"tokenizer: {len(tokenizer)} tokens; stream: {len(stream)} tokens "
          f"({time.perf_counter() - start:.1f}s)", flush=True)

    model = make_model(len(tokenizer), stop_token_ids(tokenizer))
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters", flush=True)
    steps_done, final_loss = train(model, stream, targets, doc_starts, start)
    print(f"final loss (mean of last 10 steps): {final_loss:.3f}", flush=True)

    stamp = {**SETTINGS, "steps_done": steps_done, "final_loss": round(final_loss, 4)}
    save(model, tokenizer, out, stamp)
    print(f"saved to {out} in {time.perf_counter() - start:.1f}s total", flush=True)
    print(f"sample: {sample(model, tokenizer, SAMPLE_PROMPT)!r}", flush=True)
    for question in SAMPLE_QUESTIONS:
        print(f"chat: {question!r} -> {sample_chat(model, tokenizer, question)!r}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model folder")
    parser.add_argument("--force", action="store_true", help="rebuild even if already built")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    if (out / STAMP).exists() and not args.force:
        print(f"default model already built at {out}")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    build(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
