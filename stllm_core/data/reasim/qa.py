"""Questions and exact answers for the five REA types, computed from a REA-Sim kitchen and an episode's action log.

Definitions (also in docs/data.md; the tests re-check every answer with their own geometry):
- The person at frame f stands at the camera centre's (x, y) and faces the camera's horizontal viewing direction.
- Direction of a target: angle a = bearing of the target centre's (x, y) minus the person's yaw, wrapped to (-180, 180]
  degrees, counter-clockwise positive. front |a| < 45, left 45 < a < 135, right -135 < a < -45, behind |a| > 135.
  Targets within DIR_MARGIN degrees of a boundary or closer than MIN_DIST are never asked about.
- Distance to a target: horizontal distance from the person to the target's footprint rectangle (0 if above it).
- Only stationary actions ("pick up", "put down") are used as moments: the pose is constant during them.
- Targets are furniture whose kind is unique in the kitchen ("the fridge") and items that do not move in the clip.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from stllm_core.data.reasim.scene import Box, Kitchen, preposition
from stllm_core.data.reasim.trajectory import Episode

DIR_MARGIN = 10.0  # degrees
MIN_DIST = 0.5  # metres
DIST_CHANGE = 0.5  # metres: |change| above -> closer/farther
DIST_SAME = 0.2  # metres: |change| below -> about the same
PAIR_GAP = 0.5  # metres between two targets' distances to call one closer
DIR_PHRASE = {"left": "to the left", "right": "to the right", "front": "in front", "behind": "behind"}
DIR_YOU = {"left": "to your left", "right": "to your right", "front": "in front of you", "behind": "behind you"}

AFFORDANCE_GOALS = {
    "heat up leftovers": {"microwave", "oven", "hob"},
    "wash the dishes": {"sink", "dishwasher"},
    "keep the milk cold": {"fridge"},
    "bake a cake": {"oven"},
    "fry an egg": {"hob"},
    "boil pasta": {"hob"},
    "warm up a cup of coffee": {"microwave", "hob"},
    "rinse vegetables": {"sink"},
    "sit down to eat": {"table", "chair"},
    "chill a drink": {"fridge"},
    "load the dirty dishes for a machine wash": {"dishwasher"},
    "store clean glasses": {"cabinet"},
}
# goal verb phrase -> (target furniture kind, items it applies to)
PLAN_GOALS = {
    "heat up the {item}": ("microwave", ("mug", "bowl", "plate", "cup")),
    "wash the {item}": ("sink", ("mug", "plate", "bowl", "knife", "pan", "cup", "sponge")),
    "chill the {item}": ("fridge", ("bottle", "jar", "bowl", "plate")),
    "put the {item} away in the cupboard": ("cabinet", ("mug", "plate", "bowl", "cup", "jar")),
    "heat the {item} on the hob": ("hob", ("pan", "kettle")),
    "serve the {item} at the table": ("table", ("plate", "bowl", "mug", "cup")),
}

TEMPLATES = {
    "direction": [
        "While the person was {act}, where was the {obj} relative to them: to the left, to the right, in front or "
        "behind?",
        "When the person was {act}, was the {obj} to their left, to their right, in front of them or behind them?",
        "Seen from the person while {act}, in which direction was the {obj}?",
    ],
    "same_side": [
        "While the person was {act}, were the {a} and the {b} on the same side of them?",
        "When the person was {act}, were the {a} and the {b} in the same direction from them?",
    ],
    "two_moments": [
        "Was the {obj} on the same side of the person while {a1} as while {a2}?",
        "Did the {obj} stay in the same direction from the person between {a1} and {a2}?",
    ],
    "closest_action": [
        "During which action was the person closest to the {obj}?",
        "When was the person nearest to the {obj}: {options}?",
    ],
    "dist_change": [
        "Between {a1} and {a2}, did the person get closer to the {obj} or farther from it?",
        "Compared with when they were {a1}, was the person closer to or farther from the {obj} while {a2}?",
    ],
    "dist_pair": [
        "While the person was {act}, which was closer to them, the {a} or the {b}?",
        "When the person was {act}, which was nearer: the {a} or the {b}?",
    ],
    "find": [
        "Where did I put the {item}, and which way is it from me now?",
        "I can't find the {item}. Where is it now?",
        "Where is the {item} now, and how do I get to it?",
    ],
    "afford_goal": [
        "Which of these would the person use to {goal}: {options}?",
        "To {goal}, which should the person go to: {options}?",
    ],
    "afford_next": [
        "After {act}, which will the person interact with next: {options}?",
        "The person has just finished {act}. Which of {options} will they most likely use next?",
    ],
    "plan": [
        "I want to {goal}. What should I do next?",
        "The person wants to {goal}. What is their next step?",
        "What should the person do next to {goal}?",
    ],
}


def _template_pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ..., literal
    body = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.+?)" for i, p in enumerate(parts))
    return re.compile(body, re.IGNORECASE)


_PATTERNS = [(form, _template_pattern(t)) for form, ts in TEMPLATES.items() for t in ts]


def parse_question(question: str) -> tuple[str, dict[str, str]]:
    """(form, fields) of a REA-Sim question: the TEMPLATES key it was written from and the values of its
    placeholders, e.g. ("find", {"item": "mug"}). ValueError when it matches no template."""
    q = " ".join(question.split())
    for form, pattern in _PATTERNS:
        m = pattern.fullmatch(q)
        if m:
            return form, {k: v.strip() for k, v in m.groupdict().items()}
    raise ValueError(f"not a REA-Sim question: {question[:80]!r}")


@dataclass
class QA:
    question_type: str
    question: str
    answer: str
    key: dict = field(default_factory=dict)  # the structured facts the answer was computed from


def person_at(episode: Episode, frame: int) -> tuple[np.ndarray, float]:
    """(xy, yaw radians) of the person at `frame`."""
    T = episode.poses[frame]
    f = T[:3, 2]
    return T[:2, 3].copy(), math.atan2(f[1], f[0])


def bearing_deg(xy: np.ndarray, yaw: float, target_xy) -> float:
    """Angle of target_xy seen from a person at xy facing yaw, degrees in (-180, 180], counter-clockwise positive."""
    d = np.asarray(target_xy, float)[:2] - xy
    a = math.degrees(math.atan2(d[1], d[0]) - yaw)
    return (a + 180.0) % 360.0 - 180.0


def direction_label(angle: float, margin: float = DIR_MARGIN) -> str | None:
    """front/left/right/behind, or None when within `margin` degrees of a class boundary (45, 135)."""
    a = abs(angle)
    if min(abs(a - 45.0), abs(a - 135.0)) < margin:
        return None
    if a < 45:
        return "front"
    if a > 135:
        return "behind"
    return "left" if angle > 0 else "right"


def _options(correct: str, distractors: list[str], rng: np.random.Generator, n: int = 2) -> tuple[list[str], str]:
    pick = [distractors[i] for i in rng.permutation(len(distractors))[:n]]
    opts = [correct] + pick
    opts = [opts[i] for i in rng.permutation(len(opts))]
    return opts, ", ".join(f"the {o}" for o in opts[:-1]) + f" or the {opts[-1]}"


def generate_qa(kitchen: Kitchen, episode: Episode, rng: np.random.Generator, per_type: int) -> list[QA]:
    """Up to `per_type` questions of each REA type with exact answers."""
    last = episode.num_frames - 1
    final = episode.states[-1]
    moved = {a.item for a in episode.actions if a.verb == "put down"}
    targets: dict[str, Box] = {b.kind: b for b in kitchen.furniture if b.kind in kitchen.unique_kinds()}
    for it in kitchen.items:
        if it.kind not in moved and not it.inside:
            targets[it.kind] = it.box()
    moments = [a for a in episode.actions if a.verb in ("pick up", "put down")]
    cands: dict[str, list[QA]] = {t: [] for t in ("relative_direction", "relative_distance", "find_my_item",
                                                 "furniture_affordance", "action_planning")}

    def tpl(name: str, **kw) -> str:
        opts = TEMPLATES[name]
        return opts[int(rng.integers(len(opts)))].format(**kw)

    # relative_direction ------------------------------------------------------------------------------------------
    for a in moments:
        xy, yaw = person_at(episode, a.start_frame)
        labels = {}
        for name, box in targets.items():
            if name in (a.item, a.furniture_kind) or box.footprint_distance(xy) < MIN_DIST:
                continue
            ang = bearing_deg(xy, yaw, box.center[:2])
            lab = direction_label(ang)
            if lab is None:
                continue
            labels[name] = lab
            cands["relative_direction"].append(QA(
                "relative_direction", tpl("direction", act=a.text, obj=name), DIR_PHRASE[lab],
                {"form": "single", "object": name, "frames": [a.start_frame, a.stop_frame], "direction": lab,
                 "angle_deg": round(ang, 3)}))
        names = sorted(labels)
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                na, nb = names[i], names[j]
                same = labels[na] == labels[nb]
                ans = (f"yes, both were {DIR_PHRASE[labels[na]]}" if same else
                       f"no, the {na} was {DIR_PHRASE[labels[na]]} and the {nb} was {DIR_PHRASE[labels[nb]]}")
                cands["relative_direction"].append(QA(
                    "relative_direction", tpl("same_side", act=a.text, a=na, b=nb), ans,
                    {"form": "same_side", "objects": [na, nb], "frames": [a.start_frame, a.stop_frame],
                     "directions": [labels[na], labels[nb]], "same": same}))

    for i, a1 in enumerate(moments):  # one target at two moments
        xy1, yaw1 = person_at(episode, a1.start_frame)
        for a2 in moments[i + 1:]:
            xy2, yaw2 = person_at(episode, a2.start_frame)
            for name, box in targets.items():
                if name in (a1.item, a2.item) or min(box.footprint_distance(xy1), box.footprint_distance(xy2)) < \
                        MIN_DIST:
                    continue
                l1 = direction_label(bearing_deg(xy1, yaw1, box.center[:2]))
                l2 = direction_label(bearing_deg(xy2, yaw2, box.center[:2]))
                if l1 is None or l2 is None:
                    continue
                ans = (f"yes, it was {DIR_PHRASE[l1]} both times" if l1 == l2 else
                       f"no, it was {DIR_PHRASE[l1]} while {a1.text} and {DIR_PHRASE[l2]} while {a2.text}")
                cands["relative_direction"].append(QA(
                    "relative_direction", tpl("two_moments", obj=name, a1=a1.text, a2=a2.text), ans,
                    {"form": "two_moments", "object": name, "frames": [a1.start_frame, a2.start_frame],
                     "directions": [l1, l2], "same": l1 == l2}))

    # relative_distance -------------------------------------------------------------------------------------------
    for i, a1 in enumerate(moments):
        xy1, _ = person_at(episode, a1.start_frame)
        for a2 in moments[i + 1:]:
            xy2, _ = person_at(episode, a2.start_frame)
            for name, box in targets.items():
                d1, d2 = box.footprint_distance(xy1), box.footprint_distance(xy2)
                ch = d2 - d1
                if abs(ch) < DIST_SAME:
                    lab, ans = "same", "about the same distance"
                elif abs(ch) > DIST_CHANGE:
                    lab = ans = "closer" if ch < 0 else "farther"
                else:
                    continue
                cands["relative_distance"].append(QA(
                    "relative_distance", tpl("dist_change", a1=a1.text, a2=a2.text, obj=name), ans,
                    {"form": "change", "object": name, "frames": [a1.start_frame, a2.start_frame],
                     "distances": [round(d1, 4), round(d2, 4)], "label": lab}))
    for a in moments:
        xy, _ = person_at(episode, a.start_frame)
        names = sorted(n for n in targets if n not in (a.item,))
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                da, db = targets[names[i]].footprint_distance(xy), targets[names[j]].footprint_distance(xy)
                if abs(da - db) <= PAIR_GAP:
                    continue
                pair = [names[i], names[j]] if rng.random() < 0.5 else [names[j], names[i]]
                closer = names[i] if da < db else names[j]
                cands["relative_distance"].append(QA(
                    "relative_distance", tpl("dist_pair", act=a.text, a=pair[0], b=pair[1]), f"the {closer}",
                    {"form": "pair", "objects": pair, "frames": [a.start_frame, a.stop_frame], "closer": closer}))

    if len(moments) >= 2:  # during which action was the person closest to a target
        for name, box in targets.items():
            ms = [a for a in moments if a.item != name]
            d = np.array([box.footprint_distance(person_at(episode, a.start_frame)[0]) for a in ms])
            if len(ms) < 2:
                continue
            order = np.argsort(d, kind="stable")
            if d[order[1]] - d[order[0]] <= PAIR_GAP:
                continue
            best = ms[int(order[0])]
            shown = [ms[int(k)] for k in rng.permutation(len(ms))[:3]]
            if best not in shown:
                shown[-1] = best
            options = ", ".join(a.text for a in shown[:-1]) + f" or {shown[-1].text}"
            cands["relative_distance"].append(QA(
                "relative_distance", tpl("closest_action", obj=name, options=options), f"while {best.text}",
                {"form": "closest_action", "object": name, "frames": [a.start_frame for a in ms],
                 "distances": [round(float(x), 4) for x in d], "answer_frames": [best.start_frame, best.stop_frame]}))

    # find_my_item ------------------------------------------------------------------------------------------------
    xy, yaw = person_at(episode, last)
    for it in kitchen.items:
        st = final[it.kind]
        if st.carried or st.support is None:
            continue
        sup = kitchen.get(st.support)
        ang = bearing_deg(xy, yaw, st.position[:2])
        lab = direction_label(ang) if np.linalg.norm(st.position[:2] - xy) >= MIN_DIST else None
        where = f"{preposition(sup.kind)} the {sup.kind}"
        ans = f"{where}, {DIR_YOU[lab]}" if lab else where
        qa = QA("find_my_item", tpl("find", item=it.kind), ans,
                {"item": it.kind, "support": sup.name, "support_kind": sup.kind, "frame": last, "direction": lab,
                 "angle_deg": round(ang, 3), "moved": it.kind in moved})
        # moved items first: they are what the question type is about
        cands["find_my_item"].insert(0, qa) if it.kind in moved else cands["find_my_item"].append(qa)

    # furniture_affordance ----------------------------------------------------------------------------------------
    present = sorted(set(b.kind for b in kitchen.furniture))
    for goal, valid in AFFORDANCE_GOALS.items():
        ok = [k for k in present if k in valid]
        bad = [k for k in present if k not in valid]
        if not ok or len(bad) < 2:
            continue
        correct = ok[int(rng.integers(len(ok)))]
        opts, text = _options(correct, bad, rng)
        cands["furniture_affordance"].append(QA(
            "furniture_affordance", tpl("afford_goal", goal=goal, options=text), f"the {correct}",
            {"form": "goal", "goal": goal, "options": opts, "answer": correct}))
    for a, nxt in zip(moments, moments[1:]):
        correct = nxt.furniture_kind
        bad = [k for k in present if k != correct]
        opts, text = _options(correct, bad, rng)
        cands["furniture_affordance"].append(QA(
            "furniture_affordance", tpl("afford_next", act=a.text, options=text), f"the {correct}",
            {"form": "next", "after_frames": [a.start_frame, a.stop_frame], "options": opts, "answer": correct,
             "next_frames": [nxt.start_frame, nxt.stop_frame]}))

    # action_planning ---------------------------------------------------------------------------------------------
    for goal_t, (target_kind, items) in PLAN_GOALS.items():
        if target_kind not in present:
            continue
        for it in kitchen.items:
            st = final[it.kind]
            if it.kind not in items or st.support is None or kitchen.get(st.support).kind == target_kind:
                continue
            src = kitchen.get(st.support).kind
            first = f"take the {it.kind} out of the {src}" if st.inside else f"pick up the {it.kind} from the {src}"
            ans = f"{first}, then put it {preposition(target_kind)} the {target_kind}"
            qa = QA("action_planning", tpl("plan", goal=goal_t.format(item=it.kind)), ans,
                    {"item": it.kind, "source_kind": src, "target_kind": target_kind, "frame": last,
                     "moved": it.kind in moved})
            cands["action_planning"].insert(0, qa) if it.kind in moved else cands["action_planning"].append(qa)

    out: list[QA] = []
    for qtype, lst in cands.items():
        if qtype in ("find_my_item", "action_planning"):  # moved items first, the rest shuffled after
            head = [q for q in lst if q.key.get("moved")]
            tail = [q for q in lst if not q.key.get("moved")]
            lst = [head[i] for i in rng.permutation(len(head))] + [tail[i] for i in rng.permutation(len(tail))]
        else:
            lst = [lst[i] for i in rng.permutation(len(lst))]
        out.extend(lst[:per_type])
    return out
