"""Merge methods: one module each, chaining the ops per tensor. `METHODS` maps the names that
nk.merge accepts to their Method records."""
from neurokern.methods import dare, neuromerging, task_arithmetic, ties

METHODS = {
    m.name: m
    for m in (task_arithmetic.METHOD, ties.METHOD, dare.DARE, dare.DARE_TIES, neuromerging.METHOD)
}

__all__ = ["METHODS"]
