"""Question answering over clips: AnswerPipeline (processor + model + engine)."""

from stllm_core.reasoning.pipeline import Answer, AnswerPipeline

__all__ = ["Answer", "AnswerPipeline"]
