"""The embedded offline task: restaurant meaning representations in the E2E style with
templated references, so the main command runs on a fresh machine with no data files."""

from __future__ import annotations

import random
from collections.abc import Mapping

from splitpeft.data.examples import Example, mr_example

# --------------------------------------------------------------------------------------------
# Builtin task: E2E-like restaurant descriptions
# --------------------------------------------------------------------------------------------

_NAMES = (
    "The Punter", "The Eagle", "Alimentum", "Aromi", "Bibimbap House", "Blue Spice", "Browns",
    "Clowns", "Cocum", "Cotto", "Fitzbillies", "Giraffe", "Green Man", "Loch Fyne", "Midsummer House",
    "Strada", "Taste of Cambridge", "The Cricketers", "The Golden Curry", "The Mill", "The Olive Grove",
    "The Phoenix", "The Plough", "The Rice Boat", "The Vaults", "The Waterman", "Wildwood", "Zizzi",
)


_NEAR = ("Burger King", "Café Rouge", "Crowne Plaza Hotel", "Raja Indian Cuisine", "The Bakers",
         "Yippee Noodle Bar", "All Bar One", "Ranch")


_TYPES = ("coffee shop", "pub", "restaurant")


_FOODS = ("Chinese", "English", "Fast food", "French", "Indian", "Italian", "Japanese")


_AREAS = ("city centre", "riverside")


_PRICES = ("cheap", "moderate", "high", "less than £ 20", "£ 20 - 25", "more than £ 30")


_RATINGS = ("low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5")


# Phrases that read well after "has" / "with"; several per value for varied wording.
_PRICE_TEXT = {
    "cheap": ("low prices", "cheap food"),
    "moderate": ("moderate prices", "mid-range prices"),
    "high": ("high prices", "expensive food"),
    "less than £ 20": ("prices under £20", "meals for less than £20"),
    "£ 20 - 25": ("prices of £20-25", "meals for £20-25"),
    "more than £ 30": ("prices over £30", "meals for more than £30"),
}


def _rating_text(rating: str, rng: random.Random) -> str:
    if "out of" in rating:
        return rng.choice((f"a customer rating of {rating}", f"a {rating} rating"))
    article = "an" if rating[0] in "aeiou" else "a"
    return rng.choice((f"{article} {rating} customer rating", f"{rating} ratings"))


def _builtin_reference(fields: Mapping[str, str], variant: int, rng: random.Random) -> str:
    """One templated description of ``fields``; ``variant`` (0..2) picks the sentence shape."""
    name, kind, food = fields["name"], fields["type"], fields.get("food")
    noun = f"{'fast food' if food == 'Fast food' else food} {kind}" if food else kind
    article = "an" if noun[0].lower() in "aeiou" else "a"
    where = []
    if "area" in fields:
        where.append(rng.choice((f"in the {fields['area']}", f"located in the {fields['area']}")))
    if "near" in fields:
        where.append(rng.choice((f"near {fields['near']}", f"close to {fields['near']}")))
    extras = []
    if "price" in fields:
        extras.append(rng.choice(_PRICE_TEXT[fields["price"]]))
    if "customer rating" in fields:
        extras.append(_rating_text(fields["customer rating"], rng))
    place = (" " + " ".join(where)) if where else ""
    has = " and ".join(extras)
    family = fields.get("family friendly")
    if variant == 0:
        text = f"{name} is {article} {noun}{place}."
        if has:
            text += f" It has {has}."
        if family:
            text += " It is family friendly." if family == "yes" else " It is not family friendly."
    elif variant == 1:
        text = f"There is {article} {noun} called {name}{place}" + (f" with {has}" if has else "") + "."
        if family:
            text += " Children are welcome." if family == "yes" else " It is not suitable for children."
    else:
        lead = {"yes": "A family friendly", "no": "An adults only"}.get(family or "", article.capitalize())
        text = f"{lead} {noun}{place}, {name}" + (f" has {has}" if has else " is worth a visit") + "."
    return text


def builtin_examples(seed: int = 0, n_mrs: int = 220) -> list[Example]:
    """Generate the builtin E2E-like task: ``n_mrs`` distinct MRs with 2-3 references each.

    MRs use the cleaned E2E format (``name : X | Type : Y | ...``), so they parse exactly like the
    real file; references come from three sentence templates with small wording variations.
    Deterministic given ``seed``.
    """
    rng = random.Random(seed)
    optional = (
        ("food", _FOODS), ("price", _PRICES), ("customer rating", _RATINGS),
        ("area", _AREAS), ("family friendly", ("yes", "no")), ("near", _NEAR),
    )
    seen: set[str] = set()
    examples: list[Example] = []
    while len(seen) < n_mrs:
        parts = [("name", rng.choice(_NAMES)), ("Type", rng.choice(_TYPES))]
        for key, values in optional:
            if rng.random() < 0.6:
                parts.append((key, rng.choice(values)))
        mr = " | ".join(f"{key} : {value}" for key, value in parts)
        if mr in seen:
            continue
        seen.add(mr)
        fields = {key.lower(): value for key, value in parts}
        variants = rng.sample(range(3), k=rng.choice((2, 3, 3, 3)))
        for variant in variants:
            examples.append(mr_example(mr, _builtin_reference(fields, variant, rng)))
    return examples
