"""Exact, phrasing-tolerant scoring of short answers by key terms (directions, distance words, furniture, items, verbs).

score_answer("find_my_item", "It's in the fridge, behind you.", "in the fridge, behind you") -> True
score_answer("relative_direction", "to the right", "to the left") -> False

Rules per question type (the reference decides which terms matter):
- relative_direction: a yes/no reference needs the same polarity ("same side" = yes, "different/opposite" = no);
  otherwise the set of directions (left/right/front/behind) named must equal the reference's.
- relative_distance: a closer/farther/same reference needs that word and none of the other two; a reference naming
  an action ("while picking up the mug") needs the same first verb and item; otherwise the first furniture/item named
  must be the reference's.
- find_my_item: the first furniture named must be the reference's, and the directions must match when it gives one.
- furniture_affordance: the first furniture named must be the reference's.
- action_planning: the first verb (pick/put) must match and every item and furniture of the reference must appear.
A reference with none of these terms falls back to normalized exact match.
"""

from __future__ import annotations

import re

from stllm_core.errors import InputError

_QUESTION_TYPES = ("relative_direction", "relative_distance", "find_my_item", "furniture_affordance",
                   "action_planning")

# canonical term -> phrases (longest first matters only inside one category; phrases are matched on word boundaries)
TERMS: dict[str, dict[str, tuple[str, ...]]] = {
    "direction": {
        "left": ("left",), "right": ("right",),
        "front": ("in front", "front", "ahead", "straight on", "forward"),
        "behind": ("behind", "back of", "at the back", "to the back", "rear"),
    },
    "distance": {
        "closer": ("closer", "nearer", "got close", "moved toward", "moved towards"),
        "farther": ("farther", "further", "moved away", "away from"),
        "same": ("same distance", "about the same", "similar distance", "unchanged", "equally far", "equally close"),
    },
    "furniture": {
        "fridge": ("fridge", "refrigerator", "freezer"), "microwave": ("microwave", "microwave oven"),
        "oven": ("oven",), "hob": ("hob", "stove", "stovetop", "cooktop", "burner", "cooker"),
        "sink": ("sink",), "dishwasher": ("dishwasher",), "counter": ("counter", "countertop", "worktop"),
        "cabinet": ("cabinet", "cupboard"), "table": ("table",), "chair": ("chair",),
    },
    "item": {
        "mug": ("mug",), "plate": ("plate",), "bowl": ("bowl",), "knife": ("knife",),
        "pan": ("pan", "frying pan", "saucepan"), "kettle": ("kettle",), "cup": ("cup",), "bottle": ("bottle",),
        "jar": ("jar",), "sponge": ("sponge",),
    },
    "verb": {
        "pick": ("pick up", "picks up", "picking up", "picked up", "pick", "take", "taking", "took", "grab",
                 "grabbing", "get", "fetch", "collect"),
        "put": ("put", "putting", "place", "placing", "placed", "set down", "leave", "left it", "store",
                "move it", "carry it", "bring it"),
    },
}
_PATTERNS = {
    cat: [(canon, re.compile(r"\b" + re.escape(ph).replace(r"\ ", r"\s+") + r"s?\b"), len(ph))
          for canon, phs in terms.items() for ph in phs]
    for cat, terms in TERMS.items()
}


_LEFT_VERB = re.compile(
    r"\b(?:i|you|he|she|they|we|person|had|have|has) left\b|\bleft (?:it|them|the|my|your)\b")


def normalize(text: str) -> str:
    """Lower-case, words only, single spaces."""
    return " ".join(re.findall(r"[a-z0-9]+", str(text).lower().replace("'", "")))


def extract(text: str, category: str) -> list[str]:
    """Canonical terms of `category` in order of appearance (overlapping shorter matches dropped)."""
    t = normalize(text)
    if category == "direction":  # "I left it in the fridge" names no direction
        t = _LEFT_VERB.sub(lambda m: "_" * len(m.group(0)), t)
    hits = []
    for canon, pat, n in _PATTERNS[category]:
        for m in pat.finditer(t):
            hits.append((m.start(), -n, m.end(), canon))
    hits.sort()
    out, end = [], -1
    for start, _, stop, canon in hits:
        if start < end:  # inside a longer, earlier phrase ("microwave oven" -> microwave only)
            continue
        out.append(canon)
        end = stop
    return out


def _first(text: str, *categories: str) -> str | None:
    t = normalize(text)
    best = None
    for cat in categories:
        for canon, pat, _ in _PATTERNS[cat]:
            m = pat.search(t)
            if m and (best is None or m.start() < best[0]):
                best = (m.start(), canon)
    return best[1] if best else None


def score_answer(question_type: str, prediction: str, reference: str) -> bool:
    """True if `prediction` gives the same key facts as `reference` for this REA question type."""
    if question_type not in _QUESTION_TYPES:
        raise InputError(f"Unknown question_type {question_type!r}; expected one of {', '.join(_QUESTION_TYPES)}.")
    pred, ref = str(prediction or ""), str(reference or "")
    if not normalize(pred):
        return False
    if normalize(pred) == normalize(ref):
        return True
    ref_dirs = set(extract(ref, "direction"))
    pred_dirs = set(extract(pred, "direction"))
    if question_type == "relative_direction":
        pol = _polarity(ref)
        if pol is not None:
            return _polarity(pred) == pol
        if ref_dirs:
            return pred_dirs == ref_dirs
    elif question_type == "relative_distance":
        rd = set(extract(ref, "distance"))
        if rd:
            return set(extract(pred, "distance")) == rd
        rv = extract(ref, "verb")
        if rv:  # "while picking up the mug ...": the same action (verb + item; each item moves once per clip)
            pv = extract(pred, "verb")
            return bool(pv) and pv[0] == rv[0] and set(extract(ref, "item")) <= set(extract(pred, "item"))
        r = _first(ref, "furniture", "item")
        if r:
            return _first(pred, "furniture", "item") == r
    elif question_type == "find_my_item":
        r = _first(ref, "furniture")
        if r:
            return _first(pred, "furniture") == r and (not ref_dirs or pred_dirs == ref_dirs)
    elif question_type == "furniture_affordance":
        r = _first(ref, "furniture")
        if r:
            return _first(pred, "furniture") == r
    elif question_type == "action_planning":
        rv = extract(ref, "verb")
        needed = set(extract(ref, "item")) | set(extract(ref, "furniture"))
        if rv or needed:
            pv = extract(pred, "verb")
            have = set(extract(pred, "item")) | set(extract(pred, "furniture"))
            return (not rv or (bool(pv) and pv[0] == rv[0])) and needed <= have
    return False


def _polarity(text: str) -> str | None:
    """'yes'/'no' when the text starts with it (or says same side / different sides), else None."""
    words = normalize(text).split()
    if words and words[0] in ("yes", "no"):
        return words[0]
    t = normalize(text)
    if re.search(r"\b(different|opposite)\b|\bnot\b.*\bsame\b", t):
        return "no"
    if re.search(r"\bsame (side|direction)\b|\bboth\b", t):
        return "yes"
    return None
