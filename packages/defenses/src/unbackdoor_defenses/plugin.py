"""Entry point of the built-in defenses and auditors (registered exactly like a third-party plugin)."""

from __future__ import annotations

from unbackdoor.auditor import Auditor
from unbackdoor.defense import Defense
from unbackdoor.hookspecs import hookimpl

from .cube import Cube, CubeRetrain, CubeRGA
from .finetune import NoDefense
from .merge import Merge
from .onion import Onion
from .paraphrase import SCPD, BackTranslate
from .prune import FinePrune
from .psim import PSIM
from .quantize import Quantize
from .strip import Strip
from .trigger_search import TriggerSearch
from .tuning import FullFineTune
from .unlearn import GA, NPO, RGA, PsimRGA, Retrain
from .w2s import W2SDefense


@hookimpl
def unbackdoor_defenses() -> list[Defense]:
    """``none``, ``w2s``, ``psim``, the baselines (``onion``, ``strip``, ``finetune``, ``prune``, ``quantize``,
    ``merge``, ``backtranslate``, ``scpd``), unlearning (``rga``, ``ga``, ``npo``, ``retrain``, ``psim+rga``) and
    CUBE (``cube``, ``cube+rga``, ``cube+retrain``)."""
    return [NoDefense(), W2SDefense(), PSIM(), Onion(), Strip(), FullFineTune(), FinePrune(), Quantize(), Merge(),
            BackTranslate(), SCPD(), RGA(), GA(), NPO(), Retrain(), PsimRGA(), Cube(), CubeRGA(), CubeRetrain()]


@hookimpl
def unbackdoor_auditors() -> list[Auditor]:
    """``trigger-search``: DBS-style trigger inversion."""
    return [TriggerSearch()]
