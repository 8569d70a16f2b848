"""Synthetic biographies: a fully offline, leak-free RAG benchmark.

Each fictional person is a full name drawn from ``FIRST_NAMES x LAST_NAMES``
(3,600 people). Their six attributes are a pure function of the name, so a
person reads the same in every sample. People are split once, by a stable hash
of the name, into disjoint train (~80%) and test (~20%) populations.

A sample puts ``docs_per_sample`` biographies in the context (one chunk each,
sentences paraphrased by random templates and shuffled) and asks about one
attribute of one of those people.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from functools import lru_cache

from .base import DatasetError, Sample, stable_hash, validate_count, validate_split

__all__ = ["ATTRIBUTES", "Person", "biography_samples", "people", "person", "render_biography"]

FIRST_NAMES = (
    "Aaron", "Adele", "Alaric", "Amara", "Anselm", "Astrid", "Bastian", "Beatrix", "Cassius",
    "Celeste", "Corwin", "Dagny", "Darius", "Delphine", "Emeric", "Esme", "Evander", "Fenna",
    "Florian", "Greta", "Hallam", "Imogen", "Ines", "Isidore", "Jarrah", "Juniper", "Kasimir",
    "Leander", "Liesel", "Lucian", "Maren", "Marisol", "Matthias", "Mireille", "Nadia", "Niamh",
    "Oriel", "Orson", "Ottilie", "Perpetua", "Quentin", "Rosalind", "Rowan", "Saoirse",
    "Severin", "Solveig", "Tamsin", "Thaddeus", "Theodora", "Ulric", "Valentina", "Wendeline",
    "Wilhelmina", "Xanthe", "Yannick", "Yvaine", "Zephyrine", "Zoltan", "Anouk", "Benedikt",
)
LAST_NAMES = (
    "Ashcombe", "Baldacci", "Blackwood", "Brennholt", "Castellanos", "Dunmore", "Eriksdottir",
    "Falkenrath", "Fairweather", "Galloway", "Grimaldi", "Hargreave", "Halvorsen", "Ingleby",
    "Jablonski", "Kettering", "Kowalczyk", "Lindqvist", "Lockhart", "Marchetti", "Montague",
    "Nakashima", "Northcott", "Oyelaran", "Pemberton", "Quigley", "Rasmussen", "Ravensworth",
    "Santangelo", "Sorensen", "Thornbury", "Trevelyan", "Underhill", "Vasquez-Moreau",
    "Valdimarsson", "Whitlock", "Wojcik", "Yarborough", "Zielinski", "Achterberg", "Bellweather",
    "Carrow", "Delacroix", "Esterhazy", "Fitzgerald-Ng", "Gudmundsen", "Harrowgate", "Iwasaki",
    "Kerrigan", "Loxley", "Mbeki-Hart", "Okonkwo", "Penhaligon", "Quillfeather", "Rothbury",
    "Stavros", "Tolliver", "Umberfield", "Vandermeer", "Winterbourne",
)
CITIES = (
    "Lisbon", "Osaka", "Nairobi", "Vancouver", "Krakow", "Porto Alegre", "Adelaide", "Tallinn",
    "Marrakesh", "Edinburgh", "Hanoi", "Valparaiso", "Bergen", "Cebu City", "Ljubljana",
    "Halifax", "Tbilisi", "Cork", "Accra", "Salzburg", "Montevideo", "Gothenburg", "Kyoto",
    "Bologna", "Austin", "Quebec City", "Seville", "Dunedin", "Bratislava", "Cartagena",
    "Tromso", "Izmir", "Pittsburgh", "Leipzig", "Chiang Mai", "Antwerp", "Savannah", "Graz",
    "Wellington", "Cusco",
)
UNIVERSITIES = (
    "the University of Edinburgh", "Kyoto University", "McGill University", "Rice University",
    "the University of Bologna", "Uppsala University", "the University of Cape Town",
    "Carnegie Mellon University", "the University of Melbourne", "Heidelberg University",
    "the University of Toronto", "Trinity College Dublin", "Seoul National University",
    "the University of Chile", "ETH Zurich", "Duke University", "the University of Auckland",
    "Leiden University", "the University of Michigan", "Charles University",
    "the University of Sao Paulo", "Tufts University", "Aarhus University",
    "the University of Vienna",
)
MAJORS = (
    "marine biology", "civil engineering", "art history", "economics", "computer science",
    "linguistics", "chemical engineering", "philosophy", "astrophysics", "architecture",
    "public health", "mathematics", "anthropology", "materials science", "music composition",
    "political science", "geology", "nursing", "journalism", "statistics",
)
EMPLOYERS = (
    "Brightwater Analytics", "Copperfield Logistics", "Northwind Robotics", "Halcyon Biotech",
    "Larkspur Media", "Ironbridge Capital", "Meridian Aerospace", "Bluefin Energy",
    "Quarry Lane Architects", "Silverpine Software", "Tidewater Shipping", "Emberly Foods",
    "Granite Peak Insurance", "Oakhollow Pharmaceuticals", "Starling Telecom",
    "Redcliff Mining", "Willowmere Publishing", "Cobalt Harbor Labs", "Foxglove Fashion",
    "Juniper Grid Utilities", "Lanternfish Games", "Saltmarsh Engineering",
    "Thistledown Health", "Vantage Orchard Farms",
)
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)

ATTRIBUTES = ("birth_date", "birth_place", "current_city", "university", "major", "employer")
"""Attribute names, in canonical order."""

SENTENCE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{name} was born on {value}, a date the family still celebrates every year.",
        "{name} came into the world on {value}.",
        "According to the records, the birthday of {name} is {value}.",
        "{name} celebrates a birthday every year, having been born on {value}.",
    ),
    "birth_place": (
        "{name} was born in {value} and spent the first years of childhood there.",
        "{name} grew up in {value}, the city where they were born.",
        "The birthplace of {name} is {value}.",
        "{name} is a native of {value}, where they were born.",
    ),
    "current_city": (
        "{name} currently lives in {value}.",
        "These days {name} makes a home in the city of {value}.",
        "After several moves, {name} has settled in {value}, where they live today.",
        "{name} now resides in {value} with a small circle of close friends.",
    ),
    "university": (
        "{name} studied at {value}.",
        "{name} is a proud graduate of {value}.",
        "{name} earned a degree from {value} after four demanding years.",
        "{name} completed higher education at {value}.",
    ),
    "major": (
        "{name} majored in {value}.",
        "{name} chose {value} as a field of study and never regretted it.",
        "At university, {name} focused on {value}.",
        "{name} holds a degree in {value}.",
    ),
    "employer": (
        "{name} works for {value}.",
        "{name} is employed by {value} and enjoys the work.",
        "For the past few years {name} has had a job at {value}.",
        "{name} earns a living at {value}.",
    ),
}
HOBBY_TEMPLATES = (
    "Outside of work, {name} enjoys {value}.",
    "Friends know {name} as someone who loves {value}.",
    "In spare moments {name} can usually be found {value}.",
)
HOBBIES = (
    "sailing", "baking bread", "playing the cello", "birdwatching", "rock climbing",
    "restoring old bicycles", "painting watercolors", "growing tomatoes", "long-distance running",
    "collecting vinyl records", "writing poetry", "playing chess",
)
"""Filler sentence (never asked about) that pads biographies to ~60-90 words."""

QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": ("What is the birth date of {name}?", "When was {name} born?"),
    "birth_place": ("Where was {name} born?", "What is the birth place of {name}?"),
    "current_city": ("In which city does {name} currently live?", "Where does {name} live now?"),
    "university": ("Which university did {name} attend?", "Where did {name} study?"),
    "major": ("What did {name} major in?", "What was {name}'s field of study?"),
    "employer": ("Which company does {name} work for?", "Who is {name}'s employer?"),
}

TEST_FRACTION_DENOMINATOR = 5
"""A person is in the test split iff ``stable_hash(name) % 5 == 0`` (~20%)."""

Person = dict[str, str]
"""A person: ``{"name": ..., "hobby": ..., **{attribute: value for attribute in ATTRIBUTES}}``."""


def person(name: str) -> Person:
    """The attributes of ``name``, a pure function of the name.

    Example:
        >>> person("Astrid Lockhart")["name"]
        'Astrid Lockhart'
    """
    rng = random.Random(stable_hash("biography/person/" + name))
    birth_date = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1940, 2004)}"
    birth_place, current_city = rng.sample(CITIES, 2)
    return {
        "name": name,
        "birth_date": birth_date,
        "birth_place": birth_place,
        "current_city": current_city,
        "university": rng.choice(UNIVERSITIES),
        "major": rng.choice(MAJORS),
        "employer": rng.choice(EMPLOYERS),
        "hobby": rng.choice(HOBBIES),
    }


@lru_cache(maxsize=2)
def people(split: str) -> tuple[str, ...]:
    """Names of the people in ``split``, sorted; train and test are disjoint and cover all names."""
    validate_split(split)
    names = (f"{first} {last}" for first, last in itertools.product(FIRST_NAMES, LAST_NAMES))
    return tuple(sorted(name for name in names if _is_test_person(name) == (split == "test")))


def _is_test_person(name: str) -> bool:
    return stable_hash(name) % TEST_FRACTION_DENOMINATOR == 0


def render_biography(p: Person, rng: random.Random) -> str:
    """One paragraph stating every attribute of ``p`` and a hobby, in shuffled random templates."""
    sentences = [
        rng.choice(SENTENCE_TEMPLATES[attr]).format(name=p["name"], value=p[attr])
        for attr in ATTRIBUTES
    ]
    sentences.append(rng.choice(HOBBY_TEMPLATES).format(name=p["name"], value=p["hobby"]))
    rng.shuffle(sentences)
    return " ".join(sentences)


def biography_samples(
    split: str,
    n: int,
    docs_per_sample: int | Sequence[int] = 5,
    seed: int = 0,
    attributes: Sequence[str] | None = None,
) -> Iterator[Sample]:
    """Yield ``n`` biography QA samples drawn from the people of ``split``.

    Sample ``i`` depends only on ``(split, seed, i)`` and its document count:
    ``docs_per_sample`` if an int, else ``docs_per_sample[i % len(docs_per_sample)]``.
    Its chunks are that many biographies of distinct people; the question asks
    for one attribute (drawn from ``attributes``, default all of ``ATTRIBUTES``)
    of one of them, and ``answers == (gold value,)``.

    Raises:
        DatasetError: on an unknown split or attribute, or a document count
            outside ``1 .. len(people(split))``.

    Example:
        >>> s = next(biography_samples("test", 1, docs_per_sample=3))
        >>> len(s.chunks), s.answers[0] in " ".join(s.chunks)
        (3, True)
    """
    validate_count(n)
    pool = people(split)
    counts = _doc_counts(docs_per_sample, len(pool))
    attrs = _attributes(attributes)
    return (_sample(pool, split, seed, i, counts[i % len(counts)], attrs) for i in range(n))


def _sample(
    pool: tuple[str, ...], split: str, seed: int, index: int, n_docs: int, attrs: tuple[str, ...]
) -> Sample:
    rng = random.Random(f"biography/{split}/{seed}/{index}")
    names = rng.sample(pool, n_docs)
    target, attr = rng.choice(names), rng.choice(attrs)
    return Sample(
        id=f"biography/{split}/{seed}/{index}",
        chunks=tuple(render_biography(person(name), rng) for name in names),
        question=rng.choice(QUESTION_TEMPLATES[attr]).format(name=target),
        answers=(person(target)[attr],),
    )


def _doc_counts(docs_per_sample: int | Sequence[int], pool_size: int) -> tuple[int, ...]:
    counts = (docs_per_sample,) if isinstance(docs_per_sample, int) else tuple(docs_per_sample)
    if not counts or any(not isinstance(c, int) or not 1 <= c <= pool_size for c in counts):
        raise DatasetError(
            f"docs_per_sample must be an int or non-empty sequence of ints in 1..{pool_size}, "
            f"got {docs_per_sample!r}"
        )
    return counts


def _attributes(attributes: Sequence[str] | None) -> tuple[str, ...]:
    attrs = ATTRIBUTES if attributes is None else tuple(attributes)
    unknown = sorted(set(attrs) - set(ATTRIBUTES))
    if not attrs or unknown:
        raise DatasetError(
            f"attributes must be a non-empty subset of {', '.join(ATTRIBUTES)}; got {attributes!r}"
        )
    return attrs
