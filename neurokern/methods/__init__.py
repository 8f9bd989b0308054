"""Merge methods: one module each, chaining the ops per tensor. `METHODS` maps the names that
nk.merge accepts to their Method records; register adds one (neurokern.methods.method: the
record; neurokern.methods.passes: the whole-model passes a method can declare, which the
streaming engine runs for it)."""
from neurokern.errors import NeurokernError
from neurokern.methods import (breadcrumbs, dare, della, linear, magnitude_prune, model_stock, neuromerging, nuslerp,
                               passthrough, slerp, task_arithmetic, ties)
from neurokern.methods.method import Method, check_device
from neurokern.methods.passes import Pass, PassContext

METHODS = {
    m.name: m
    for m in (task_arithmetic.METHOD, ties.METHOD, dare.DARE, dare.DARE_TIES, neuromerging.METHOD,
              magnitude_prune.METHOD, linear.METHOD, slerp.METHOD, nuslerp.METHOD, model_stock.METHOD,
              breadcrumbs.BREADCRUMBS, breadcrumbs.BREADCRUMBS_TIES, della.DELLA, della.DELLA_LINEAR,
              passthrough.METHOD)
}
BUILT_IN = tuple(METHODS)


def register(method: Method) -> None:
    """Adds a method: nk.merge, nk.merge_models and a merge config's merge_method take its name."""
    if method.name in METHODS:
        raise NeurokernError(f"a method named {method.name!r} is registered already")
    METHODS[method.name] = method


def registered() -> list[str]:
    """The names of the methods register added, in order."""
    return [name for name in METHODS if name not in BUILT_IN]


__all__ = ["METHODS", "Method", "Pass", "PassContext", "check_device", "register", "registered"]
