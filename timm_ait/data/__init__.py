"""Datasets that timm-ait generates rather than downloads."""
from .sort_of_clevr import (
    ANSWERS,
    COLORS,
    NUM_ANSWERS,
    QUESTION_DIM,
    SHAPES,
    SortOfClevr,
    answer_name,
    describe_question,
)
from .triangle import TriangleDataset

__all__ = [
    "TriangleDataset",
    "SortOfClevr",
    "COLORS",
    "SHAPES",
    "ANSWERS",
    "QUESTION_DIM",
    "NUM_ANSWERS",
    "describe_question",
    "answer_name",
]
