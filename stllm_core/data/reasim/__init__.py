"""REA-Sim: procedural kitchens, egocentric episodes, CPU ray-cast rendering and exact REA-type QA.

    from stllm_core.data.reasim import generate_reasim, score_answer
"""

from stllm_core.data.reasim.generate import generate_reasim
from stllm_core.data.reasim.score import score_answer

__all__ = ["generate_reasim", "score_answer"]
