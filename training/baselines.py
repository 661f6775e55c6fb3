"""Question-only baselines: what can be answered without looking at the scene.

QuestionPrior is the rule baseline: for each question it answers the most common training answer among training
questions of the same form (REA-Sim template) that share the most specific of its fields. Backing off from
    (form, every field)   e.g. the goal AND the listed options of a furniture-affordance question
    (form, one field)     the field whose training answers are the most one-sided (at least `min_count` of them)
    (form,)               the majority answer of the form
it learns, from data, rules such as "heating -> the hob" or "same side? -> yes". Questions that match no REA-Sim
template fall back to the majority answer of their question type.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable

from stllm_core.data.reasim.qa import parse_question
from stllm_core.data.reasim.score import normalize


def _form(question: str, qtype: str) -> tuple[str, dict[str, str]]:
    try:
        form, fields = parse_question(question)
    except ValueError:
        return f"type:{qtype}", {}
    if "options" in fields:  # the same options in any order are the same question
        fields = {**fields, "options": ",".join(sorted(o.strip() for o in fields["options"].replace(" or ", ", ")
                                                      .split(",")))}
    return form, {k: normalize(v) for k, v in fields.items()}


class QuestionPrior:
    """The most common training answer among questions like this one (see the module docstring)."""

    def __init__(self, records: Iterable, min_count: int = 5):
        self.min_count = min_count
        self.exact: dict[tuple, Counter] = defaultdict(Counter)
        self.by_field: dict[tuple, Counter] = defaultdict(Counter)
        self.by_form: dict[str, Counter] = defaultdict(Counter)
        for r in records:
            form, fields = _form(r.question, r.question_type)
            self.exact[(form, tuple(sorted(fields.items())))][r.answer] += 1
            for item in fields.items():
                self.by_field[(form, item)][r.answer] += 1
            self.by_form[form][r.answer] += 1
            self.by_form[f"type:{r.question_type}"][r.answer] += 1

    def answer(self, question: str, question_type: str) -> str:
        form, fields = _form(question, question_type)
        exact = self.exact.get((form, tuple(sorted(fields.items()))))
        if exact and sum(exact.values()) >= self.min_count:
            return exact.most_common(1)[0][0]
        best = None
        for item in fields.items():
            c = self.by_field.get((form, item))
            if c and sum(c.values()) >= self.min_count:
                share = c.most_common(1)[0][1] / sum(c.values())
                if best is None or share > best[0]:
                    best = (share, c.most_common(1)[0][0])
        if best is not None:
            return best[1]
        c = self.by_form.get(form) or self.by_form.get(f"type:{question_type}")
        return c.most_common(1)[0][0] if c else ""
