"""Class names as a data set spells them -> canonical labels (ingest step 2).

A data set says "COVID-19", "NCP", "CT_NonCOVID" or "Viral Pneumonia"; covidlib works with
``covid`` / ``cap`` / ``normal`` / ``non_covid`` (:data:`covidlib.config.CANONICAL_LABELS`).
:data:`ALIASES` is the table between the two; matching ignores case, spaces, ``_`` and ``-``.
A name that is not in the table is an error listing what was found -- never a guess.

No keras / tensorflow import here.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Mapping

from covidlib import config

if TYPE_CHECKING:  # only for hints: layouts imports this module
    from covidlib.layouts import Item

__all__ = [
    "ALIASES", "IGNORE", "normalize_class_name", "alias_lookup", "resolve_label",
    "format_alias_table", "map_labels",
]

#: Accepted class names -> canonical label. Matching ignores case, spaces, ``_`` and ``-``
#: (``COVID-19`` == ``covid_19`` == ``Covid 19``). "Viral Pneumonia" (the 3-class chest X-ray
#: sets) maps to ``cap``: it is non-COVID pneumonia, which is the role CAP plays in the CT sets,
#: so the X-ray and CT phases share the covid / cap / normal classes. Override with ``aliases=``
#: (e.g. ``{"Viral Pneumonia": "non_covid"}``). A binary set stays binary: "non-COVID" is
#: ``non_covid``, never ``normal``.
ALIASES: dict[str, str] = {
    # covid
    "covid": "covid",
    "COVID-19": "covid",
    "covid19": "covid",
    "SARS-CoV-2": "covid",
    "NCP": "covid",  # novel coronavirus pneumonia (CC-CCII / COVIDx CT)
    "positive": "covid",  # COVIDx CXR: positive for COVID-19
    "CT_COVID": "covid",  # UCSD COVID-CT image folder
    "COVID-19 pneumonia": "covid",
    # cap
    "cap": "cap",
    "CP": "cap",  # common pneumonia (CC-CCII / COVIDx CT)
    "pneumonia": "cap",
    "viral pneumonia": "cap",
    "bacterial pneumonia": "cap",
    "community-acquired pneumonia": "cap",
    "non-COVID pneumonia": "cap",
    "other pneumonia": "cap",
    # normal
    "normal": "normal",
    "healthy": "normal",
    "no finding": "normal",
    # non_covid
    "non-COVID": "non_covid",
    "NonCOVID": "non_covid",
    "non covid": "non_covid",
    "negative": "non_covid",
    "CT_NonCOVID": "non_covid",
    "COVID negative": "non_covid",
}

#: The "label" of a class the user (or the registry) asked to leave out.
IGNORE = "ignore"


def normalize_class_name(name: str) -> str:
    """Lower-case ``name`` and drop spaces, ``_`` and ``-`` (the alias matching key)."""
    return re.sub(r"[\s_\-]+", "", str(name).strip().lower())


def alias_lookup(aliases: Mapping[str, str | None] | None,
                 extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Matching key -> label: :data:`ALIASES`, then ``extra`` (a layout's own names), then the
    user's ``aliases`` (``None`` or ``"ignore"`` leave a class out).

    Raises:
        ValueError: a user alias that maps to neither a canonical label nor ``"ignore"``.
    """
    table = {normalize_class_name(k): v for k, v in ALIASES.items()}
    if extra:
        table.update({normalize_class_name(k): v for k, v in extra.items()})
    for k, v in (aliases or {}).items():
        v = IGNORE if v is None else str(v).strip()
        if v != IGNORE and v not in config.CANONICAL_LABELS:
            raise ValueError(
                f"aliases[{k!r}] = {v!r} is not a canonical label; use one of "
                f"{list(config.CANONICAL_LABELS)} or 'ignore'"
            )
        table[normalize_class_name(k)] = v
    return table


def resolve_label(name: str, aliases: Mapping[str, str | None] | None = None) -> str | None:
    """Canonical label for a class name, ``"ignore"`` if the user asked to skip it, else None."""
    return alias_lookup(aliases).get(normalize_class_name(name))


def _accepted_aliases_text() -> str:
    by_label: dict[str, list[str]] = defaultdict(list)
    for k, v in ALIASES.items():
        by_label[v].append(k)
    return "\n".join(f"  {lab:<9} <- {', '.join(by_label[lab])}" for lab in config.CANONICAL_LABELS)


def format_alias_table(found: Mapping[str, str | None], counts: Mapping[str, int] | None = None) -> str:
    """The table of class names found in the data and the labels they map to.

    Args:
        found: class name as found (folder name, label-file class, CSV value) -> label
            (``None`` when unmapped).
        counts: optional number of files per class name.

    Returns:
        A printable multi-line table ``name -> label (display name)``.
    """
    if not found:
        return "(no classes found)"
    width = max(len("class (as found)"), *(len(str(k)) for k in found))
    lines = [f"{'class (as found)':<{width}}    label"]
    for name in sorted(found, key=lambda s: str(s).lower()):
        lab = found[name]
        if lab is None:
            shown = "??? (no alias)"
        elif lab == IGNORE:
            shown = "(ignored)"
        else:
            shown = f"{lab} ({config.display_name(lab)})"
        n = f"   [{counts[name]} files]" if counts and name in counts else ""
        lines.append(f"{str(name):<{width}} -> {shown}{n}")
    return "\n".join(lines)


def map_labels(items: list[Item], aliases: Mapping[str, str | None] | None,
               extra: Mapping[str, str] | None = None,
               where: str = "") -> tuple[list[Item], dict[str, str], list[str]]:
    """Give every item its canonical label; drop the ignored classes.

    Returns:
        ``(kept items, alias table {class as found: label}, notes)``.

    Raises:
        ValueError: a class name with no alias; the message lists the classes found, the
            accepted aliases and how to pass ``aliases=``.
    """
    table = alias_lookup(aliases, extra)
    counts = Counter(it.cls for it in items)
    found = {name: table.get(normalize_class_name(name)) for name in counts}
    unmapped = sorted(k for k, v in found.items() if v is None)
    if unmapped:
        example = unmapped[0]
        raise ValueError(
            f"cannot map class name(s) {unmapped}{where} to a label; refusing to guess.\n"
            f"Classes found:\n{format_alias_table(found, counts)}\n"
            f"Accepted aliases (case, spaces, '_' and '-' are ignored):\n{_accepted_aliases_text()}\n"
            f"Pass e.g. aliases={{{example!r}: 'cap'}} to ingest() to map it, or "
            f"aliases={{{example!r}: 'ignore'}} to leave that class out."
        )
    kept = [it for it in items if found[it.cls] != IGNORE]
    for it in kept:
        it.label = found[it.cls]
    notes = [f"class {name!r} ({counts[name]} files) ignored as asked (aliases)"
             for name, lab in found.items() if lab == IGNORE]
    return kept, found, notes
