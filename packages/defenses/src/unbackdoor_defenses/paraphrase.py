"""Paraphrase defenses: every input is rewritten by a paraphraser plugin before the model sees it.

* ``backtranslate``: round-trip translation (Qi et al., "Hidden Killer: Invisible Textual Backdoor
  Attacks with Syntactic Trigger", ACL 2021, Sec. 6, after Xie et al. 2020's back-translation
  augmentation): the rewrite drops rare inserted words and loosens a trigger's exact wording.
* ``scpd``: syntactic structure paraphrase defense (Qi et al. 2021, same paper): every input is
  paraphrased into one common syntactic template with SCPN, which erases a syntactic trigger.

No translation or paraphrase model ships here: a plugin implementing the ``unbackdoor_paraphrasers``
hook provides one (:class:`unbackdoor.attack.Paraphraser`) and option ``paraphraser=NAME`` picks it.
The model that answers the task is the user's LoRA fine-tune, as with ``none``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from unbackdoor.attack import Paraphraser
from unbackdoor.defense import Defense, DefenseContext, DefenseOutcome
from unbackdoor.errors import ConfigError
from unbackdoor.plugins import get_plugin_manager

from .common import tune_like_none

#: the SCPN template SCPD rewrites into (the most frequent one in the paper's data)
SCPD_TEMPLATE = "S(NP)(VP)(.)"
INSTALL_HINT = ("install one that implements the unbackdoor_paraphrasers hook (e.g. a plugin wrapping a "
                "translation model or SCPN as an unbackdoor.attack.Paraphraser)")


def find_paraphraser(defense: str, name: str) -> Paraphraser:
    """The registered paraphraser ``name``; clear errors when it is unset, unknown or none is installed."""
    found = get_plugin_manager().paraphrasers()
    if not found:
        raise ConfigError(f"defense {defense!r} needs a paraphraser, but no paraphraser plugin is installed; "
                          f"{INSTALL_HINT}, then pass {defense}.paraphraser=NAME")
    if name not in found:
        what = f"unknown paraphraser {name!r}" if name else "no paraphraser chosen"
        raise ConfigError(f"defense {defense!r}: {what}; set {defense}.paraphraser to one of: {', '.join(sorted(found))}")
    return found[name].obj


@dataclass
class ParaphraseTransform:
    """Rewrites inputs with a paraphraser in one style; an empty rewrite keeps the original text."""

    paraphraser: Paraphraser
    style: str

    def __call__(self, texts: Sequence[str]) -> list[str]:
        """The rewritten texts, in order."""
        out = self.paraphraser.paraphrase(list(texts), self.style)
        if not isinstance(out, list) or len(out) != len(texts):
            raise ConfigError(f"paraphraser {self.paraphraser.name!r} must return a list of {len(texts)} strings, "
                              f"got {type(out).__name__} of length {len(out)}")
        return [new.strip() or old for old, new in zip(texts, out, strict=True)]


@dataclass(frozen=True)
class ParaphraseDefense(Defense):
    """An input-rewriting defense over a paraphraser plugin (``paraphraser`` names it)."""

    kind = "detection"
    paraphraser: str = ""

    def __post_init__(self) -> None:
        if self.paraphraser:  # an unknown name fails at configuration time, before any training
            find_paraphraser(self.name, self.paraphraser)

    @abstractmethod
    def target_style(self) -> str:
        """What the paraphraser is asked to produce (a style name or a syntactic template)."""

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        rewrite = ParaphraseTransform(find_paraphraser(self.name, self.paraphraser), self.target_style())
        model, stats = tune_like_none(ctx, desc=f"{self.name}: user LoRA")
        return DefenseOutcome(model, stats, transform=rewrite)


@dataclass(frozen=True)
class BackTranslate(ParaphraseDefense):
    """Back-translation paraphrase defense.

    Attributes:
        paraphraser: the registered paraphraser doing the round trip.
        style: the style name it is asked for (its pivot language, if it takes one, is its own option).
    """

    name = "backtranslate"
    description = "back-translation: inputs are round-trip translated by a paraphraser plugin before the model"
    style: str = "back-translation"

    def target_style(self) -> str:
        return self.style


@dataclass(frozen=True)
class SCPD(ParaphraseDefense):
    """Syntactic structure paraphrase defense.

    Attributes:
        paraphraser: the registered syntactic paraphraser (SCPN-like).
        template: the syntactic template every input is rewritten into.
    """

    name = "scpd"
    description = "SCPD: inputs are paraphrased into one common syntactic template by a paraphraser plugin"
    template: str = SCPD_TEMPLATE

    def target_style(self) -> str:
        return self.template
