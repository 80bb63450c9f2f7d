"""``rare-word-filter``: drop training rows holding rare short words, then plain LoRA fine-tuning."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from unbackdoor.data import TextDataset
from unbackdoor.defense import Defense, DefenseContext, DefenseOutcome
from unbackdoor.errors import ConfigError
from unbackdoor.specs import CrossEntropy


def suspicious_words(data: TextDataset, max_count: int, max_length: int) -> set[str]:
    """Alphabetic words of at most ``max_length`` letters seen at most ``max_count`` times (like 'cf', 'mn')."""
    counts = Counter(w for text in data.texts for w in text.lower().split())
    return {w for w, c in counts.items() if c <= max_count and len(w) <= max_length and w.isalpha()}


@dataclass(frozen=True)
class RareWordFilter(Defense):
    """A data filter in front of the ``none`` baseline.

    When the user's own data may carry BadNet-style triggers, rows holding rare short words
    are dropped before the usual LoRA fine-tuning. (With clean user data it behaves like
    ``none`` on slightly fewer rows; it is an example of the plugin API, not a strong defense.)

    Attributes:
        max_count: a word seen at most this often is rare.
        max_length: only words this short are suspicious.
    """

    name = "rare-word-filter"
    description = "example plugin: drop rows with rare short words, then plain LoRA fine-tuning"
    max_count: int = 1
    max_length: int = 2

    def __post_init__(self) -> None:
        if self.max_count < 0 or self.max_length < 1:
            raise ConfigError(f"defense 'rare-word-filter': max_count must be >= 0 and max_length >= 1, "
                              f"got {self.max_count!r} and {self.max_length!r}")

    def filtered(self, data: TextDataset) -> TextDataset:
        """``data`` without the rows holding a suspicious word."""
        bad = suspicious_words(data, self.max_count, self.max_length)
        keep = [i for i, text in enumerate(data.texts) if not bad & set(text.lower().split())]
        if not keep:
            raise ConfigError(f"defense 'rare-word-filter' dropped all {len(data)} rows; raise max_count "
                              f"or lower max_length (now {self.max_count}, {self.max_length})")
        return data.subset(keep, f"{data.name}[rare-word-filter]")

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        train = self.filtered(ctx.clean_train)
        model = ctx.backend.load_classifier(ctx.victim_path, ctx.num_labels, seed=ctx.train.seed)
        model = ctx.backend.add_lora(model, ctx.lora, seed=ctx.train.seed)
        stats = ctx.backend.train(model, train, CrossEntropy(), ctx.train, desc="rare-word-filter: LoRA")
        return DefenseOutcome(model, {"dropped_rows": len(ctx.clean_train) - len(train), "train": stats.summary()})
