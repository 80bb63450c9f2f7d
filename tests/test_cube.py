"""CUBE (``cube``, ``cube+rga``, ``cube+retrain``): a planted cluster of embeddings is flagged, the clusters kept
per label, the per-row scores, one-line option errors, a missing package named with its pip command, and the
pipelines end to end on the backend under test (``--backend``)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from unbackdoor import ExperimentConfig, cli, run_experiment
from unbackdoor.errors import ConfigError, UnknownNameError
from unbackdoor.metrics import auroc, detection_scores
from unbackdoor.plugins import get_plugin_manager
from unbackdoor.specs import LoRASpec, TrainSpec
from unbackdoor_defenses import cube as cube_module
from unbackdoor_defenses.cube import (
    Clusters,
    Cube,
    cluster_rows,
    distance_scores,
    flag_rows,
    join_noise,
    keep_clusters,
    keep_largest,
)

CUBE = ("cube", "cube+rga", "cube+retrain")


def planted(seed: int = 0, width: int = 48, rows: tuple[int, int, int] = (90, 70, 20)) -> tuple[np.ndarray, ...]:
    """Embeddings of two classes' clean rows and of poisoned rows labelled 1 that sit in a cluster of their own
    (the trigger's shortcut), 20 of 180 rows; returns embeddings, labels, the poisoned mask."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, width)) * 3
    x = np.concatenate([c + rng.normal(size=(n, width)) for c, n in zip(centres, rows, strict=True)])
    labels = np.repeat([0, 1, 1], rows)
    return x.astype(np.float32), labels, np.repeat([False, False, True], rows)


# ------------------------------------------------------------------------------------------ the detector on embeddings
@pytest.mark.parametrize("reducer", ["umap", "pca"])
def test_a_planted_cluster_is_flagged(reducer: str) -> None:
    x, labels, poisoned = planted()
    clusters, used = cluster_rows(x, labels, Cube(reducer=reducer, neighbors=15), seed=0)
    quality = detection_scores(clusters.flagged, poisoned)
    assert quality["precision"] >= 0.9 and quality["recall"] >= 0.9, clusters.summary()
    assert auroc(clusters.scores, poisoned) >= 0.95
    assert used == {"dims": 4, "neighbors": 15, "min_cluster_size": 5, "min_samples": 4}  # auto sizes for 180 rows
    summary = clusters.summary()
    assert summary["clusters"] >= 3 and set(summary["kept_by_label"]) == {"0", "1"}
    again, _ = cluster_rows(x, labels, Cube(reducer=reducer, neighbors=15), seed=0)
    assert np.array_equal(again.ids, clusters.ids) and np.allclose(again.scores, clusters.scores)  # seeded


def test_clean_rows_of_a_label_in_one_cluster_are_not_flagged() -> None:
    """No poisoned rows: each label's rows form one cluster, kept whole (PCA: deterministic, no umap)."""
    x, labels, _ = planted(rows=(90, 70, 0))
    clusters, _ = cluster_rows(x, labels, Cube(reducer="pca"), seed=0)
    assert not clusters.flagged.any() and clusters.summary()["noise_rows"] == 0


def test_kept_clusters_per_label() -> None:
    ids = np.array([0, 0, 0, 1, -1, 2, 2, 2, 3, 3, 3, 4, -1, -1])
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2])
    kept = keep_clusters(ids, labels, keep=1, keep_share=0.0)
    assert kept == {0: (0,), 1: (2,), 2: ()}  # a 3-3 tie goes to the lower id; noise is never kept
    flagged = flag_rows(ids, labels, kept)
    assert flagged.tolist() == [False] * 3 + [True, True] + [False] * 3 + [True] * 4 + [False, False]
    assert keep_clusters(ids, labels, keep=2, keep_share=0.0)[1] == (2, 3)
    assert keep_clusters(ids, labels, keep=1, keep_share=0.4)[1] == (2, 3)  # 3 of 7 rows >= 40%
    assert keep_clusters(ids, labels, keep=1, keep_share=0.5)[1] == (2,)


