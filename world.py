"""The synthetic world: made-up people, cities, countries, companies and rivers to train a search agent on.

One passage per entity ("Title\ntext", one sentence a line): the entity's own facts, and with distractors=True a
few more sentences naming other entities, years and numbers (one line, as they refer back with "It"). 1-hop questions ("In which city was Zorvath Kellan born?") and
2-hop questions ("In which country was Zorvath Kellan born?"). The names are invented, so a small model cannot
answer from memory and must search; a 2-hop answer is never in the subject's own passage, so it takes two
searches. Everything is drawn from one seeded random.Random, so a seed gives the same world in any process.

The default passage is its facts alone. SmolLM2-135M, the demo's model, answers with a random entity of a
long passage and almost never searches a second time after reading one, so with distractors it gets almost no
2-hop question right and DSPO has nothing to reinforce; `python -m tools.probe [--distractors]` measures both
(results/README.md keeps the runs). Questions and answers are the same either way.

split_facts=True writes each fact as a sentence of its own (a city's country and its river are two), so that
search.format_hits with an rng, which shows a passage's lines in a random order at every retrieval
(train.py's --fact-order shuffled), can move every fact: where a fact sits then says nothing about which
fact it is, and the model has to read the sentence.

Left out: distractor passages beyond the other entities, questions of more than two hops, and paraphrased
questions (each relation has one wording).
"""
import random
from dataclasses import dataclass

from data import QAExample


@dataclass
class World:
    train: list[QAExample]
    test: list[QAExample]
    passages: list[str]  # one per entity, shared by train and test


# Relation (subject kind -> object kind): 1-hop question. Each subject has exactly one object per relation,
# so every question below has exactly one right answer.
RELATIONS = {
    "born_in": "In which city was {} born?",  # person -> city
    "works_for": "Which company does {} work for?",  # person -> company
    "in_country": "In which country is {}?",  # city -> country
    "on_river": "Which river flows through {}?",  # city -> river
    "founded_in": "In which city was {} founded?",  # company -> city
    "capital": "What is the capital of {}?",  # country -> city
    "rises_in": "In which country does the {} rise?",  # river -> country
}
# (first relation, second relation): question. The answer is the second relation's object, read from the
# passage of the first relation's object.
TWO_HOP = {
    ("born_in", "in_country"): "In which country was {} born?",
    ("born_in", "on_river"): "Which river flows through the city where {} was born?",
    ("works_for", "founded_in"): "In which city was the company that {} works for founded?",
    ("founded_in", "in_country"): "In which country was {} founded?",
    ("founded_in", "on_river"): "Which river flows through the city where {} was founded?",
    ("capital", "on_river"): "Which river flows through the capital of {}?",
    ("on_river", "rises_in"): "In which country does the river that flows through {} rise?",
}

# A word is onset, vowel, optional coda, onset, vowel, final consonant(s) ("Zorvath"): pronounceable, so a
# small tokenizer copies it easily, and only rarely an English word.
ONSETS = ("b", "d", "k", "l", "m", "n", "r", "s", "t", "v", "z", "br", "dr", "kr", "th", "vr", "g", "f", "h", "y")
INNER_ONSETS = ("b", "d", "k", "l", "m", "n", "r", "s", "t", "v", "z", "th", "g", "f")
VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "y")
INNER_CODAS = ("", "", "n", "r", "l", "s")
FINAL_CODAS = ("n", "r", "l", "th", "rn", "sh", "v", "x")
COUNTRY_ENDINGS = ("ria", "nia", "dor", "stan")
COMPANY_SUFFIXES = ("Industries", "Works", "Labs", "Holdings", "Foundry", "Trading")
PROFESSIONS = ("chemist", "painter", "surveyor", "lawyer", "baker", "tailor", "poet", "pilot", "botanist")
INDUSTRIES = ("shipping", "textile", "glassware", "software", "mining", "brewing", "printing", "clockmaking")
HOBBIES = ("chess", "falconry", "rowing", "beekeeping", "pottery", "mountaineering", "the violin")
COLOURS = ("red", "blue", "green", "gold", "white", "black", "orange", "purple")


