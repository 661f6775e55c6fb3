"""stllm-eval: answer every question of a REA-format split with the robot's AnswerPipeline and score the answers.

    stllm-eval --model runs/tiny/model --data data/reasim/val.json --out results.json [--limit N]
               [--no-video | --no-points | --blind] [--judge-model gpt-4o --judge-base-url URL]

Scores:
- language metrics of the paper (percent): CIDEr, BLEU-1..4 (the paper's "BLEU" is BLEU-3), METEOR, ROUGE-L,
  SentenceSim (training.metrics);
- per-question-type accuracy with the key-fact scorer of REA-Sim (stllm_core.data.reasim.score_answer: exact for
  REA-Sim answers, a strict key-fact match for REA's sentence answers);
- optionally an LLM judge (training.judge) over an OpenAI-compatible endpoint, accuracy = correct / all judged;
- with --rule-train TRAIN_JSON, the rule baseline on the same records (training.baselines.QuestionPrior: the most
  common training answer of questions like it), scored the same way: what the question alone gives.
Writes a results JSON (metrics, per-type accuracies, timings, every prediction) and a per-task bar chart PNG.
Records that cannot be loaded are listed with their id and reason and left out of the scores (never silently).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stllm_core.config import check, check_choice
from stllm_core.errors import STLLMError

log = logging.getLogger(__name__)

SCORERS = ("reasim", "none")


@dataclass
class EvalConfig:
    model: str = "tiny-random"  # a model directory or "tiny-random"
    data: str = ""  # REA JSON
    root: str | None = None
    out: str = "results.json"
    chart: str | None = None  # default: <out without .json>.png
    limit: int = 0  # 0 = all records
    ablation: str = "none"  # none | no-video | no-points | no-position | blind
    device: str = "auto"
    dtype: str = "float32"
    backend: str = "eager"
    max_new_tokens: int = 64
    seed: int = 0
    scorer: str = "reasim"
    meteor: bool = True
    sentence_sim: bool = True
    tokenizer: str = "ptb"
    judge: dict[str, Any] | None = None  # JudgeConfig fields; None = no judge
    on_error: str = "skip"
    rule_train: str | None = None  # REA JSON the rule baseline learns its answers from (None = no rule baseline)
    extra: dict[str, Any] = field(default_factory=dict)  # copied into the results (e.g. the run name)

    def __post_init__(self):
        from training.data import ABLATIONS, ON_ERROR

        check(bool(self.data), "data", self.data, "a REA JSON file")
        check(isinstance(self.limit, int) and self.limit >= 0, "limit", self.limit, "an int >= 0 (0 = all)")
        check_choice("ablation", self.ablation, ABLATIONS)
        check_choice("scorer", self.scorer, SCORERS)
        check_choice("on_error", self.on_error, ON_ERROR)


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def accuracy_by_type(rows: list[dict], key: str = "correct") -> dict[str, Any]:
    """{overall, <question type>: Tally.as_dict(), mean_per_type} of the verdicts `row[key]` of result rows."""
    from training.judge import Tally

    tallies: dict[str, Tally] = {"overall": Tally()}
    for r in rows:
        tallies["overall"].add(r[key])
        tallies.setdefault(r["question_type"], Tally()).add(r[key])
    acc = {k: t.as_dict() for k, t in tallies.items()}
    acc["mean_per_type"] = _mean([acc[k]["accuracy"] for k in acc if k != "overall"])
    return acc


def evaluate(cfg: EvalConfig, pipeline=None, progress: bool = True,
             judge_client=None, sentence_sim=None) -> dict[str, Any]:
    """Run the evaluation and return the results dict (also written to cfg.out, with the chart)."""
    from tqdm import tqdm

    from stllm_core.data import read_rea_json, record_to_clip
    from stllm_core.errors import DataError
    from training import metrics as M
    from training.data import ablate
    from training.judge import JudgeClient, JudgeConfig, judge_all

    if pipeline is None:
        from stllm_core.reasoning.pipeline import AnswerPipeline

        pipeline = AnswerPipeline.load(model=cfg.model, device=cfg.device, dtype=cfg.dtype, backend=cfg.backend,
                                       seed=cfg.seed, max_new_tokens=cfg.max_new_tokens)
    if cfg.judge is not None and judge_client is None:
        from stllm_core.config import from_dict

        judge_client = JudgeClient(from_dict(JudgeConfig, cfg.judge, where="judge"))
    records = read_rea_json(cfg.data, on_error=cfg.on_error, root=cfg.root)
    skipped_on_read = [list(x) for x in records.skipped]
    if cfg.limit:
        records = records[: cfg.limit]

    rows: list[dict[str, Any]] = []
    failed: list[list[str]] = []
    t_start = time.perf_counter()
    for rec in tqdm(records, desc="eval", unit="q", disable=not progress):
        try:
            clip = record_to_clip(rec, num_frames=pipeline.num_frames, with_points=cfg.ablation not in
                                  ("no-points", "blind"))
            clip = ablate(clip, cfg.ablation) if cfg.ablation != "none" else clip
            ans = pipeline.answer(rec.question, clip)
        except (STLLMError, OSError, ValueError) as e:
            if cfg.on_error == "raise":
                raise DataError(f"{cfg.data}: record {rec.id!r} failed: {type(e).__name__}: {e}") from e
            log.warning("record %s failed: %s", rec.id, e)
            failed.append([rec.id, f"{type(e).__name__}: {e}"])
            continue
        row = {"id": rec.id, "question_type": rec.question_type, "question": rec.question, "reference": rec.answer,
               "prediction": ans.text, "num_tokens": ans.num_tokens, "encode_ms": ans.encode_ms,
               "prefill_ms": ans.prefill_ms, "decode_ms": ans.decode_ms, "stopped": ans.stopped}
        if cfg.scorer == "reasim":
            from stllm_core.data import score_answer

            row["correct"] = bool(score_answer(rec.question_type, ans.text, rec.answer))
        rows.append(row)
    elapsed = time.perf_counter() - t_start

    preds = [r["prediction"] for r in rows]
    refs = [r["reference"] for r in rows]
    if rows:
        if cfg.sentence_sim and sentence_sim is None:
            sentence_sim = M.SentenceSim()
        lang = M.language_metrics(preds, refs, meteor=cfg.meteor, sentence_sim=sentence_sim or False,
                                  tokenizer=cfg.tokenizer)
    else:
        lang = {m: math.nan for m in M.METRIC_NAMES}

    def per_type(key: str) -> dict[str, Any]:
        return accuracy_by_type(rows, key)

    accuracy, baselines = None, {}
    if cfg.scorer != "none":
        from stllm_core.data import score_answer

        accuracy = per_type("correct")
        if cfg.rule_train:
            from training.baselines import QuestionPrior

            prior = QuestionPrior(read_rea_json(cfg.rule_train, on_error="skip", root=cfg.root))
            by_id = {rec.id: rec for rec in records}
            for r in rows:
                r["rule_prediction"] = prior.answer(by_id[r["id"]].question, r["question_type"])
                r["rule_correct"] = bool(score_answer(r["question_type"], r["rule_prediction"], r["reference"]))
            baselines["rule"] = {"train": str(cfg.rule_train), "accuracy": per_type("rule_correct")}

    judge_out = None
    if judge_client is not None and rows:
        items = [{"id": r["id"], "question_type": r["question_type"], "question": r["question"],
                  "reference": r["reference"], "prediction": r["prediction"]} for r in rows]
        jrows, jtally = judge_all(judge_client, items)
        for r, j in zip(rows, jrows):
            r["judge_verdict"], r["judge_reply"] = j["verdict"], j["reply"]
        types = [k for k in jtally if k != "overall"]
        judge_out = {"model": judge_client.config.model, "base_url": judge_client.config.base_url,
                     "accuracy": jtally, "mean_per_type": _mean([jtally[k]["accuracy"] for k in types])}

    tokens = sum(r["num_tokens"] for r in rows)
    decode_s = sum(r["decode_ms"] for r in rows) / 1e3
    results = {
        "model": cfg.model, "data": str(cfg.data), "ablation": cfg.ablation, "backend": cfg.backend,
        "num_records": len(records), "num_answered": len(rows), "num_failed": len(failed), "failed": failed,
        "skipped_on_read": skipped_on_read,
        "language_metrics": lang,
        "accuracy": accuracy,
        "baselines": baselines,
        "judge": judge_out,
        "timing": {"wall_s": elapsed, "mean_encode_ms": _mean([r["encode_ms"] for r in rows]),
                   "mean_prefill_ms": _mean([r["prefill_ms"] for r in rows]),
                   "mean_decode_ms": _mean([r["decode_ms"] for r in rows]),
                   "decode_tokens_per_s": tokens / decode_s if decode_s > 0 else math.nan},
        **cfg.extra,
        "predictions": rows,
    }
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_json_safe(results), indent=1))
    chart = Path(cfg.chart) if cfg.chart else out.with_suffix(".png")
    if accuracy or judge_out:
        plot_per_task(results, chart)
        results["chart"] = str(chart)
    return results


def _json_safe(x: Any) -> Any:
    """NaN -> null so the file is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def plot_per_task(results: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of per-question-type accuracy (key-fact scorer and, if present, the LLM judge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: list[tuple[str, dict[str, Any]]] = []
    if results.get("accuracy"):
        series.append(("key-fact scorer", results["accuracy"]))
    for name, b in (results.get("baselines") or {}).items():
        series.append((f"{name} baseline (question only)", b["accuracy"]))
    if results.get("judge"):
        series.append((f"judge ({results['judge']['model']})", results["judge"]["accuracy"]))
    types = sorted({k for _, acc in series for k in acc if k not in ("overall", "mean_per_type")})
    labels = [*types, "overall"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(labels)), 4.0), dpi=100)
    width = 0.8 / max(1, len(series))
    for i, (name, acc) in enumerate(series):
        vals = [acc.get(t, {}).get("accuracy", math.nan) if isinstance(acc.get(t), dict) else math.nan
                for t in labels]
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, [0 if math.isnan(v) else v for v in vals], width, label=name)
        for b, v in zip(bars, vals):
            ax.annotate("n/a" if math.isnan(v) else f"{v:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([t.replace("_", "\n") for t in labels], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    model_label = "/".join(Path(str(results.get("model", ""))).parts[-2:]) or str(results.get("model"))
    ax.set_title(f"{model_label} on "
                 f"{Path(str(results.get('data', ''))).name} ({results.get('num_answered', 0)} questions, "
                 f"ablation: {results.get('ablation', 'none')})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def summary_lines(results: dict[str, Any]) -> list[str]:
    lm = results["language_metrics"]

    def f(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"

    lines = [f"{results['num_answered']}/{results['num_records']} answered ({results['num_failed']} failed)",
             "  ".join(f"{k} {f(lm.get(k))}" for k in ("CIDEr", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L",
                                                        "SentenceSim"))]
    if results.get("accuracy"):
        acc = results["accuracy"]
        lines.append("accuracy " + "  ".join(f"{k} {f(v['accuracy'])}" for k, v in acc.items() if isinstance(v, dict))
                     + f"  mean_per_type {f(acc['mean_per_type'])}")
    for name, b in (results.get("baselines") or {}).items():
        acc = b["accuracy"]
        parts = [f"{k} {f(v['accuracy'])}" for k, v in acc.items() if isinstance(v, dict)]
        lines.append(f"{name} baseline " + "  ".join(parts) + f"  mean_per_type {f(acc['mean_per_type'])}")
    if results.get("judge"):
        lines.append(f"judge overall {f(results['judge']['accuracy']['overall']['accuracy'])}")
    return lines


def main(argv: list[str] | None = None, pipeline_factory: Callable | None = None) -> int:
    p = argparse.ArgumentParser(prog="stllm-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-random", help="model directory (save_pretrained) or tiny-random")
    p.add_argument("--data", required=True, help="REA JSON split (e.g. data/reasim/val.json)")
    p.add_argument("--root", help="directory REA paths are relative to (default: the JSON's directory)")
    p.add_argument("--out", default="results.json")
    p.add_argument("--chart", help="bar chart PNG (default: next to --out)")
    p.add_argument("--limit", type=int, default=0)
    abl = p.add_mutually_exclusive_group()
    abl.add_argument("--no-video", dest="ablation", action="store_const", const="no-video",
                     help="black frames (poses kept)")
    abl.add_argument("--no-points", dest="ablation", action="store_const", const="no-points", help="empty scene")
    abl.add_argument("--no-position", dest="ablation", action="store_const", const="no-position",
                     help="every camera centre moved to the first camera's (orientations kept)")
    abl.add_argument("--blind", dest="ablation", action="store_const", const="blind",
                     help="black frames, no points, every pose the first one: the question alone")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backend", default="eager", choices=["eager", "compiled", "tensorrt"])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scorer", default="reasim", choices=SCORERS)
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (Java, ~15 s start-up)")
    p.add_argument("--no-sentence-sim", action="store_true")
    p.add_argument("--tokenizer", default="ptb", choices=["ptb", "simple"])
    p.add_argument("--judge-model", help="enable the LLM judge with this model name (e.g. gpt-4o)")
    p.add_argument("--judge-base-url", default="https://api.openai.com/v1")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="env var holding the key ('' = none)")
    p.add_argument("--on-error", default="skip", choices=["skip", "raise"])
    p.add_argument("--rule-train", help="training REA JSON for the rule baseline (the most common answer of questions "
                                        "like each one); scored on the same records")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(ablation="none")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    judge = None
    if args.judge_model:
        judge = {"model": args.judge_model, "base_url": args.judge_base_url,
                 "api_key_env": args.judge_api_key_env or None}
    try:
        cfg = EvalConfig(model=args.model, data=args.data, root=args.root, out=args.out, chart=args.chart,
                         limit=args.limit, ablation=args.ablation, device=args.device, dtype=args.dtype,
                         backend=args.backend, max_new_tokens=args.max_new_tokens, seed=args.seed,
                         scorer=args.scorer, meteor=not args.no_meteor, sentence_sim=not args.no_sentence_sim,
                         tokenizer=args.tokenizer, judge=judge, on_error=args.on_error, rule_train=args.rule_train)
        pipeline = pipeline_factory(cfg) if pipeline_factory else None
        results = evaluate(cfg, pipeline=pipeline, progress=not args.no_progress)
    except STLLMError as e:
        print(f"stllm-eval: error: {e}", file=sys.stderr)
        return 2
    for line in summary_lines(results):
        print(line)
    print(f"results: {cfg.out}" + (f", chart: {results['chart']}" if results.get("chart") else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