def test_the_rga_released_rule_keeps_the_largest_clusters_of_all_rows() -> None:
    """``select=rga-released``: the as-many-as-classes largest clusters of all rows are clean whatever their
    labels, so a label's rows in another label's main cluster are kept (CUBE's rule flags them), and the HSOL
    rule (``keep_share``) keeps any cluster over that share of the smallest class."""
    ids = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, -1])
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1])  # 3 rows of label 0, 8 of label 1
    assert keep_largest(ids, labels, keep=1, keep_share=0.0) == (0, 1)
    assert keep_largest(ids, labels, keep=2, keep_share=0.0) == (0, 1, 2)
    assert keep_largest(ids, labels, keep=1, keep_share=0.6) == (0, 1, 2)  # 2 rows > 60% of label 0's 3
    assert keep_largest(ids, labels, keep=1, keep_share=0.7) == (0, 1)  # 2 is not > 2.1
    assert keep_largest(np.full(3, -1), np.array([0, 1, 1]), keep=1, keep_share=0.0) == ()
    assert keep_clusters(ids, labels, keep=1, keep_share=0.0) == {0: (0,), 1: (1,)}  # CUBE: label 1's own

    x, labels, poisoned = planted()
    clusters, _ = cluster_rows(x, labels, Cube(reducer="pca", select="rga-released"), seed=0)
    # three clusters, two classes: the two largest (the clean ones) are kept, the planted one flagged
    assert np.array_equal(clusters.flagged, poisoned), clusters.summary()
    assert clusters.summary()["kept_by_label"]["0"] == clusters.summary()["kept_by_label"]["1"]
    assert auroc(clusters.scores, poisoned) >= 0.95
    with pytest.raises(ConfigError, match=r"unknown defense 'cube' option select 'any'; choose one of: label, "
                                          r"rga-released"):
        get_plugin_manager().defense("cube").configure(select="any")


def test_noise_rows_join_their_nearest_cluster_with_noise_nearest() -> None:
    """``noise=nearest``: a noise row takes the cluster of its nearest clustered row, so a clean row HDBSCAN
    left out near its label's main cluster is kept, and one near the poisoned cluster is flagged."""
    points = np.array([[0.0, 0], [0, 1], [1, 0], [1, 1], [0.2, 0.4], [10, 10], [10, 11], [9.5, 10.2], [50, 50]])
    ids = np.array([0, 0, 0, 0, -1, 1, 1, -1, -1])
    joined = join_noise(points, ids)
    assert joined.tolist() == [0] * 5 + [1] * 4
    assert join_noise(points[:3], np.full(3, -1)).tolist() == [-1, -1, -1]  # nothing clustered: nothing to join
    labels = np.zeros(9, int)
    cube = [False] * 4 + [True] * 5  # CUBE: the clean noise row near cluster 0 is flagged too
    assert flag_rows(ids, labels, keep_clusters(ids, labels, 1, 0.0)).tolist() == cube
    assert flag_rows(joined, labels, keep_clusters(joined, labels, 1, 0.0)).tolist() == [False] * 5 + [True] * 4
    with pytest.raises(ConfigError, match=r"unknown defense 'cube' option noise 'drop'; choose one of: flag, nearest"):
        get_plugin_manager().defense("cube").configure(noise="drop")


def test_scores_are_distances_to_the_kept_clusters_in_radii() -> None:
    points = np.array([[0.0, 1], [0, -1], [10, 0], [5, 5], [5, 7]])
    ids, labels = np.array([0, 0, 1, 2, 2]), np.array([0, 0, 0, 1, 1])
    scores = distance_scores(points, ids, labels, {0: (0,), 1: ()})
    assert scores.tolist() == pytest.approx([1.0, 1.0, 10.0, 1.0, 1.0])  # radius 1 around (0, 0) and (5, 6)