def _name_maker(rng: random.Random, exclude: frozenset[str]):
    """Return new_word(ending=None) -> a fresh capitalised word that is neither a substring nor a superstring
    of any earlier word or excluded name's word, so every name occurs only where it is meant to."""
    used = [word.lower() for name in exclude for word in name.split()]

    def new_word(ending: str | None = None) -> str:
        while True:
            word = (rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(INNER_CODAS)
                    + rng.choice(INNER_ONSETS) + rng.choice(VOWELS) + (ending or rng.choice(FINAL_CODAS)))
            if not any(word in other or other in word for other in used):
                used.append(word)
                return word.capitalize()
    return new_word


def synthetic_world(seed: int = 0, num_people: int = 100, num_cities: int = 40, num_countries: int = 12,
                    num_companies: int = 30, num_rivers: int = 16, num_questions: int = 600,
                    two_hop_fraction: float = 0.5, test_fraction: float = 0.2,
                    exclude: frozenset[str] = frozenset(), distractors: bool = False,
                    split_facts: bool = False) -> World:
    """Generate entities, their passages and questions, split by question into train and test. Only
    random.Random(seed) is used, so a seed gives the same world in every process. Names in `exclude`
    (and their words) never appear; excluding names changes the rest of the world. num_questions is capped
    by how many distinct questions of each kind the world holds. distractors=True keeps each passage's
    extra sentences; split_facts=True gives every fact its own sentence (see above). The random draws, and so
    the entities and questions, depend on neither."""
    if not (3 <= num_countries <= num_cities and min(num_cities, num_people) >= 4
            and min(num_companies, num_rivers) >= 2):
        raise ValueError("synthetic_world needs 3 <= countries <= cities, 4+ cities and people, "
                         "2+ companies and rivers")
    rng = random.Random(seed)
    new_word = _name_maker(rng, exclude)
    countries = [new_word(rng.choice(COUNTRY_ENDINGS)) for _ in range(num_countries)]
    cities = [new_word() for _ in range(num_cities)]
    rivers = [f"{new_word()} River" for _ in range(num_rivers)]
    companies = [f"{new_word()} {rng.choice(COMPANY_SUFFIXES)}" for _ in range(num_companies)]
    people = [f"{new_word()} {new_word()}" for _ in range(num_people)]

    # facts[name][relation] = object name. The first cities go one to each country so every country has one.
    facts = {name: {} for name in countries + cities + rivers + companies + people}
    for i, city in enumerate(cities):
        facts[city]["in_country"] = countries[i] if i < num_countries else rng.choice(countries)
        facts[city]["on_river"] = rng.choice(rivers)
    for country in countries:
        facts[country]["capital"] = rng.choice([c for c in cities if facts[c]["in_country"] == country])
    for river in rivers:
        facts[river]["rises_in"] = rng.choice(countries)
    for company in companies:
        facts[company]["founded_in"] = rng.choice(cities)
    for person in people:
        facts[person] = {"born_in": rng.choice(cities), "works_for": rng.choice(companies)}
    founded_in = {company: facts[company]["founded_in"] for company in companies}

    # One passage per entity: (its own facts, distractor sentences naming other entities and numbers), the
    # facts as lines, one sentence each.
    passage = {}
    for country in countries:
        neighbours = rng.sample([c for c in countries if c != country], 2)
        passage[country] = (
            f"{country} is a country whose capital is {facts[country]['capital']}.",
            f"It borders {neighbours[0]} and {neighbours[1]} and has about {rng.randint(2, 60)} million "
            f"inhabitants. Its flag is {rng.choice(COLOURS)} and {rng.choice(COLOURS)}, its national pastime is "
            f"{rng.choice(HOBBIES)}, and its oldest university dates from {rng.randint(1100, 1900)}.")
    for city in cities:
        twin = rng.choice([c for c in cities if c != city])
        country, river = facts[city]["in_country"], facts[city]["on_river"]
        passage[city] = (
            f"{city} is a city in {country}.\n{city} lies on the banks of the {river}." if split_facts else
            f"{city} is a city in {country} on the banks of the {river}.",
            f"It was founded in {rng.randint(900, 1800)} and has about {rng.randint(20, 900) * 1000} "
            f"inhabitants. "
            f"{city} is twinned with {twin}, a city in {facts[twin]['in_country']}, and its flag is "
            f"{rng.choice(COLOURS)} with a {rng.choice(COLOURS)} star.")
    for river in rivers:
        other = rng.choice([r for r in rivers if r != river])
        passage[river] = (
            f"The {river} rises in {facts[river]['rises_in']} and flows for {rng.randint(80, 2400)} kilometres "
            f"before it reaches the sea.",
            f"It is often confused with the {other}, which rises in "
            f"{facts[other]['rises_in']}. Fishermen prize its {rng.choice(COLOURS)} trout, and "
            f"{rng.randint(3, 40)} bridges cross it.")
    for company in companies:
        rival = rng.choice([c for c in companies if c != company])
        offices = rng.sample([c for c in cities if c != founded_in[company]], 2)
        passage[company] = (
            f"{company} is a {rng.choice(INDUSTRIES)} company founded in {founded_in[company]} in "
            f"{rng.randint(1850, 2015)}.",
            f"It employs about {rng.randint(40, 9000)} people and has offices in "
            f"{offices[0]} and {offices[1]}. Its main rival is {rival}, which was founded in {founded_in[rival]}.")
    for person in people:
        employer_city = founded_in[facts[person]["works_for"]]
        # Distractor cities avoid the employer's city too, or a 2-hop answer would leak into this passage.
        places = rng.sample([c for c in cities if c not in (facts[person]["born_in"], employer_city)], 2)
        friend = rng.choice([p for p in people if p != person])
        surname = person.split()[1]
        passage[person] = (
            f"{person} is a {rng.choice(PROFESSIONS)} who was born in {facts[person]['born_in']} in "
            f"{rng.randint(1930, 2000)}.\n{person} works for {facts[person]['works_for']}.",
            f"Before that, {surname} studied in {places[0]} and spent {rng.randint(2, 9)} years in {places[1]}. "
            f"{surname} is a close friend of {friend}, who works for {facts[friend]['works_for']}, and is known for "
            f"{rng.choice(HOBBIES)}.")

    # Candidate questions, as (question, answer, hops); a 2-hop answer must not be in the subject's passage.
    one_hop, two_hop = [], []
    for subject, relations in facts.items():
        for relation, answer in relations.items():
            one_hop.append((RELATIONS[relation].format(subject), answer, 1))
        for (first, second), template in TWO_HOP.items():
            if first in relations:
                answer = facts[relations[first]][second]
                question = template.format(subject)
                if answer not in " ".join(passage[subject]) and answer not in question:
                    two_hop.append((question, answer, 2))

    # Sample the requested mix, then split each hop count separately so both splits hold both kinds.
    num_two = min(round(num_questions * two_hop_fraction), len(two_hop))
    num_one = min(num_questions - num_two, len(one_hop))
    chosen = rng.sample(one_hop, num_one) + rng.sample(two_hop, num_two)
    examples = [QAExample(f"syn-{i:06d}", question, [answer], f"synthetic-{hops}hop")
                for i, (question, answer, hops) in enumerate(chosen)]
    train, test = [], []
    for group in (examples[:num_one], examples[num_one:]):
        num_test = round(len(group) * test_fraction)
        test += group[:num_test]
        train += group[num_test:]
    rng.shuffle(train)
    rng.shuffle(test)
    passages = [name + "\n" + ("\n".join(passage[name]) if distractors else passage[name][0]) for name in facts]
    return World(train, test, passages)
