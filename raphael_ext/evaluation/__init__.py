"""Measuring what a pipeline draws: the shapes judge, held-out alignment, and the CPU demo and ablation runs."""

from .evaluate import evaluate
from .judge import judge_accuracy, judge_image

__all__ = ["evaluate", "judge_accuracy", "judge_image"]
