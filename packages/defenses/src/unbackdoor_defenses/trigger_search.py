"""``trigger-search``: a DBS-style trigger inversion auditor (Shen et al., ICML 2022, simplified).

For each candidate target class a relaxed trigger of ``trigger_length`` tokens (per slot a softmax over
the vocabulary of logits ``theta / T``, ``T`` annealed geometrically from ``temperature`` to
``temperature_end``) is inserted into clean rows of the other classes (``position``: before the row's last
token that is not a trailing special one, by default; appended, before any trailing special token such as
BERT's ``[SEP]``; or at a seeded position inside each row), and ``theta`` is trained with Adam so the model
predicts the target. The relaxed trigger is then projected to tokens: the argmax sequence, plus each of the
``top_tokens`` most likely tokens of every slot on its own (with ``spellings``, the default, also each of
those tokens' other spelling: the word-initial and the word-continuation piece of the same text, ``z`` and
``##z``). Candidates are ranked by their DISCRETE flip rate on held-out clean rows of the other classes
(minus the flip rate on a clean reference model, when one is given).
The backend supplies only logits and gradients (:class:`unbackdoor.backend.TriggerBackend`); the
optimiser is here, in NumPy, so every backend runs the same search.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unbackdoor.auditor import AuditContext, Auditor, AuditResult, TriggerCandidate
from unbackdoor.backend import TriggerCacheBackend
from unbackdoor.batching import cached_trigger_batch, pad_batch, trigger_batch
from unbackdoor.data import TextDataset
from unbackdoor.errors import ConfigError, check_range
from unbackdoor.text import TextEncoder

#: token spellings never tried as triggers: BERT-style ``[CLS]`` and chat/BPE specials such as ``<|im_end|>``
SPECIAL_TOKEN = re.compile(r"^(\[[A-Z]+\]|<\|[^>]*\|>|</?s>|<unk>|<pad>|<mask>)$")
#: where ``position`` may put the trigger
POSITIONS = ("before-last", "end", "random")
#: logit given to tokens that are never tried (softmax weight zero)
BANNED = -1e9


@dataclass(frozen=True)
class TriggerSearch(Auditor):
    """Invert a k-token trigger per target class; flag the model when a trigger flips held-out rows.

    Attributes:
        trigger_length: tokens in the relaxed trigger (k).
        steps: Adam steps per target class.
        lr: Adam learning rate on the trigger logits.
        temperature, temperature_end: the softmax temperature at the first and the last step (geometric).
        top_tokens: per slot, this many most likely tokens are also tried alone as one-token candidates.
        threshold: the verdict is ``backdoored`` when the best candidate's score (its flip rate, minus the
            reference's flip rate with ``--reference``) is above it.
        holdout: share of each class's clean rows kept for ranking candidates (the rest trains the trigger).
        batch_size: rows per step and per evaluation batch.
        max_length: tokens kept per row, the trigger included.
        min_rows: fewest clean rows of each class the audit accepts.
        spellings: also try each one-token candidate's other spelling in the vocabulary, the word-initial piece
            for a continuation piece and back (WordPiece ``z`` / ``##z``, byte-level BPE ``Ġz`` / ``z``,
            SentencePiece ``▁z`` / ``z``): a backdoor keyed on a rare word's continuation piece also answers,
            more weakly, to the word-initial piece the relaxed search tends to land on. On by default (the zoo:
            MiniLM-L6's top-5 recovery 4 / 6 BadNet models with, 2 / 6 without, nothing else changed on 30 models).
        position: where the trigger goes in each row: ``before-last`` (the default: before the row's last token
            that is not a trailing special one, its full stop on most rows), ``end`` (appended, before any trailing
            special token) or ``random`` (a seeded position per row between the leading and the trailing special
            tokens). On a decoder that pools its last token, an appended trigger IS the pooled token, so nearly
            any token can flip a row there; ``before-last`` leaves the row's own last token pooled at the cost of
            one more token per step, and ``random`` asks the trigger to act from anywhere in the row, as a planted
            one does (the suffix after it runs at every step: half the row on average). The zoo (with
            ``spellings``): ``before-last`` flags none of 3 clean SmolLM2-135M classifiers (``end``: 2 of 3) and
            recovers 5 of 6 MiniLM-L6 BadNet triggers in the top 5 (``end``: 4 of 6), at a word AUROC of 0.958
            on MiniLM (``end``: 0.986).
        cache: on a causal decoder, compute the states of each row's tokens before the trigger once and reuse
            them in every step and evaluation (:class:`unbackdoor.backend.TriggerCacheBackend`; the same
            logits and gradients up to float32 rounding, a fraction of the compute). Encoders always run whole.
    """

    name = "trigger-search"
    description = "DBS-style trigger inversion: a relaxed k-token trigger per target, ranked by discrete flip rate"
    backend_methods = ("trigger_logits",)
    trigger_length: int = 2
    steps: int = 60
    lr: float = 0.5
    temperature: float = 1.0
    temperature_end: float = 0.05
    top_tokens: int = 5
    threshold: float = 0.8
    holdout: float = 0.5
    batch_size: int = 32
    max_length: int = 64
    min_rows: int = 4
    spellings: bool = True
    position: str = "before-last"
    cache: bool = True

    def __post_init__(self) -> None:
        who = f"auditor {self.name!r}"
        for key in ("trigger_length", "steps", "top_tokens", "batch_size", "min_rows"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{who}: {key} must be >= 1, got {getattr(self, key)!r}")
        if self.max_length <= self.trigger_length:
            raise ConfigError(f"{who}: max_length must exceed trigger_length ({self.trigger_length}), "
                              f"got {self.max_length!r}")
        for key in ("lr", "temperature", "temperature_end"):
            check_range(f"{who}: {key}", getattr(self, key), 0.0, float("inf"), inclusive=False)
        check_range(f"{who}: threshold", self.threshold, -1.0, 1.0)
        check_range(f"{who}: holdout", self.holdout, 0.0, 1.0, inclusive=False)
        if self.position not in POSITIONS:
            raise ConfigError(f"{who}: position must be one of {', '.join(POSITIONS)}, got {self.position!r}")

    def min_rows_per_class(self) -> int:
        """``min_rows``, and at least 2 (one row to train the trigger, one to rank it)."""
        return max(self.min_rows, 2)

    def audit(self, ctx: AuditContext) -> AuditResult:
        """Search every target class; rank all candidates together."""
        start = time.perf_counter()
        search = _Search(self, ctx)
        reference = _Rows(ctx, ctx.reference_path, self) if ctx.reference_path is not None else None
        candidates, per_target = [], {}
        for target in range(ctx.num_labels):
            found = search.run(target, reference)
            per_target[str(target)] = {"best_score": found[0].score if found else None,
                                       # the verdict a search without a reference would give reads this
                                       "best_flip_rate": max((c.flip_rate for c in found), default=None),
                                       "candidates": len(found)}
            candidates += found
        candidates.sort(key=lambda c: (-c.score, -c.flip_rate, c.ids))
        best = candidates[0] if candidates else None
        score = best.score if best else 0.0
        return AuditResult("backdoored" if score > self.threshold else "clean", score, self.threshold,
                           best.target if best else None, tuple(candidates),
                           {"per_target": per_target, "seconds": round(time.perf_counter() - start, 3)})


class _Rows:
    """One model's view of the clean rows: token ids, where the trigger goes, clean predictions."""

    def __init__(self, ctx: AuditContext, path: Path, opts: TriggerSearch) -> None:
        self.backend, self.encoder = ctx.backend, TextEncoder.from_dir(path)
        #: token ids a trigger may use: those both the tokenizer and the embedding matrix know
        self.vocab = min(self.encoder.tokenizer.get_vocab_size(with_added_tokens=True),
                         int(json.loads((path / "config.json").read_text()).get("vocab_size", 1 << 62)))
        self.model = ctx.backend.load_classifier(path, ctx.num_labels, seed=ctx.seed)
        self.special = _special_ids(self.encoder)
        self.ids = self.encoder.encode(list(ctx.clean.texts), opts.max_length - opts.trigger_length)
        self.insert_at = _positions(self.ids, self.special, opts.position, ctx.seed)
        #: per row, the cached states of its tokens before the trigger (None: every call runs the whole row)
        self.prefix = _prefix_states(ctx.backend, self.model, [x[:i] for x, i in zip(self.ids, self.insert_at, strict=True)],
                                     self.encoder.pad_id) if opts.cache else None
        self.clean_pred = self.predict(np.arange(len(self.ids)), np.zeros((0, self.vocab), np.float32))

    def batch(self, rows: np.ndarray, length: int) -> dict[str, np.ndarray]:
        """The rows with ``length`` trigger slots at their ``insert_at``."""
        if self.prefix is not None and length:  # (no trigger: a row may have no token left to run)
            return cached_trigger_batch([self.prefix[i] for i in rows],
                                        [self.ids[i][self.insert_at[i]:] for i in rows], length, self.encoder.pad_id)
        return trigger_batch([self.ids[i] for i in rows], self.insert_at[rows], length, self.encoder.pad_id)

    def predict(self, rows: np.ndarray, weights: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Predicted classes of ``rows`` carrying the trigger ``weights`` ``[k, V]`` (k = 0: no trigger)."""
        out = []
        for part in np.array_split(rows, max(1, -(-len(rows) // batch_size))):
            logits = self.backend.trigger_logits(self.model, self.batch(part, weights.shape[0]), weights)[0]
            out.append(logits.argmax(-1))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def flip_rate(self, rows: np.ndarray, ids: tuple[int, ...], target: int) -> float:
        """Share of ``rows`` not predicted ``target`` cleanly that the trigger ``ids`` turns into ``target``."""
        rows = rows[self.clean_pred[rows] != target]
        if not len(rows):
            return 0.0
        return float((self.predict(rows, _one_hot(ids, self.vocab)) == target).mean())


class _Search:
    """The inversion on the audited model: clean rows split into a training and a held-out half per class."""

    def __init__(self, opts: TriggerSearch, ctx: AuditContext) -> None:
        self.opts, self.ctx = opts, ctx
        self.rows = _Rows(ctx, ctx.model_path, opts)
        self.train_rows, self.held_rows = _split(ctx.clean, opts.holdout, ctx.seed)
        #: a token's other spelling (``spellings``; empty without)
        self.spelling = _other_spellings(self.rows.encoder, self.rows.special, self.rows.vocab) \
            if opts.spellings else {}

    def run(self, target: int, reference: _Rows | None) -> list[TriggerCandidate]:
        """Optimise the relaxed trigger for ``target``, then rank its discrete projections."""
        labels = self.ctx.clean.labels
        train = self.train_rows[labels[self.train_rows] != target]
        held = self.held_rows[labels[self.held_rows] != target]
        if not len(train) or not len(held):
            return []
        theta = self._optimise(train, target)
        out = []
        for ids in _with_spellings(_projections(theta, self.opts.top_tokens), self.spelling):
            flip = self.rows.flip_rate(held, ids, target)
            ref = reference.flip_rate(held, ids, target) if reference is not None else None
            out.append(TriggerCandidate(self.rows.encoder.tokenizer.decode(list(ids)).strip(),
                                        tuple(self.rows.encoder.tokenizer.id_to_token(i) or "" for i in ids),
                                        ids, target, flip, ref, flip - (ref or 0.0)))
        out.sort(key=lambda c: (-c.score, -c.flip_rate, c.ids))
        self.ctx.log(f"trigger-search: target {target}: best {out[0].text!r} score {out[0].score:.3f}")
        return out

    def _optimise(self, rows: np.ndarray, target: int) -> np.ndarray:
        """Adam on the trigger logits ``theta`` ``[k, V]``; special tokens stay at zero weight."""
        opts, vocab = self.opts, self.rows.vocab
        rng = np.random.default_rng([self.ctx.seed, target])
        theta = rng.normal(0.0, 0.01, (opts.trigger_length, vocab))
        theta[:, sorted(i for i in self.rows.special if i < vocab)] = BANNED
        adam = _Adam(theta.shape, opts.lr)
        for step in range(opts.steps):
            temp = opts.temperature * (opts.temperature_end / opts.temperature) ** (step / max(opts.steps - 1, 1))
            part = rng.choice(rows, size=min(opts.batch_size, len(rows)), replace=False)
            probs = _softmax(theta / temp)
            _, _, grad = self.rows.backend.trigger_logits(self.rows.model, self.rows.batch(part, len(theta)),
                                                          probs.astype(np.float32), np.full(len(part), target))
            assert grad is not None
            theta = adam.step(theta, probs * (grad - (probs * grad).sum(-1, keepdims=True)) / temp)
        return theta


class _Adam:
    """Plain Adam (Kingma & Ba), as ``torch.optim.Adam`` with default betas."""

    def __init__(self, shape: tuple[int, ...], lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.m, self.v, self.t = np.zeros(shape), np.zeros(shape), 0
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps

    def step(self, params: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """``params`` after one update with ``grad``."""
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * grad
        self.v = self.b2 * self.v + (1 - self.b2) * grad**2
        m_hat, v_hat = self.m / (1 - self.b1**self.t), self.v / (1 - self.b2**self.t)
        return params - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _one_hot(ids: tuple[int, ...] | list[int], vocab: int) -> np.ndarray:
    out = np.zeros((len(ids), vocab), np.float32)
    out[np.arange(len(ids)), list(ids)] = 1.0
    return out


def _projections(theta: np.ndarray, top: int) -> list[tuple[int, ...]]:
    """The argmax sequence, then each slot's ``top`` most likely tokens alone (deduplicated, in that order)."""
    found = [tuple(int(i) for i in theta.argmax(-1))]
    for slot in theta:
        found += [(int(i),) for i in np.argsort(-slot, kind="stable")[:top]]
    return list(dict.fromkeys(found))


def _with_spellings(found: list[tuple[int, ...]], spelling: dict[int, int]) -> list[tuple[int, ...]]:
    """``found``, each one-token candidate followed by its other spelling (when it has one; deduplicated)."""
    out = []
    for ids in found:
        out.append(ids)
        if len(ids) == 1 and ids[0] in spelling:
            out.append((spelling[ids[0]],))
    return list(dict.fromkeys(out))


#: the marker a tokenizer family puts on one of a text's two pieces: WordPiece on the piece that continues a
#: word (``##z``), byte-level BPE and SentencePiece on the piece that starts one (``Ġz``, ``▁z``)
SPELLING_MARKERS = ("##", "Ġ", "▁")


def _other_spellings(encoder: TextEncoder, special: set[int], limit: int) -> dict[int, int]:
    """Token id -> the id of the same text's other piece (marked <-> unmarked), where the vocabulary holds
    both; the tokenizer's marker is the one most of its vocabulary carries (none: no spellings). Specials and
    ids at or past ``limit`` (the model's vocabulary) have none."""
    vocab = {t: i for t, i in encoder.tokenizer.get_vocab(with_added_tokens=False).items()
             if i < limit and i not in special}
    counts = {m: sum(t.startswith(m) for t in vocab) for m in SPELLING_MARKERS}
    marker = max(SPELLING_MARKERS, key=lambda m: counts[m])
    if counts[marker] * 20 < len(vocab):  # under 5% of the vocabulary marked: not this tokenizer's scheme
        return {}
    out = {}
    for text, i in vocab.items():
        other = text[len(marker):] if text.startswith(marker) else marker + text
        if other in vocab:
            out[i] = vocab[other]
    return out


def _split(data: TextDataset, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded ``1 - holdout`` / ``holdout`` split of the row indices (each part non-empty)."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for label in np.unique(data.labels):
        rows = rng.permutation(np.flatnonzero(data.labels == label))
        cut = min(max(1, round(len(rows) * (1 - holdout))), len(rows) - 1)
        train.append(rows[:cut])
        held.append(rows[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def _prefix_states(backend: object, model: object, prefixes: list[np.ndarray], pad_id: int,
                   batch_size: int = 32) -> list[dict[str, np.ndarray]] | None:
    """Each prefix's cached ``key``/``value`` ``[layers, P_b, kv_heads, head_dim]``, or None when the backend
    has no :class:`~unbackdoor.backend.TriggerCacheBackend` or the model cannot reuse states (an encoder)."""
    if not isinstance(backend, TriggerCacheBackend):
        return None
    out: list[dict[str, np.ndarray] | None] = [None] * len(prefixes)
    real = [i for i, x in enumerate(prefixes) if len(x)]
    for start in range(0, len(real), batch_size):
        part = real[start:start + batch_size]
        ids, mask = pad_batch([prefixes[i] for i in part], pad_id)
        states = backend.trigger_prefix(model, {"input_ids": ids, "attention_mask": mask})
        if states is None:
            return None
        for row, i in enumerate(part):
            out[i] = {k: np.ascontiguousarray(v[:, row, :len(prefixes[i])]) for k, v in states.items()}
    if not real:  # no row has a token before its trigger: nothing to reuse
        return None
    template = out[real[0]]
    assert template is not None
    empty = {k: v[:, :0] for k, v in template.items()}
    return [x if x is not None else empty for x in out]


def _special_ids(encoder: TextEncoder) -> set[int]:
    """The pad id, the tokenizer's special added tokens and vocabulary entries spelt like specials."""
    tok = encoder.tokenizer
    found = {encoder.pad_id}
    found |= {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    found |= {i for t, i in tok.get_vocab(with_added_tokens=True).items() if SPECIAL_TOKEN.match(t)}
    return found


def _positions(ids: list[np.ndarray], special: set[int], position: str, seed: int) -> np.ndarray:
    """Per row, where its trigger goes: ``end`` before any trailing special token, ``before-last`` one token
    earlier (never before the leading special tokens), ``random`` anywhere from after the leading special tokens
    to ``end`` (seeded by ``seed`` and the row's index alone, so the audited model and its reference, reading
    the same rows with the same tokenizer, put it in the same place)."""
    end = np.asarray([_insert_at(x, special) for x in ids], np.int64)
    if position == "end":
        return end
    start = np.asarray([_leading(x, special) for x in ids], np.int64)
    start = np.minimum(start, end)
    if position == "before-last":
        return np.maximum(start, end - 1)
    draw = np.random.default_rng([seed, 1]).random(len(ids))
    return start + np.floor(draw * (end - start + 1)).astype(np.int64)


def _leading(ids: np.ndarray, special: set[int]) -> int:
    """How many special tokens (BERT's ``[CLS]``, a BOS) open the row."""
    n = 0
    while n < len(ids) and int(ids[n]) in special:
        n += 1
    return n


def _insert_at(ids: np.ndarray, special: set[int]) -> int:
    """Where an appended trigger goes: after the last token that is not a trailing special token."""
    end = len(ids)
    while end > 0 and int(ids[end - 1]) in special:
        end -= 1
    return end
