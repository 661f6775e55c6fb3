"""ReasonerConfig: every parameter of the reasoning service, validated.

The ROS node declares one parameter per field (same name, same default, the help text below), so
config/reasoner.yaml, the launch file and stllm-run share one list."""

from __future__ import annotations

from dataclasses import dataclass

from stllm_core.config import check, check_choice, is_ros_name
from stllm_core.engine import MAX_NEW_TOKENS_LIMIT, EngineConfig

DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float32", "bfloat16", "float16")

HELP = {
    "model": "model to load: 'stllm-smol' (the embedded default, models/stllm-smol), 'tiny-random' (a tiny "
    "untrained model for tests and plumbing), or a model directory written by save_pretrained or stllm-train",
    "llm_url": "'' = decode with the model's own language model; 'http://host:port' = an OpenAI-compatible "
    "server with prompt embeddings (stllm-serve / vLLM) decodes for this robot (the encoders stay here); checked "
    "at configure to serve this model",
    "backend": "inference backend: eager | compiled (torch.compile, CUDA graphs on GPU) | tensorrt (torch-tensorrt)",
    "device": "cpu | cuda | auto (cuda when available)",
    "dtype": "float32 | bfloat16 | float16 (float32 on CPU is the safe choice)",
    "num_frames": "frames given to the model per question; 0 = the model's configured number",
    "window_sec": "default seconds of recent video a question looks at (a request's window_sec overrides it)",
    "max_new_tokens": f"default answer length cap in tokens (a request's max_new_tokens overrides it, up to "
    f"{MAX_NEW_TOKENS_LIMIT})",
    "temperature": "0 = greedy decoding; > 0 samples",
    "top_p": "nucleus sampling mass when temperature > 0",
    "seed": "random seed for sampling and for the tiny-random model",
    "queue_size": "questions waiting while one is answered; beyond it a question is refused as busy",
    "timeout_sec": "per-question limit (waiting + answering); past it the answer is cancelled with an error",
    "max_question_chars": "longest accepted question, in characters",
    "frame_selection": "uniform (in time, as the paper) | coverage (max new voxels, needs depth)",
    "stream_partial": "publish the growing answer on the partial-answers topic while it is generated",
    "service_name": "the AskSTLLM service",
    "action_name": "the AskSTLLM action (streamed feedback, cancel); may share the service's name",
    "diagnostics_period_sec": "seconds between diagnostic_msgs/DiagnosticArray reports on /diagnostics; 0 = none",
    "answers_topic": "stllm_ros/msg/Answer published for every answered question",
    "partial_topic": "stllm_ros/msg/PartialAnswer (request id + the answer so far) while answering, when "
    "stream_partial",
}


@dataclass
class ReasonerConfig:
    model: str = "stllm-smol"
    llm_url: str = ""
    backend: str = "eager"
    device: str = "cpu"
    dtype: str = "float32"
    num_frames: int = 0
    window_sec: float = 10.0
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    queue_size: int = 4
    timeout_sec: float = 60.0
    max_question_chars: int = 1000
    frame_selection: str = "uniform"
    stream_partial: bool = True
    service_name: str = "stllm/ask"
    action_name: str = "stllm/ask"
    diagnostics_period_sec: float = 1.0
    answers_topic: str = "stllm/answers"
    partial_topic: str = "stllm/answers_partial"

    def __post_init__(self) -> None:
        check(bool(self.model.strip()), "model", self.model, "a model name or directory")
        if self.llm_url:
            from stllm_core.engine.remote import parse_llm_url

            try:
                parse_llm_url(self.llm_url)
            except ValueError as e:
                check(False, "llm_url", self.llm_url, f"'' or http(s)://host:port ({e})")
        self.engine_config()  # backend, max_new_tokens, temperature, top_p, seed: the engine's own checks
        check_choice("device", self.device, DEVICES)
        check_choice("dtype", self.dtype, DTYPES)
        check(self.num_frames >= 0, "num_frames", self.num_frames, ">= 0 (0 = the model's)")
        check(0 < self.window_sec <= 3600, "window_sec", self.window_sec, "0 < window_sec <= 3600 seconds")
        check(0 <= self.queue_size <= 1000, "queue_size", self.queue_size, "0..1000")
        check(self.timeout_sec > 0, "timeout_sec", self.timeout_sec, "> 0 seconds")
        check(1 <= self.max_question_chars <= 100_000, "max_question_chars", self.max_question_chars, "1..100000")
        check_choice("frame_selection", self.frame_selection, ("uniform", "coverage"))
        check(0 <= self.diagnostics_period_sec <= 3600, "diagnostics_period_sec", self.diagnostics_period_sec,
              "0 (off) .. 3600 seconds")
        for name in ("service_name", "action_name", "answers_topic", "partial_topic"):
            value = getattr(self, name)
            check(is_ros_name(value), name, value, "a ROS name such as 'stllm/ask' (relative: in the node's namespace) "
                  "or '/stllm/ask'")


    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            backend=self.backend,
        )
