"""The core's own plugin: the built-in losses, registered through ``unbackdoor_losses`` like a third party's.

Entry point ``core`` of the ``unbackdoor`` group (``UNBACKDOOR_DISABLE_PLUGINS=core`` hides them from
``unbackdoor list``; the specs themselves stay importable from :mod:`unbackdoor.specs`).
"""

from __future__ import annotations

from .hookspecs import hookimpl
from .lossdef import LossInfo
from .specs import AdaptiveGALoss, CrossEntropy, GALoss, LabelResetLoss, NPOLoss, W2SLoss

LOSSES = (
    LossInfo("cross-entropy", "cross-entropy on the labels", CrossEntropy),
    LossInfo("label-reset", "PSIM: cross-entropy on labels reset at random", LabelResetLoss),
    LossInfo("w2s", "W2SDefense: alpha*CE + beta*T^2*KD + gamma*feature alignment", W2SLoss),
    LossInfo("rga", "RGA: adaptive gradient ascent on poisoned rows + CE on clean rows + beta*||theta - theta_base||",
             AdaptiveGALoss),
    LossInfo("ga", "GA: gradient ascent on poisoned rows + clean_weight*CE on clean rows", GALoss),
    LossInfo("npo", "NPO: negative preference optimisation on poisoned rows + clean_weight*CE on clean rows", NPOLoss),
)


@hookimpl
def unbackdoor_losses() -> list[LossInfo]:
    """The built-in losses."""
    return list(LOSSES)
