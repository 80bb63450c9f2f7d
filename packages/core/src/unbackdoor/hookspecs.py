"""Hook specifications of unbackdoor (pluggy, prefix ``unbackdoor_``).

A plugin is a module or object implementing some of these hooks, published
under the ``unbackdoor`` entry-point group::

    [project.entry-points.unbackdoor]
    my_attacks = "my_package.plugin"

Each registration hook returns a list of objects; the plugin manager flattens
them and rejects duplicate names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .attack import Attack, Paraphraser
    from .auditor import Auditor
    from .backend import BackendInfo
    from .defense import Defense
    from .lossdef import LossInfo

PROJECT = "unbackdoor"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def unbackdoor_backends() -> list[BackendInfo]:
    """Register training backends.

    Called once when the plugin manager loads. Return :class:`~unbackdoor.backend.BackendInfo`
    records; the framework behind each is imported only when it is selected.
    """


@hookspec
def unbackdoor_attacks() -> list[Attack]:
    """Register backdoor attacks.

    Called once when the plugin manager loads. Return :class:`~unbackdoor.attack.Attack`
    instances with their default options; the runner configures copies.
    """


@hookspec
def unbackdoor_defenses() -> list[Defense]:
    """Register defenses (removal or detection).

    Called once when the plugin manager loads. Return :class:`~unbackdoor.defense.Defense`
    instances with their default options; the runner configures copies.
    """


@hookspec
def unbackdoor_paraphrasers() -> list[Paraphraser]:
    """Register paraphrasers (style transfer or syntactic rewriting models).

    Called once when the plugin manager loads. Return :class:`~unbackdoor.attack.Paraphraser`
    instances; the ``syntactic`` and ``style`` attacks call one (option ``paraphraser=NAME``) to
    rewrite rows for which the data has no aligned paraphrase file. Import heavy models lazily,
    inside :meth:`~unbackdoor.attack.Paraphraser.paraphrase`, so listing plugins stays fast.
    """


@hookspec
def unbackdoor_losses() -> list[LossInfo]:
    """Register losses: a name and a spec class each.

    Called once when the plugin manager loads. Return :class:`~unbackdoor.lossdef.LossInfo` records; the
    spec class is a frozen dataclass whose ``terms`` method is the loss written once against an array-API
    namespace, which the NumPy reference and every backend evaluate (:mod:`unbackdoor.lossdef`). The
    core's built-in losses come from its own plugin, :mod:`unbackdoor.plugin`.
    """


@hookspec
def unbackdoor_auditors() -> list[Auditor]:
    """Register auditors: is a released classifier backdoored, and by what trigger?

    Called once when the plugin manager loads. Return :class:`~unbackdoor.auditor.Auditor` instances with
    their default options; ``unbackdoor audit`` configures a copy (``--auditor-option KEY=VALUE``) and calls
    its ``audit`` with an :class:`~unbackdoor.auditor.AuditContext`.
    """