def test_sweep_keeps_the_flags_most_sizes_agree_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """``sweep``: HDBSCAN at geometric sizes from the base to 4x it; a size whose clustering flips (here the
    smallest, which merges the planted cluster into the big one) is outvoted by the others."""
    x, labels, poisoned = planted()
    cube = Cube(reducer="pca", sweep=5)
    assert cube.swept_sizes(180) == [5, 7, 10, 14, 20] and Cube(sweep=3, min_cluster_size=40).swept_sizes(800) == [
        40, 80, 160]
    assert Cube(sweep=5).swept_sizes(6) == [5, 6] and Cube().swept_sizes(800) == [17]  # bounded; CUBE's one size
    truth = np.where(poisoned, 1, np.where(labels == 0, 0, 2))

    def fake(points: np.ndarray, min_cluster_size: int, min_samples: int) -> np.ndarray:
        calls.append((min_cluster_size, min_samples))
        return np.where(truth == 1, 2, truth) if min_cluster_size == 5 else truth  # size 5: no poisoned cluster

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(cube_module, "hdbscan", fake)
    clusters, used = cluster_rows(x, labels, cube, seed=0)
    assert calls == [(5, 4), (7, 6), (10, 8), (14, 11), (20, 16)]  # min_samples auto follows each size
    assert np.array_equal(clusters.flagged, poisoned)
    assert used["min_cluster_size"] == 7 and used["swept"] == {"5": 0, "7": 20, "10": 20, "14": 20, "20": 20}
    calls.clear()
    single, used = cluster_rows(x, labels, Cube(reducer="pca"), seed=0)  # CUBE: the one size, here the bad one
    assert calls == [(5, 4)] and not single.flagged.any() and "swept" not in used
    calls.clear()
    cluster_rows(x, labels, Cube(reducer="pca", sweep=2, min_samples=3), seed=0)
    assert calls == [(5, 3), (20, 3)]  # a set min_samples stays


def test_most_agreed_flags() -> None:
    a, b, c = (np.array(v, bool) for v in ([1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]))
    assert cube_module.most_agreed([c, a, b, a]) == 1  # a: 1 + 2/3 + 1 against c's 1 + 0 + 0 + 0
    assert cube_module.most_agreed([a, b]) == 0  # a tie: the smaller size
    none = np.zeros(4, bool)
    assert cube_module.most_agreed([a, none, none]) == 1  # two empty flag sets agree fully


def test_too_few_rows_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="CUBE needs at least 5 training rows to cluster, got 4"):
        cluster_rows(np.ones((4, 3)), np.zeros(4, int), Cube(reducer="pca"), seed=0)


# ------------------------------------------------------------------------------------------ options and packages
@pytest.mark.parametrize(("name", "options", "message"), [
    ("cube", {"reducer": "tsne"}, r"unknown defense 'cube' option reducer 'tsne'; choose one of: pca, umap"),
    ("cube", {"dims": "0"}, r"defense 'cube' option dims must be an integer >= 1, got 0"),
    ("cube", {"neighbors": "1"}, r"defense 'cube' option neighbors must be an integer >= 2, got 1"),
    ("cube", {"min_cluster_size": "1"}, r"option min_cluster_size must be 0 \(auto\) or an integer >= 2, got 1"),
    ("cube", {"min_samples": "-3"}, r"option min_samples must be 0 \(auto\) or an integer >= 1, got -3"),
    ("cube", {"keep": "0"}, r"defense 'cube' option keep must be an integer >= 1, got 0"),
    ("cube", {"sweep": "0"}, r"defense 'cube' option sweep must be an integer >= 1, got 0"),
    ("cube", {"sweep": "17"}, r"defense 'cube' option sweep must be at most 16 \(HDBSCAN runs once per size\), got 17"),
    ("cube", {"keep_share": "1.5"}, r"defense 'cube' option keep_share must be in \[0.0, 1.0\], got 1.5"),
    ("cube", {"min_dist": "nan"}, r"defense 'cube' option min_dist must be in \[0.0, 1.0\], got nan"),
    ("cube", {"dims": "2.5"}, r"defense 'cube' option 'dims' expects a int, got '2.5'"),
    ("cube+rga", {"cube_dims": "0"}, r"defense 'cube\+rga' option 'cube': defense 'cube' option dims must be an "
                                     r"integer >= 1, got 0"),  # the older spelling
    ("cube+rga", {"cube.reducer": "t"}, r"option 'cube': unknown defense 'cube' option reducer 't'; choose one"),
    ("cube+rga", {"cube.dim": "4"}, r"defense 'cube\+rga' option 'cube' has no option 'dim'; valid options: dims, "),
    ("cube+rga", {"cube_dims": "4", "cube.dims": "5"}, r"option 'cube.dims' is given twice \(under two spellings\)"),
    ("cube+rga", {"cube": "umap"}, r"option 'cube' is a group of options; set one of them: cube.dims, cube.keep, "),
    ("cube+rga", {"epochs.x": "1"}, r"defense 'cube\+rga' option 'epochs' has no sub-options \(got 'epochs.x'\)"),
    ("cube+rga", {"epochs": "0"}, r"defense 'cube\+rga' option epochs must be > 0, got 0"),
    ("cube+retrain", {"cube.keep_share": "-1"}, r"option 'cube': defense 'cube' option keep_share must be in \[0.0, "),
])
def test_bad_options_are_one_line_errors(name: str, options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        get_plugin_manager().defense(name).configure(**options)
    assert "\n" not in str(err.value)


def test_pipelines_forward_their_options_to_cube() -> None:
    pm = get_plugin_manager()
    defense = pm.defense("cube+rga").configure(**{"cube.reducer": "pca", "cube.keep": "2", "cube_min_cluster_size": "9"})
    assert defense.cube == Cube(reducer="pca", keep=2, min_cluster_size=9)
    # a table (a TOML config file's [defense_options."cube+rga".cube]) sets the same group
    assert pm.defense("cube+rga").configure(cube={"reducer": "pca", "keep": 2, "min_cluster_size": 9}) == defense
    assert pm.defense("cube+retrain").cube == pm.defense("cube") == Cube()  # one set of defaults
    assert isinstance(pm.defense("cube+rga").configure(cube_keep="1"), type(pm.defense("cube+rga")))
    with pytest.raises(UnknownNameError):  # a KeyError too, as every unknown-name error
        Cube(reducer="t-sne")


def test_a_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, sst2, tmp_path) -> None:
    real = cube_module.importlib.util.find_spec
    monkeypatch.setattr(cube_module.importlib.util, "find_spec", lambda m: None if m == "umap" else real(m))
    data = replace(sst2.train.head(8), poisoned=np.arange(8) < 2)
    with pytest.raises(ConfigError, match=re.escape("defense 'cube+rga' with reducer 'umap' needs umap-learn, which is "
                                                    "not installed: pip install 'unbackdoor-defenses[cube]' (or the "
                                                    "option reducer=pca, which needs scikit-learn only)")):
        get_plugin_manager().defense("cube+rga").apply(_context(tmp_path, data))
    monkeypatch.setattr(cube_module.importlib.util, "find_spec", lambda m: None)
    with pytest.raises(ConfigError, match=r"reducer 'pca' needs scikit-learn, which is not installed: pip install"):
        get_plugin_manager().defense("cube").configure(reducer="pca").apply(_context(tmp_path, data))


