"""Data: EPIC-style clip folders, REA records, the REA-Sim synthetic generator, RGB-D sequence conversion.

    from stllm_core.data import ClipFolder, write_clip_folder, read_rea_json, record_to_clip, QUESTION_TYPES
    from stllm_core.data import generate_reasim, score_answer
"""

from stllm_core.data.clip_folder import ClipFolder, read_pointcloud, write_clip_folder
from stllm_core.data.rea import (
    QUESTION_TYPES,
    ReaRecord,
    ReaRecords,
    make_conversations,
    read_rea_json,
    record_frame_ids,
    record_to_clip,
    write_rea_json,
)

__all__ = [
    "QUESTION_TYPES", "ClipFolder", "ReaRecord", "ReaRecords", "generate_reasim", "make_conversations",
    "read_pointcloud", "read_rea_json", "record_frame_ids", "record_to_clip", "score_answer", "write_clip_folder",
    "write_rea_json",
]


def __getattr__(name):  # lazy: the generator pulls in open3d
    if name == "generate_reasim":
        from stllm_core.data.reasim.generate import generate_reasim

        return generate_reasim
    if name == "score_answer":
        from stllm_core.data.reasim.score import score_answer

        return score_answer
    raise AttributeError(f"module 'stllm_core.data' has no attribute {name!r}")
