"""Validation metrics for training: they live in lmforge.engine.score (inference scores text
too, and must not import the trainer); re-exported here for the training code."""

from lmforge.engine.score import Accumulator, EvalResult, evaluate_windows

__all__ = ["Accumulator", "EvalResult", "evaluate_windows"]
