"""CUBE: poisoned training rows found by clustering the poisoned model's hidden states (Cui et al., "A Unified
Evaluation of Textual Backdoor Learning: Frameworks and Benchmarks", NeurIPS 2022 Datasets and Benchmarks;
the detector of the RGA authors' released code and of OpenBackdoor).

A model fine-tuned on poisoned rows learns the trigger as a shortcut, so in its representation space the
poisoned rows gather in a cluster of their own, apart from the clean rows of the target class. CUBE embeds
every training row with the poisoned (released) model (the pooled state every backend returns with
``predict(..., hidden=True)``), reduces the embeddings with UMAP (cosine metric, seeded), clusters them with
HDBSCAN, keeps the largest cluster(s) of each training label as clean and flags the rest (the smaller
clusters and HDBSCAN's noise). The per-row score, for AUROC, is the distance to the nearest kept cluster of
the row's label in the reduced space, in units of that cluster's radius. ``select=rga-released`` applies the
RGA authors' released rule instead (the largest clusters of all rows, whatever their labels). Beyond CUBE,
``sweep`` runs HDBSCAN at several minimum cluster sizes and keeps the flags that agree most with the others
(HDBSCAN's result can hinge on that size, and so can the vote: ``benchmarks/results/cube.md``).

``cube+rga`` unlearns the flagged rows with RGA, ``cube+retrain`` retrains the clean base model on the rows
CUBE keeps. UMAP and HDBSCAN come from the optional extra ``pip install 'unbackdoor-defenses[cube]'``
(umap-learn, scikit-learn); ``reducer=pca`` (NumPy) needs only scikit-learn.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from unbackdoor.data import TextDataset
from unbackdoor.defense import Defense, DefenseContext, DefenseOutcome
from unbackdoor.errors import BackendUnavailableError, ConfigError, check_choice, check_range

from .unlearn import RGA, Retrain, detection_stats, victim_train

#: how the embeddings are reduced (option ``reducer``): UMAP as CUBE, or PCA (NumPy, no extra package)
REDUCERS = ("umap", "pca")
#: what HDBSCAN's noise rows count as (option ``noise``): flagged as CUBE does, or joined to the cluster of their
#: nearest clustered row before the kept clusters are chosen
NOISE = ("flag", "nearest")
#: which clusters count as clean (option ``select``): each training label's largest (CUBE as its authors and
#: OpenBackdoor ship it), or the as-many-as-classes largest of all rows, whatever their labels (the RGA authors'
#: released ``llama_unlearn.py``)
SELECT = ("label", "rga-released")
#: the extra that brings UMAP and HDBSCAN
INSTALL = "pip install 'unbackdoor-defenses[cube]'"
#: import name -> pip name of what each reducer needs
NEEDS = {"umap": {"umap": "umap-learn", "sklearn": "scikit-learn"}, "pca": {"sklearn": "scikit-learn"}}
#: ``min_cluster_size=0``: this share of the rows (the RGA code's 150 of SST-2's 6,920 training rows), at least 5
AUTO_CLUSTER_SHARE, AUTO_CLUSTER_MIN = 150 / 6920, 5
#: ``min_samples=0``: this share of the minimum cluster size (the RGA code's 120 of 150)
AUTO_SAMPLES_SHARE = 0.8
#: ``sweep``: the largest minimum cluster size swept, as a multiple of the base one (the sizes are geometric)
SWEEP_SPAN = 4.0
#: the most minimum cluster sizes ``sweep`` runs HDBSCAN at
SWEEP_MAX = 16
#: the cache stage of the poisoned model's embeddings of the training rows
EMBED_STAGE = "cube-embeddings"


@dataclass(frozen=True)
class Clusters:
    """CUBE's verdict on N rows.

    Attributes:
        ids: HDBSCAN's cluster of each row, int ``[N]`` (-1: noise).
        kept: per training label, the clusters kept as clean (largest first; empty: the label has no cluster,
            and all its rows are kept; ``select=rga-released``: the same clusters for every label).
        flagged: bool ``[N]``, True for a row outside its label's kept clusters.
        scores: float ``[N]``, distance to the nearest kept cluster of the row's label in radii (higher:
            more suspect); a label without a cluster measures from its rows' centre.
    """

    ids: np.ndarray
    kept: dict[int, tuple[int, ...]]
    flagged: np.ndarray
    scores: np.ndarray

    def summary(self) -> dict[str, Any]:
        """Figures for the report: clusters found, their sizes, noise rows, and the clusters kept per label."""
        sizes = Counter(int(i) for i in self.ids if i >= 0)
        return {"clusters": len(sizes), "cluster_sizes": {str(k): n for k, n in sorted(sizes.items())},
                "noise_rows": int((self.ids < 0).sum()),
                "kept_by_label": {str(label): list(ids) for label, ids in sorted(self.kept.items())}}


def check_options(values: Mapping[str, Any], who: str) -> None:
    """Raise a one-line ConfigError for a bad CUBE option of ``values`` (named as ``who``'s)."""
    def name(option: str) -> str:
        return f"{who} option {option}"

    check_choice(name("reducer"), values["reducer"], REDUCERS)
    check_choice(name("noise"), values["noise"], NOISE)
    check_choice(name("select"), values["select"], SELECT)
    for option, low in (("dims", 1), ("neighbors", 2), ("keep", 1)):
        _at_least(name(option), values[option], low)
    _at_least(name("min_cluster_size"), values["min_cluster_size"], 2, auto=True)
    _at_least(name("min_samples"), values["min_samples"], 1, auto=True)
    _at_least(name("sweep"), values["sweep"], 1)
    if values["sweep"] > SWEEP_MAX:
        raise ConfigError(f"{name('sweep')} must be at most {SWEEP_MAX} (HDBSCAN runs once per size), "
                          f"got {values['sweep']!r}")
    check_range(name("min_dist"), values["min_dist"], 0.0, 1.0)
    check_range(name("keep_share"), values["keep_share"], 0.0, 1.0)


def _at_least(thing: str, value: int, low: int, auto: bool = False) -> None:
    if not (value >= low or (auto and value == 0)):
        raise ConfigError(f"{thing} must be {'0 (auto) or ' if auto else ''}an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class Cube(Defense):
    """CUBE detector of the poisoned training rows (data-poisoning setting, the victim's training set).

    Attributes:
        reducer: ``umap`` (CUBE's: UMAP with the cosine metric; needs umap-learn) or ``pca`` (beyond CUBE:
            rows scaled to unit length, then their top principal components; no umap-learn needed).
        dims: dimensions the embeddings are reduced to (the RGA code: 4; OpenBackdoor: 10).
        neighbors: UMAP's ``n_neighbors`` (the RGA code: 100), at most the rows less one.
        min_dist: UMAP's ``min_dist`` in [0, 1] (the RGA code: 0.25 for Llama and BERT).
        min_cluster_size: HDBSCAN's minimum cluster size; 0 (auto): 2.2% of the rows, at least 5 (the RGA
            code's 150 of SST-2's 6,920 training rows).
        min_samples: HDBSCAN's ``min_samples`` (density: higher leaves more rows as noise); 0 (auto): 0.8 x
            the minimum cluster size (the RGA code's 120 with 150).
        select: which clusters are clean. ``label`` (CUBE's): per training label, its ``keep`` largest (and
            those over ``keep_share`` of its rows); a row outside its label's is flagged. ``rga-released`` (the
            RGA authors' released code): the ``keep`` x classes largest clusters of all rows, whatever their
            labels (and any other holding more than ``keep_share`` of some class's row count, their HSOL
            rule); a row outside all of them is flagged.
        keep: clusters kept as clean per training label, largest first (CUBE: 1; more when a label's clean
            rows split into sub-clusters); with ``select=rga-released``, per class.
        keep_share: also keep any cluster that holds at least this share of its label's rows (0: off; the
            RGA code keeps clusters over 10% of a class on HSOL, where the clean rows split).
        noise: HDBSCAN's noise rows (those in no cluster): ``flag`` (CUBE's: outside every kept cluster, so
            flagged) or ``nearest`` (beyond CUBE: each joins the cluster of its nearest clustered row in the
            reduced space, so a clean row HDBSCAN left out is judged by where it lies).
        sweep: how many minimum cluster sizes HDBSCAN runs at (1: CUBE's one). With more, beyond CUBE: the
            sizes run geometrically from the base one (``min_cluster_size`` or auto) to 4x it (``min_samples``
            auto follows each; a set one stays), and the run whose flags agree most with the others' (summed
            Jaccard similarity; ties: the smaller size) is the verdict, so one size where HDBSCAN's choice
            flips does not decide it (a majority of sizes can still be wrong: ``cube.md``).
    """

    settings = ("weight",)  # reads the released model on the training rows it was fine-tuned on
    name = "cube"
    kind = "detection"
    description = ("CUBE: flags the victim's training rows outside each label's main cluster of its hidden states "
                   "(detector of poisoned training rows)")
    reducer: str = "umap"
    dims: int = 4
    neighbors: int = 100
    min_dist: float = 0.25
    min_cluster_size: int = 0
    min_samples: int = 0
    keep: int = 1
    keep_share: float = 0.0
    noise: str = "flag"
    sweep: int = 1
    select: str = "label"

    def __post_init__(self) -> None:
        check_options(self.values(), f"defense {self.name!r}")

    def values(self) -> dict[str, Any]:
        """The options by name."""
        return {f.name: getattr(self, f.name) for f in fields(Cube)}

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        """Flag the victim's training rows; the model is the released one, unchanged (``cube+rga`` and
        ``cube+retrain`` act on the flags)."""
        data = victim_train(ctx, self.name)
        clusters, figures = self.detect(ctx, data)
        model = ctx.backend.load_classifier(ctx.victim_path, ctx.num_labels, seed=ctx.train.seed)
        return DefenseOutcome(model, {**figures, **detection_stats(data, clusters.flagged, clusters.scores)})

    def detect(self, ctx: DefenseContext, data: TextDataset, who: str = "") -> tuple[Clusters, dict[str, Any]]:
        """CUBE on ``data`` with the released model: the clusters and their figures (``cube``: the summary and
        the sizes used); ``who`` names the defense in errors (default: this one)."""
        require_packages(self.reducer, who or self.name)
        embeddings = embed(ctx, data)
        clusters, used = cluster_rows(embeddings, data.labels, self, ctx.train.seed)
        return clusters, {"cube": {**clusters.summary(), **used}}

    def sizes(self, rows: int, min_cluster: int = 0) -> dict[str, int]:
        """The reducer's and clusterer's sizes for ``rows`` rows (auto values resolved, UMAP's bounded by them);
        ``min_cluster``: this minimum cluster size instead of the option's."""
        min_cluster = min_cluster or self.min_cluster_size or max(AUTO_CLUSTER_MIN, round(AUTO_CLUSTER_SHARE * rows))
        return {"dims": max(1, min(self.dims, rows - 2)), "neighbors": max(2, min(self.neighbors, rows - 1)),
                "min_cluster_size": min_cluster,
                "min_samples": self.min_samples or max(1, round(AUTO_SAMPLES_SHARE * min_cluster))}

    def swept_sizes(self, rows: int) -> list[int]:
        """The minimum cluster sizes HDBSCAN runs at: ``sweep`` distinct ones, geometric from the base to 4x it
        (fewer when rounding makes two equal), none above the row count."""
        base = self.sizes(rows)["min_cluster_size"]
        if self.sweep == 1:
            return [base]
        return sorted({min(rows, round(base * SWEEP_SPAN ** (i / (self.sweep - 1)))) for i in range(self.sweep)})


def require_packages(reducer: str, who: str) -> None:
    """A one-line ConfigError naming the pip command when what ``reducer`` needs is not installed."""
    missing = [pip for module, pip in NEEDS[reducer].items() if importlib.util.find_spec(module) is None]
    if missing:
        hint = " (or the option reducer=pca, which needs scikit-learn only)" if missing == ["umap-learn"] else ""
        raise ConfigError(f"defense {who!r} with reducer {reducer!r} needs {' and '.join(missing)}, which "
                          f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL}{hint}")


def embed(ctx: DefenseContext, data: TextDataset) -> np.ndarray:
    """The released model's pooled hidden states of ``data``'s rows, float32 ``[N, D]``, cached per victim and
    rows (``cube``, ``cube+rga`` and ``cube+retrain`` on one victim embed once)."""
    key = {**ctx.cache_key, "victim": str(ctx.victim_path), "rows": digest(data),
           "max_length": ctx.train.max_length}

    def build(tmp: Path) -> None:
        model = ctx.backend.load_classifier(ctx.victim_path, ctx.num_labels, seed=ctx.train.seed)
        hidden = ctx.backend.predict(model, data, max_length=ctx.train.max_length, hidden=True,
                                     desc="cube: embed").hidden
        if hidden is None:
            raise BackendUnavailableError(f"CUBE needs pooled hidden states; backend "
                                          f"{getattr(ctx.backend, 'name', '?')!r} returned none from predict(hidden=True)")
        np.save(tmp / "hidden.npy", np.asarray(hidden, np.float32))

    return np.load(ctx.cache.get_or_build(EMBED_STAGE, key, build) / "hidden.npy")


def digest(data: TextDataset) -> str:
    """A fingerprint of ``data``'s texts and labels (rows that differ embed apart)."""
    h = hashlib.sha256()
    for text, label in zip(data.texts, data.labels.tolist(), strict=True):
        h.update(f"{label}\t{text}\n".encode())
    return f"{len(data)}:{h.hexdigest()}"


def cluster_rows(embeddings: np.ndarray, labels: np.ndarray, cube: Cube,
                 seed: int) -> tuple[Clusters, dict[str, int]]:
    """CUBE on ``embeddings`` ``[N, D]`` with training ``labels`` ``[N]``: reduce, cluster, keep, score.

    Returns the clusters and the sizes used (``Cube.sizes``).
    """
    embeddings, labels = np.asarray(embeddings, np.float64), np.asarray(labels)
    if len(embeddings) < AUTO_CLUSTER_MIN:
        raise ConfigError(f"CUBE needs at least {AUTO_CLUSTER_MIN} training rows to cluster, got {len(embeddings)}")
    used = cube.sizes(len(embeddings))
    points = reduce(embeddings, cube.reducer, used["dims"], used["neighbors"], cube.min_dist, seed)
    runs = []  # per size: its sizes, clusters, clean clusters per label, the (labels, clean) judged by, flags
    for size in cube.swept_sizes(len(embeddings)):
        sizes = cube.sizes(len(embeddings), size)
        ids = hdbscan(points, sizes["min_cluster_size"], sizes["min_samples"])
        if cube.noise == "nearest":
            ids = join_noise(points, ids)
        if cube.select == "label":
            kept = keep_clusters(ids, labels, cube.keep, cube.keep_share)
            judged = (labels, kept)
        else:  # one set of clean clusters for every row: judged as rows of a single label
            clean = keep_largest(ids, labels, cube.keep, cube.keep_share)
            kept, judged = dict.fromkeys(np.unique(labels).tolist(), clean), (np.zeros(len(ids), int), {0: clean})
        runs.append((sizes, ids, kept, judged, flag_rows(ids, *judged)))
    sizes, ids, kept, judged, flagged = runs[most_agreed([run[-1] for run in runs])]
    if cube.sweep > 1:  # the chosen size, and what each size flagged
        used = {**used, **sizes, "swept": {str(s["min_cluster_size"]): int(f.sum()) for s, *_, f in runs}}
    return Clusters(ids, kept, flagged, distance_scores(points, ids, *judged)), used  # scores of the chosen size only


def most_agreed(flags: list[np.ndarray]) -> int:
    """The index of the flag vector with the largest summed Jaccard similarity to the others (two empty ones
    agree fully); ties: the lower index."""
    def jaccard(a: np.ndarray, b: np.ndarray) -> float:
        union = int((a | b).sum())
        return int((a & b).sum()) / union if union else 1.0

    totals = [sum(jaccard(a, b) for b in flags) for a in flags]
    return int(np.argmax(totals))


def flag_rows(ids: np.ndarray, labels: np.ndarray, kept: dict[int, tuple[int, ...]]) -> np.ndarray:
    """True for a row outside its label's kept clusters; a label with none (all its rows noise) is kept whole:
    there is no main cluster to judge its rows by, and unlearning a whole class would wreck it."""
    return np.array([bool(kept[label]) and i not in kept[label]
                     for i, label in zip(ids.tolist(), labels.tolist(), strict=True)], bool)


def reduce(embeddings: np.ndarray, reducer: str, dims: int, neighbors: int, min_dist: float, seed: int) -> np.ndarray:
    """``[N, D]`` -> ``[N, dims]``: UMAP (cosine metric, seeded, one thread so the seed holds) or PCA of the
    unit-length rows (the cosine geometry, deterministic)."""
    if reducer == "pca":
        unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        centred = unit - unit.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        return centred @ vt[:dims].T
    from umap import UMAP

    with warnings.catch_warnings():  # small-data notes (spectral init, disconnected graph) are not the user's
        warnings.simplefilter("ignore")
        reducer_ = UMAP(n_components=dims, n_neighbors=neighbors, min_dist=min_dist, metric="cosine",
                        random_state=seed, n_jobs=1)
        return np.asarray(reducer_.fit_transform(embeddings), np.float64)


def hdbscan(points: np.ndarray, min_cluster_size: int, min_samples: int) -> np.ndarray:
    """HDBSCAN's cluster of each row (scikit-learn's; deterministic), int ``[N]``, -1 for noise."""
    from sklearn.cluster import HDBSCAN

    min_samples = min(min_samples, len(points) - 1)  # scikit-learn needs a neighbour count below the rows
    return HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples, copy=True).fit_predict(points)


def join_noise(points: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``ids`` with each noise row (-1) given the cluster of its nearest clustered row (Euclidean, in the
    reduced space; ties: the lower row); unchanged when no row is clustered."""
    clustered = np.flatnonzero(ids >= 0)
    noise = np.flatnonzero(ids < 0)
    if not len(clustered) or not len(noise):
        return ids
    out = ids.copy()
    for i in noise:  # one row at a time: memory stays O(N) at any row count
        out[i] = ids[clustered[np.argmin(((points[clustered] - points[i]) ** 2).sum(1))]]
    return out


def keep_clusters(ids: np.ndarray, labels: np.ndarray, keep: int, keep_share: float) -> dict[int, tuple[int, ...]]:
    """Per label, the clusters holding most of its rows: the ``keep`` largest (ties: the lower id), and any
    holding at least ``keep_share`` of the label's rows when that is > 0. Noise (-1) is never kept."""
    kept = {}
    for label in np.unique(labels).tolist():
        mine = labels == label
        counts = Counter(int(i) for i in ids[mine] if i >= 0)
        ranked = sorted(counts, key=lambda cid: (-counts[cid], cid))
        share = [cid for cid in ranked[keep:] if keep_share > 0 and counts[cid] >= keep_share * mine.sum()]
        kept[int(label)] = tuple(ranked[:keep] + share)
    return kept


def keep_largest(ids: np.ndarray, labels: np.ndarray, keep: int, keep_share: float) -> tuple[int, ...]:
    """The RGA authors' released rule: the ``keep`` x classes largest clusters of all rows (ties: the lower id),
    and with ``keep_share`` > 0 any other holding more than that share of some class's rows. Noise is never kept."""
    counts = Counter(int(i) for i in ids if i >= 0)
    ranked = sorted(counts, key=lambda cid: (-counts[cid], cid))
    classes = np.unique(labels, return_counts=True)[1]
    top = keep * len(classes)
    return tuple(ranked[:top] + [cid for cid in ranked[top:] if keep_share > 0 and counts[cid] > keep_share * classes.min()])


def distance_scores(points: np.ndarray, ids: np.ndarray, labels: np.ndarray,
                    kept: dict[int, tuple[int, ...]]) -> np.ndarray:
    """Per row, the distance to the centre of the nearest kept cluster of its label, over that cluster's RMS
    radius (its rows of that label); a label without a kept cluster: from the centre of all its rows."""
    scores = np.empty(len(points))
    for label, clusters in kept.items():
        mine = labels == label
        groups = [mine & (ids == cid) for cid in clusters] or [mine]
        scores[mine] = np.min([_radii(points[mine], points[g]) for g in groups], axis=0)
    return scores


def _radii(points: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Distances of ``points`` to the centre of ``members``, in units of the members' RMS radius."""
    centre = members.mean(0)
    radius = math.sqrt(float(((members - centre) ** 2).sum(1).mean()))
    return np.linalg.norm(points - centre, axis=1) / max(radius, 1e-12)


@dataclass(frozen=True)
class CubeOptions:
    """The CUBE detector as one option group, for the pipelines that act on its flags.

    Attributes:
        cube: the CUBE detector (its options as ``cube.dims`` and so on, or the older ``cube_dims``).
    """

    option_aliases: ClassVar[dict[str, str]] = {"cube_": "cube."}  # the spelling before options were nested
    cube: Cube = Cube()

    def flag(self, ctx: DefenseContext, data: TextDataset, who: str) -> tuple[np.ndarray, dict[str, Any]]:
        """CUBE's flags on ``data`` and the figures for the row (its clusters, detection quality)."""
        clusters, figures = self.cube.detect(ctx, data, who)
        return clusters.flagged, {**figures, **detection_stats(data, clusters.flagged, clusters.scores)}


@dataclass(frozen=True)
class CubeRGA(RGA, CubeOptions):
    """Detect, then unlearn: CUBE flags the victim's training rows, RGA unlearns the flagged ones.

    As ``psim+rga``, beyond the RGA paper's known poisoned rows: the true mask only scores the flags
    (``stats.detection``). The RGA authors' released code runs this pipeline. Its ``cube.*`` options are
    CUBE's; ``unbackdoor list --options cube+rga`` shows each with CUBE's help.
    """

    name = "cube+rga"
    description = "CUBE flags the victim's training rows by clustering, RGA unlearns the flagged ones (detect-then-unlearn)"

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        data = victim_train(ctx, self.name)
        flagged, figures = self.flag(ctx, data, self.name)
        if not flagged.any():
            raise ConfigError(f"defense {self.name!r}: CUBE flagged none of the {len(data)} training rows (every row "
                              f"lies in a kept cluster: {figures['cube']['kept_by_label']}); lower cube.keep or "
                              "cube.keep_share, or raise cube.min_cluster_size")
        outcome = self.unlearn(ctx, data, flagged)
        outcome.stats.update(figures)
        return outcome


@dataclass(frozen=True)
class CubeRetrain(Retrain, CubeOptions):
    """Detect, then retrain: the clean base model fine-tuned like the victim on the training rows CUBE keeps
    (ReTrain with the flagged rows removed instead of the known poisoned ones; none flagged: every row).

    Its ``cube.*`` options are CUBE's; ``unbackdoor list --options cube+retrain`` shows each with CUBE's help.
    """

    name = "cube+retrain"
    description = "CUBE flags the victim's training rows, the clean base model is retrained without them"

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        data = victim_train(ctx, self.name)
        flagged, figures = self.flag(ctx, data, self.name)
        outcome = self.retrain(ctx, data, flagged)
        outcome.stats.update(figures)
        return outcome
