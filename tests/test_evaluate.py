"""stllm-eval: generation with the robot's AnswerPipeline, scores, per-type accuracy, judge, results JSON and chart."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stllm_core.data import read_rea_json
from training import evaluate as ev
from training.data import write_smoke_rea


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return write_smoke_rea(tmp_path_factory.mktemp("rea"), num_clips=2, frames_per_clip=6)


class OraclePipeline:
    """Answers with the reference (or a fixed text) through the AnswerPipeline interface, to check the scoring."""

    num_frames = 4

    def __init__(self, data, wrong_types=()):
        self.records = iter(read_rea_json(data))  # evaluate() asks them in file order
        self.wrong_types = set(wrong_types)
        self.clips = []

    def answer(self, question, clip, **kw):
        from stllm_core.reasoning.pipeline import Answer

        self.clips.append(clip)
        rec = next(self.records)
        while rec.question != question:  # records that failed to load never reach the pipeline
            rec = next(self.records)
        text = "banana" if rec.question_type in self.wrong_types else rec.answer
        return Answer(text=text, num_tokens=3, encode_ms=1.0, prefill_ms=1.0, decode_ms=2.0, num_frames=4,
                      num_points=clip.scene.num_points)


def test_scores_and_outputs_with_an_oracle(smoke, tmp_path):
    pipe = OraclePipeline(smoke, wrong_types={"action_planning"})
    cfg = ev.EvalConfig(data=str(smoke), out=str(tmp_path / "res.json"), meteor=False, sentence_sim=False,
                        tokenizer="simple", ablation="no-points")
    res = ev.evaluate(cfg, pipeline=pipe, progress=False)
    acc = res["accuracy"]
    assert res["num_answered"] == 10 and res["num_failed"] == 0
    assert acc["relative_direction"]["accuracy"] == 100.0 and acc["action_planning"]["accuracy"] == 0.0
    assert acc["overall"]["accuracy"] == pytest.approx(80.0) and acc["mean_per_type"] == pytest.approx(80.0)
    assert 0 < res["language_metrics"]["BLEU-1"] < 100
    assert all(c.scene.num_points == 0 for c in pipe.clips) and all(len(c.frames) == 4 for c in pipe.clips)
    saved = json.loads((tmp_path / "res.json").read_text())
    assert saved["language_metrics"]["METEOR"] is None  # NaN is written as null (strict JSON)
    assert len(saved["predictions"]) == 10 and saved["predictions"][0]["correct"] in (True, False)
    png = tmp_path / "res.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res["chart"] == str(png)


def test_reasim_references_score_full_marks(tmp_path):
    from stllm_core.data import generate_reasim

    generate_reasim(tmp_path / "rs", scenes=2, clips_per_scene=1, frames=8, size=(64, 48), questions_per_type=1,
                    write_depth=False)
    data = tmp_path / "rs" / "train.json"
    cfg = ev.EvalConfig(data=str(data), out=str(tmp_path / "o.json"), meteor=False, sentence_sim=False,
                        tokenizer="simple")
    res = ev.evaluate(cfg, pipeline=OraclePipeline(data), progress=False)
    assert res["num_answered"] == len(read_rea_json(data)) > 0
    assert res["accuracy"]["overall"]["accuracy"] == 100.0
    assert res["language_metrics"]["BLEU-1"] == pytest.approx(100.0)


def test_rule_baseline_answers_from_the_question_alone(tmp_path):
    from types import SimpleNamespace

    from stllm_core.data import generate_reasim
    from training.baselines import QuestionPrior

    def rec(q, a, t="furniture_affordance"):
        return SimpleNamespace(question=q, answer=a, question_type=t)

    heat = "Which of these would the person use to heat up leftovers: the {}?"
    prior = QuestionPrior([rec(heat.format("sink, the hob or the fridge"), "the hob")] * 5
                          + [rec(heat.format("table, the microwave or the sink"), "the microwave")] * 5
                          + [rec("Is it left?", "yes", "relative_direction")] * 3, min_count=5)
    assert prior.answer(heat.format("fridge, the sink or the hob"), "furniture_affordance") == "the hob"  # any order
    assert prior.answer(heat.format("microwave, the table or the sink"), "furniture_affordance") == "the microwave"
    assert prior.answer("Something else?", "relative_direction") == "yes"  # the type's majority
    generate_reasim(tmp_path / "rs", scenes=3, clips_per_scene=1, frames=8, size=(64, 48), questions_per_type=2,
                    write_depth=False, val_fraction=0.34)
    train, val = tmp_path / "rs" / "train.json", tmp_path / "rs" / "val.json"
    cfg = ev.EvalConfig(data=str(val), out=str(tmp_path / "o.json"), meteor=False, sentence_sim=False,
                        tokenizer="simple", rule_train=str(train))
    res = ev.evaluate(cfg, pipeline=OraclePipeline(val), progress=False)
    rule = res["baselines"]["rule"]["accuracy"]
    assert 0 <= rule["overall"]["accuracy"] <= 100 and rule["overall"]["stderr"] >= 0
    assert all("rule_prediction" in r for r in res["predictions"])
    assert any(line.startswith("rule baseline") for line in ev.summary_lines(res))


def test_failed_records_are_listed(smoke, tmp_path):
    records = json.loads(smoke.read_text())
    broken = dict(records[0], id="no-frames", query_start_frame=500)
    broken["metadata"] = dict(records[0]["metadata"], query_start_frame=500, query_stop_frame=600)
    path = smoke.parent / "with_broken.json"
    path.write_text(json.dumps([broken, *records[1:3]]))
    cfg = ev.EvalConfig(data=str(path), out=str(tmp_path / "r.json"), meteor=False, sentence_sim=False,
                        tokenizer="simple")
    res = ev.evaluate(cfg, pipeline=OraclePipeline(path), progress=False)
    assert res["num_failed"] == 1 and res["failed"][0][0] == "no-frames" and "no frames" in res["failed"][0][1]
    assert res["num_answered"] == 2
    with pytest.raises(ev.STLLMError, match="no-frames"):
        ev.evaluate(ev.EvalConfig(**{**cfg.__dict__, "on_error": "raise"}), pipeline=OraclePipeline(path),
                    progress=False)


class _JudgeServer:
    def __init__(self):
        self.calls = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.calls += 1
                cand = body["messages"][1]["content"].split("Candidate answer: ")[1]
                text = "correct" if "person" in cand or "you" in cand.lower() else "incorrect"
                data = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_cli_with_tiny_random_model_and_judge(smoke, tmp_path, capsys):
    srv = _JudgeServer()
    try:
        rc = ev.main(["--model", "tiny-random", "--data", str(smoke), "--out", str(tmp_path / "cli.json"),
                      "--limit", "5", "--device", "cpu", "--max-new-tokens", "6", "--no-meteor", "--no-sentence-sim",
                      "--tokenizer", "simple", "--judge-model", "local-judge", "--judge-base-url", srv.url,
                      "--judge-api-key-env", "", "--blind", "--no-progress"])
    finally:
        srv.close()
    out = capsys.readouterr().out
    assert rc == 0 and "5/5 answered" in out and "judge overall" in out
    res = json.loads((tmp_path / "cli.json").read_text())
    assert srv.calls == 5 and res["judge"]["accuracy"]["overall"]["invalid"] == 0
    assert res["ablation"] == "blind" and all(p["num_tokens"] <= 6 for p in res["predictions"])
    assert res["timing"]["mean_decode_ms"] is not None
    assert ev.main(["--data", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.json"), "--no-progress",
                    "--device", "cpu"]) == 2


def test_trained_export_loads_in_the_robot_pipeline(smoke, tmp_path):
    from stllm_core.reasoning.pipeline import AnswerPipeline
    from training import train as tr

    cfg = tr.RunConfig.from_dict({"model": {"base": "tiny"}, "data": {"train": str(smoke)},
                                  "train": {"max_steps": 1, "batch_size": 1, "grad_accum": 1},
                                  "out_dir": str(tmp_path / "run")})
    res = tr.train(cfg, progress=False)
    pipe = AnswerPipeline.load(model=str(res.export_dir), device="cpu", max_new_tokens=4)
    out = ev.evaluate(ev.EvalConfig(data=str(smoke), out=str(tmp_path / "e.json"), limit=2, meteor=False,
                                    sentence_sim=False, tokenizer="simple"), pipeline=pipe, progress=False)
    assert out["num_answered"] == 2 and out["model"] == "tiny-random"  # cfg.model is only a label here
