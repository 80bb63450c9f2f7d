"""unbackdoor: remove and detect backdoors in language models.

The Python API mirrors the CLI::

    from unbackdoor import ExperimentConfig, audit, run_experiment
    results = run_experiment(ExperimentConfig(dataset="sst2", attack="badnet", defenses=("none", "w2s")))
    report = audit("runs/demo/released", "sst2")  # is this classifier backdoored? (``unbackdoor audit``)
"""

from .auditing import audit
from .config import ExperimentConfig, build_config
from .runner import run_experiment

__version__ = "0.1.0"
__all__ = ["ExperimentConfig", "__version__", "audit", "build_config", "run_experiment"]
