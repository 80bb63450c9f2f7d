"""The on-disk layout of a saved classifier, shared by every backend.

A classifier directory holds the backbone exactly as HF saves it
(``config.json`` + ``model.safetensors``), the tokenizer files, the head in
``head.safetensors`` (``classifier.weight``/``.bias`` and, for a W2S teacher,
``projection.weight``/``.bias``; linear weights ``[out, in]``) and
``unbackdoor.json`` describing the head.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import check_choice

HEAD_FILE = "head.safetensors"
META_FILE = "unbackdoor.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
# Model types pooled like BERT (pooled output or first token); every other type pools the last real token.
#: the activation applied after the projection g (the classifier and the W2S alignment read its output); the
#: released W2SDefense teacher uses ``relu``
PROJECTION_ACTIVATIONS = ("none", "relu", "tanh")
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "mpnet"})


@dataclass(frozen=True)
class HeadMeta:
    """What the head looks like.

    Attributes:
        num_labels: classes.
        projection_dim: width of the projection g before the classifier (None: no projection).
        decoder: pool the last non-pad token (True) or the encoder's pooled output (False).
        projection_activation: applied after g (:data:`PROJECTION_ACTIVATIONS`; ``none`` without g).
    """

    num_labels: int
    projection_dim: int | None
    decoder: bool
    projection_activation: str = "none"

    def __post_init__(self) -> None:
        check_choice("projection activation", self.projection_activation, PROJECTION_ACTIVATIONS)

    @classmethod
    def for_model(cls, path: Path, num_labels: int, projection_dim: int | None,
                  projection_activation: str = "none") -> HeadMeta:
        """The saved meta of a classifier directory, else a new head for a base model."""
        file = path / META_FILE
        if file.is_file():
            meta = cls(**json.loads(file.read_text()))
            if meta.num_labels != num_labels:
                raise ValueError(f"classifier at {path} has {meta.num_labels} labels, the task has {num_labels}")
            return meta
        model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
        return cls(num_labels, projection_dim, model_type not in ENCODER_TYPES, projection_activation)

    def write(self, path: Path) -> None:
        """Save as ``unbackdoor.json``."""
        (path / META_FILE).write_text(json.dumps(asdict(self), indent=2))


def copy_tokenizer(source: Path, target: Path) -> None:
    """Copy the tokenizer files a classifier directory carries."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
