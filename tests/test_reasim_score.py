"""score_answer: a table of predictions that must (not) count as the reference answer."""

import pytest

from stllm_core.data import score_answer
from stllm_core.data.reasim.score import extract
from stllm_core.errors import InputError

CASES = [
    # (question type, prediction, reference, expected)
    ("relative_direction", "to the left", "to the left", True),
    ("relative_direction", "Left.", "to the left", True),
    ("relative_direction", "The fridge was on the person's left side.", "to the left", True),
    ("relative_direction", "to the right", "to the left", False),
    ("relative_direction", "left or right", "to the left", False),
    ("relative_direction", "It was in front of them.", "in front", True),
    ("relative_direction", "The sink was left of the person.", "to the left", True),
    ("relative_direction", "straight ahead", "in front", True),
    ("relative_direction", "behind the person", "in front", False),
    ("relative_direction", "yes", "yes, both were to the left", True),
    ("relative_direction", "They were on the same side.", "yes, both were to the left", True),
    ("relative_direction", "No, they are on different sides.", "no, the oven was behind and the sink was left", True),
    ("relative_direction", "yes", "no, the oven was behind and the sink was to the left", False),
    ("relative_distance", "closer", "closer", True),
    ("relative_distance", "The person moved nearer to it.", "closer", True),
    ("relative_distance", "farther", "closer", False),
    ("relative_distance", "further away", "farther", True),
    ("relative_distance", "about the same", "about the same distance", True),
    ("relative_distance", "closer", "about the same distance", False),
    ("relative_distance", "The fridge was closer.", "the fridge", True),
    ("relative_distance", "the refrigerator", "the fridge", True),
    ("relative_distance", "the sink", "the fridge", False),
    ("relative_distance", "the mug", "the mug", True),
    ("find_my_item", "in the fridge, behind you", "in the fridge, behind you", True),
    ("find_my_item", "You left it in the fridge, which is behind you.", "in the fridge, behind you", True),
    ("find_my_item", "You left it in the fridge, to your left.", "in the fridge, to your left", True),
    ("relative_distance", "when they picked up the mug", "while picking up the mug from the counter", True),
    ("relative_distance", "while putting the mug on the table", "while picking up the mug from the counter", False),
    ("relative_distance", "while picking up the bowl", "while picking up the mug from the counter", False),
    ("find_my_item", "You put it in the refrigerator; turn around, it's behind you.", "in the fridge, behind you",
     True),
    ("find_my_item", "in the fridge, to your left", "in the fridge, behind you", False),
    ("find_my_item", "on the table, behind you", "in the fridge, behind you", False),
    ("find_my_item", "It is on the table.", "on the table", True),
    ("find_my_item", "on the countertop to your right", "on the counter, to your right", True),
    ("find_my_item", "in the microwave oven, in front of you", "in the microwave, in front of you", True),
    ("find_my_item", "in the oven, in front of you", "in the microwave, in front of you", False),
    ("furniture_affordance", "the sink", "the sink", True),
    ("furniture_affordance", "The person should use the stove.", "the hob", True),
    ("furniture_affordance", "the oven", "the hob", False),
    ("furniture_affordance", "cupboard", "the cabinet", True),
    ("action_planning", "pick up the mug from the table, then put it in the microwave",
     "pick up the mug from the table, then put it in the microwave", True),
    ("action_planning", "Grab the mug off the table and place it in the microwave.",
     "pick up the mug from the table, then put it in the microwave", True),
    ("action_planning", "pick up the cup from the table, then put it in the microwave",
     "pick up the mug from the table, then put it in the microwave", False),
    ("action_planning", "pick up the mug from the table, then put it in the sink",
     "pick up the mug from the table, then put it in the microwave", False),
    ("action_planning", "Put the mug in the microwave.",
     "pick up the mug from the table, then put it in the microwave", False),
    ("action_planning", "take the bowl out of the fridge, then put it on the table",
     "take the bowl out of the fridge, then put it on the table", True),
    ("action_planning", "", "pick up the mug from the table, then put it in the microwave", False),
]


@pytest.mark.parametrize("qtype,pred,ref,expected", CASES)
def test_score_table(qtype, pred, ref, expected):
    assert score_answer(qtype, pred, ref) is expected


def test_extract_prefers_longer_phrases():
    assert extract("the microwave oven", "furniture") == ["microwave"]
    assert extract("the oven and the fridge", "furniture") == ["oven", "fridge"]


def test_unknown_type():
    with pytest.raises(InputError, match="Unknown question_type 'counting'"):
        score_answer("counting", "a", "b")