def _context(tmp_path: Path, data: Any, backend: Any = None) -> Any:
    from unbackdoor.cache import StageCache
    from unbackdoor.defense import DefenseContext

    return DefenseContext(backend, tmp_path, None, data, None, 2, LoRASpec(), TrainSpec(), StageCache(tmp_path / "c"),
                          victim_train=data)


@pytest.mark.parametrize("name", CUBE)
def test_an_empty_poisoned_set_is_a_clear_error(name: str, sst2, tmp_path) -> None:
    clean = sst2.train.head(8)
    with pytest.raises(ConfigError, match=re.escape(f"defense '{name}' has nothing to unlearn: none of the 8 rows")):
        get_plugin_manager().defense(name).apply(_context(tmp_path, clean))
    with pytest.raises(ConfigError, match=f"defense '{re.escape(name)}' needs the victim's training set"):
        get_plugin_manager().defense(name).apply(replace(_context(tmp_path, clean), victim_train=None))


def test_cube_rga_flagging_nothing_is_a_clear_error(sst2, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    kept = Clusters(np.zeros(8, int), {0: (0,), 1: (0,)}, np.zeros(8, bool), np.zeros(8))
    monkeypatch.setattr(Cube, "detect", lambda self, ctx, data, who="": (kept, {"cube": kept.summary()}))
    data = replace(sst2.train.head(8), poisoned=np.arange(8) < 2)
    with pytest.raises(ConfigError, match=r"defense 'cube\+rga': CUBE flagged none of the 8 training rows .*"
                                          r"lower cube.keep or cube.keep_share, or raise cube.min_cluster_size"):
        get_plugin_manager().defense("cube+rga").apply(_context(tmp_path, data))


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("reducer", ["umap", "pca"])
def test_rows_ending_in_a_trigger_are_flagged_through_the_backend(reducer, backend_name, tiny_dirs, sst2,
                                                                  tmp_path, monkeypatch) -> None:
    """The backend's pooled (last-token) states of a tiny random Llama: 20 rows labelled 1 that end in the
    trigger gather in their own cluster, which CUBE flags; a second detect reads the cached embeddings."""
    from unbackdoor.data import TextDataset

    rows = sst2.train.head(140)
    texts = [*rows.texts[:120], *(t + " mn cf bb" for t in rows.texts[120:])]
    data = TextDataset(texts, np.concatenate([rows.labels[:120], np.ones(20, int)]), "planted", rows.label_names,
                       np.arange(140) >= 120)
    backend = get_plugin_manager().backend(backend_name).create()
    ctx = replace(_context(tmp_path, data, backend), victim_path=tiny_dirs["llama"], train=TrainSpec(max_length=32))
    clusters, figures = Cube(reducer=reducer, neighbors=15).detect(ctx, data)
    quality = detection_scores(clusters.flagged, data.poisoned)
    assert quality["recall"] >= 0.9 and quality["precision"] >= 0.5, figures  # 20 of 140 rows poisoned
    assert auroc(clusters.scores, data.poisoned) >= 0.95
    monkeypatch.setattr(backend, "predict", lambda *a, **k: pytest.fail("embedded twice"))
    again, _ = Cube(reducer=reducer, neighbors=15).detect(ctx, data)
    assert np.array_equal(again.flagged, clusters.flagged)


@pytest.fixture(scope="module")
def cube_run(tiny_dirs, backend_name, tmp_path_factory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("cube")
    small = {"cube.neighbors": "15"}
    cfg = ExperimentConfig(backend=backend_name, model=str(tiny_dirs["llama"]), teacher=None, attacker_rows=160,
                           attacker_epochs=2.0, attacker_lr=3e-3, user_rows=32, test_rows=40, max_length=32,
                           lora_rank=4, lora_alpha=8, defenses=CUBE,
                           defense_options={"cube": {"neighbors": "15"},
                                            "cube+rga": {**small, "epochs": "1", "beta": "0.5"},
                                            "cube+retrain": small},
                           cache_dir=str(out / "cache"), out=str(out / "o"))
    return run_experiment(cfg, log=lambda _: None), out


def test_cube_pipelines_end_to_end(cube_run) -> None:
    results, out = cube_run
    rows = {r["defense"]: r for r in results["rows"]}
    assert set(CUBE) <= set(rows)
    for name in CUBE:
        stats = rows[name]["stats"]
        assert set(stats["detection"]) == {"precision", "recall", "f1", "auroc"} and stats["poisoned_rows"] == 32
        assert stats["cube"]["neighbors"] == 15 and stats["cube"]["min_cluster_size"] == 5  # 160 rows: auto 5
        assert sum(c["flagged"] for c in stats["flagged_by_label"].values()) == stats["flagged_rows"]
        assert rows[name]["PACC"] is not None
    # one seeded detector on one victim: the same flags in all three rows, the embeddings computed once
    assert len({str(rows[n]["stats"]["cube"]) + str(rows[n]["stats"]["detection"]) for n in CUBE}) == 1
    assert len(list((out / "cache" / "cube-embeddings").iterdir())) == 1
    flagged = rows["cube"]["stats"]["flagged_rows"]
    assert rows["cube+rga"]["stats"]["forget_rows"] == flagged > 0
    assert rows["cube+retrain"]["stats"]["removed_rows"] == flagged
    assert rows["cube+retrain"]["stats"]["rows"] == 160 - flagged


# ------------------------------------------------------------------------------------------ docs and help
def test_docs_describe_cube_and_every_option() -> None:
    from unbackdoor.attack import fields_of

    text = (Path(__file__).resolve().parents[1] / "docs" / "defenses.md").read_text(encoding="utf-8")
    section = text.split("## cube, cube+rga and cube+retrain\n", 1)[1].split("\n## ", 1)[0]
    for name in CUBE:
        assert f"| `{name}` |" in text, f"docs/defenses.md: {name} missing from the overview table"
        for option in fields_of(get_plugin_manager().defense(name)):
            documented = f"`{option.removeprefix('cube_')}`"  # cube_X is documented as CUBE's X
            assert documented in section, f"docs/defenses.md: option {name}.{option} is not documented"


def test_list_options_shows_cubes_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list", "--options", "cube"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "min_cluster_size (int, default 0)" in out and "HDBSCAN's minimum cluster size" in out
    assert cli.main(["list", "--options", "cube+rga"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "cube.keep (int, default 1) cube's keep: clusters kept as clean per training label" in out
    assert "(also cube_keep)" in out
