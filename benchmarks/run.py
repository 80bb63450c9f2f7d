"""Real-model benchmarks (CPU here, GPU for users): ``python benchmarks/run.py w2s``.

Writes ``benchmarks/results/<name>.json`` and ``.md`` after each part, so a
partial run keeps what it measured. Every figure comes from this run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from report_md import as_saved, notes_of, with_notes

from unbackdoor import ExperimentConfig, run_experiment
from unbackdoor.cache import atomic_write_json, atomic_write_text, default_cache_dir
from unbackdoor.config import read_config_file

RESULTS = Path(__file__).parent / "results"
# The W2S comparison: a stronger attacker than the default quick start (see DESIGN.md's calibration).
W2S_SETTING = dict(dataset="sst2", attack="badnet", attacker_rows=800, attacker_epochs=2.0, attacker_lr=5e-5,
                   poison_rate=0.2, user_rows=400, user_epochs=2.0, user_lr=2e-4, user_batch_size=16,
                   lora_rank=8, lora_alpha=16.0, lora_targets=("q_proj", "v_proj"), test_rows=300, max_length=48,
                   defenses=("none", "w2s"), clean_baseline=True, seed=0)


def save(name: str, data: dict[str, Any], markdown: str) -> None:
    """Write the figures so far."""
    atomic_write_json(RESULTS / f"{name}.json", data)
    atomic_write_text(RESULTS / f"{name}.md", markdown)


def default_wall_time(cache: Path) -> dict[str, Any]:
    """The README's demo (``nox -s demo``: preset ``demo``), from an empty cache (model conversion included), timed."""
    env = {**os.environ, "UNBACKDOOR_CACHE": str(cache), "UNBACKDOOR_QUIET": "1"}
    out = cache / "demo"
    start = time.perf_counter()
    # the `unbackdoor` command of this interpreter (its venv's bin may not be on PATH)
    subprocess.run([sys.executable, "-m", "unbackdoor.cli", "run", "--config", "demo", "--out", str(out)], check=True,
                   env=env)
    seconds = time.perf_counter() - start
    return {"command": "unbackdoor run --config demo", "seconds": round(seconds, 1),
            "results": json.loads((out / "results.json").read_text())}


def comparison(cache: Path) -> dict[str, Any]:
    """CA/ASR for the clean student, poisoned + LoRA (none) and poisoned + W2SDefense."""
    cfg = ExperimentConfig(**W2S_SETTING, cache_dir=str(cache), out=str(cache / "w2s-run"))
    return run_experiment(cfg)


# W2S knobs tried on the comparison's poisoned model (the victim is reused from the cache).
SWEEP = {
    "r64-all-linear": dict(lora_rank=64, lora_alpha=128.0, lora_targets=("all-linear",)),
    "r8-beta1-gamma1-4ep": dict(user_epochs=4.0, defense_options={"w2s": {"beta": 1.0, "gamma": 1.0}}),
}


def sweep(cache: Path) -> dict[str, Any]:
    """none vs w2s for each knob setting in ``SWEEP``, written as results accumulate."""
    data: dict[str, Any] = {"command": "nox -s bench -- w2s-sweep", "base": W2S_SETTING, "runs": {}}
    for name, change in SWEEP.items():
        setting = {**W2S_SETTING, "clean_baseline": False, **change}
        cfg = ExperimentConfig(**setting, cache_dir=str(cache), out=str(cache / f"sweep-{name}"))
        data["runs"][name] = {"change": change, "results": run_experiment(cfg)}
        from report_md import render_sweep

        save("w2s_sweep", data, render_sweep(data))
    return data


#: ExperimentConfig's defaults for every key W2S_SETTING sets (a suite run that starts from the defaults)
DEFAULTS = {key: getattr(ExperimentConfig(), key) for key in W2S_SETTING}
# Suites of experiments on the W2S setting's data and models: name -> (title, {run label: changes}).
# Runs that share an attack reuse its cached victim (and any cached defense row).
UNLEARNING = ("retrain", "ga", "npo", "rga")
TABLE1_DEFENSES = ("none", "onion", "prune", "finetune", "quantize", "merge", "w2s")
#: the data setting as `w2s-data` found it works: the base student learns SST-2 (4 epochs at 1e-3) and so
#: does the teacher (6 epochs at 1e-4); KD weighed 2 (b=0.2 leaves ASR 70.86, b=2 brings it to 15.23)
DATA_LONGER = dict(setting="data", teacher_rows=400, user_epochs=4.0, user_lr=1e-3)
W2S_TEACHER = {"teacher_epochs": 6.0, "teacher_lr": 1e-4}
W2S_DATA = {**W2S_TEACHER, "beta": 2.0}
PROMPT_LR = 2e-2  # prompt methods learn with a far larger step than LoRA (peft's examples use 1e-2..3e-2)


def epochs_3(defenses: tuple[str, ...], **psim_rga: Any) -> dict[str, dict[str, Any]]:
    """``defense_options`` giving every unlearning defense of ``defenses`` 3 epochs (``psim_rga``: psim+rga's others)."""
    return {d: {"epochs": 3.0, **(psim_rga if d == "psim+rga" else {})} for d in defenses if d != "retrain"}


def unlearning_10(seed: int, defenses: tuple[str, ...] = (*UNLEARNING, "psim+rga"), **change: Any) -> dict[str, Any]:
    """An ``rga-10`` run: default (10) unlearning epochs, psim+rga's PSIM at a 5% clean false-positive rate.

    Seed 0 is left out of the change, so its runs equal the ones saved before seeds were added (``--keep``).
    """
    return dict(change, **({"seed": seed} if seed else {}), defenses=defenses,
                defense_options={"psim+rga": {"psim_calibrate_fpr": 0.05}})


def cube_runs() -> dict[str, dict[str, Any]]:
    """The ``cube`` suite's runs in priority order (``SUITES["cube"]``'s comment says why)."""
    def rate(attack: str, seed: int) -> dict[str, Any]:  # rga-10's syntactic poison rates
        return {"poison_rate": 0.09 if seed < 2 else 0.085} if attack == "syntactic" else {}

    def grid(dataset: str, attack: str, seed: int) -> dict[str, Any]:
        return unlearning_10(
            seed, dataset=dataset, attack=attack,
            defenses=(*(("retrain", "rga") if (dataset, attack, seed) == ("sst2", "style", 0) else ()),
                      "psim+rga", "cube+rga", *(("cube+retrain",) if seed == 0 else ())), **rate(attack, seed))

    paraphrase, others = (("sst2", "style"), ("sst2", "syntactic")), \
        (("sst2", "badnet"), ("sst2", "insent"), ("hsol", "badnet"), ("hsol", "insent"))
    runs = {f"{d}-{a}-seed0": grid(d, a, 0) for d, a in paraphrase}
    # beyond CUBE, right after: HDBSCAN's noise rows joined to their nearest cluster (`cube.noise=nearest`)
    # instead of flagged, on the same two victims (CUBE left 324 of style's 800 rows as noise, 263 of them clean)
    runs |= {f"sst2-{a}-seed0-noise-nearest": dict(
        dataset="sst2", attack=a, defenses=("cube+rga",), defense_options={"cube+rga": {"cube.noise": "nearest"}},
        **rate(a, 0)) for _, a in paraphrase}
    # HDBSCAN's minimum cluster size at 5% of the rows (40 of 800) instead of the RGA code's 2.2% (17): on the
    # BadNet victim the auto size split off a 20-row cluster and kept the other 780 rows, 141 of the 160 poisoned
    # among them; at 25-60 (or min_samples 30) the poisoned rows form their own cluster (a probe on the saved
    # embeddings, cube.md's notes); ranked here because that victim is cached
    runs["sst2-badnet-seed0-mcs40"] = dict(dataset="sst2", attack="badnet", defenses=("cube+rga",),
                                           defense_options={"cube+rga": {"cube.min_cluster_size": 40}})
    # `cube.sweep=5` (HDBSCAN at 17-68, the flags the sizes agree on most): on that victim the size chosen blind
    # (mcs40 was picked with the true mask in view), then on three where CUBE's one size already splits the
    # poison off (BadNet seed 1, InSent, style): does the sweep keep what works?
    runs |= {f"sst2-{a}-seed{seed}-sweep5": dict(dataset="sst2", attack=a, **({"seed": seed} if seed else {}),
                                                 defenses=("cube+rga",), defense_options={"cube+rga": {"cube.sweep": 5}})
             for a, seed in (("badnet", 0), ("badnet", 1), ("insent", 0), ("style", 0))}
    # the RGA authors' released rule (`cube.select=rga-released`: the as-many-as-classes largest clusters of all
    # rows are clean, whatever their labels; on HSOL also any over 10% of a class) against CUBE's per-label one:
    # detection only (the `cube` row), on the victims above first (cached), then syntactic and HSOL
    runs |= {f"{d}-{a}-seed{seed}-rga-released": dict(
        dataset=d, attack=a, **({"seed": seed} if seed else {}), **rate(a, seed), defenses=("cube",),
        defense_options={"cube": {"select": "rga-released", **({"keep_share": 0.1} if d == "hsol" else {})}})
        for d, a, seed in (("sst2", "badnet", 0), ("sst2", "badnet", 1), ("sst2", "insent", 0), ("sst2", "style", 0),
                           ("sst2", "syntactic", 0), ("hsol", "badnet", 0), ("hsol", "insent", 0))}
    runs |= {f"{d}-{a}-seed{seed}": grid(d, a, seed) for seed in (1, 2) for d, a in paraphrase}
    # then seed 0 of the other four settings (every trigger measured once), before more seeds of anything
    runs |= {f"{d}-{a}-seed0": grid(d, a, 0) for d, a in others}
    # noise=nearest met the target on style seed 0 (and broke syntactic): the other two style seeds next
    runs |= {f"sst2-style-seed{seed}-noise-nearest": dict(
        dataset="sst2", attack="style", seed=seed, defenses=("cube+rga",),
        defense_options={"cube+rga": {"cube.noise": "nearest"}}) for seed in (1, 2)}
    return runs | {f"{d}-{a}-seed{seed}": grid(d, a, seed) for seed in (1, 2) for d, a in others}


#: W2SDefense's released setting (`--config w2s-paper`) without its defenses: the user's budget is the whole
#: split (less the attacker's rows) x 5 epochs at LoRA r=512; `paper_run` sets defenses and the user's epochs
PAPER = {**{k: tuple(v) if isinstance(v, list) else v for k, v in read_config_file("w2s-paper").items()
            if k not in ("defenses", "defense_options")},
         "precision": "bf16"}  # the preset says auto; the grid ran (and keeps running) bf16 on every machine
#: the released script's objective (5*CE + 0.001*KD + 0.001*A, A summed over the width, ReLU teacher head)
RELEASED = read_config_file("w2s-paper")["defense_options"]["w2s"]


def paper_run(epochs: float, seed: int = 0, defense: str = "w2s", rank: int | None = None,
              **options: Any) -> dict[str, Any]:
    """A `w2s-paper` run (changes from PAPER, its base): the user's epochs, one defense (with ``options``) and
    optionally another rank."""
    return dict(user_epochs=epochs, defenses=(defense,), **({"seed": seed} if seed else {}),
                **({"lora_rank": rank, "lora_alpha": float(rank)} if rank else {}),
                **({"defense_options": {defense: options}} if options else {}))


#: the reduced budget of `w2s-paper`'s seeded rows: 1 user epoch of the paper's 5 (same rows, rank, objective)
PAPER_REDUCED = 1.0
#: 0.001 x 4096 / 576: the released alignment weight matched to SmolLM2's width (the summed distance grows with it)
WIDTH_MATCHED = round(0.001 * 4096 / 576, 4)


def paper_reduced(seed: int) -> dict[str, dict[str, Any]]:
    """`w2s-paper`'s main rows at the reduced budget for one seed: no defense, fine-tuning alone, and W2S with
    the paper's objective and with the released one."""
    e = PAPER_REDUCED
    return {
        f"reduced-none-seed{seed}": paper_run(e, seed, "none"),
        f"reduced-finetune-seed{seed}": paper_run(e, seed, "finetune"),
        f"reduced-w2s-pooled-seed{seed}": paper_run(e, seed),
        f"reduced-w2s-released-seed{seed}": paper_run(e, seed, **RELEASED),
    }


def paper_ablations(seed: int) -> dict[str, dict[str, Any]]:
    """`w2s-paper`'s ablations at the reduced budget for one seed: the alignment, its weight, the rank."""
    e = PAPER_REDUCED
    return {
        f"reduced-w2s-tokens-seed{seed}": paper_run(e, seed, **{**RELEASED, "alignment": "tokens"}),
        f"reduced-w2s-released-gamma-{WIDTH_MATCHED:g}-seed{seed}": paper_run(e, seed, **{**RELEASED,
                                                                                        "gamma": WIDTH_MATCHED}),
        f"reduced-w2s-released-gamma-0.05-seed{seed}": paper_run(e, seed, **{**RELEASED, "gamma": 0.05}),
        # r=512 is nearly full rank on a 576-wide model; the seed's ratio is r = width / 8
        f"reduced-r72-none-seed{seed}": paper_run(e, seed, "none", rank=72),
        f"reduced-r72-w2s-released-seed{seed}": paper_run(e, seed, rank=72, **RELEASED),
    }


SUITES: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "psim": ("PSIM poisoned-input detection (label-reset PEFT), real SmolLM2-135M on SST-2", {
        # in priority order: a partial run (CPU time) keeps the first ones
        "badnet": dict(attack="badnet", defenses=("none", "psim")),
        "badnet-calibrated-fpr-0.05": dict(attack="badnet", defenses=("psim",),
                                           defense_options={"psim": {"calibrate_fpr": 0.05}}),
        "insent": dict(attack="insent", defenses=("none", "psim")),
        **{f"badnet-reset-{rate}": dict(attack="badnet", defenses=("psim",),
                                        defense_options={"psim": {"reset_rate": rate}}) for rate in (0.25, 0.5, 0.75)},
        **{f"badnet-{peft}": dict(attack="badnet", defenses=("psim",),
                                  defense_options={"psim": {"peft": peft, "lr": PROMPT_LR}})
           for peft in ("prompt-tuning", "p-tuning")},
        "badnet-psim-1-epoch": dict(attack="badnet", defenses=("psim",), defense_options={"psim": {"epochs": 1.0}}),
    }),
    # beyond the paper: the released head frozen (only the LoRA module learns the random labels), and a
    # label-reset model trained harder (at the user's 2 epochs x 2e-4 its loss stays near chance)
    "psim-head": ("PSIM variants beyond the paper (frozen head, longer label-reset training), SmolLM2-135M, SST-2, "
                  "BadNet", {
        "badnet-frozen-head": dict(attack="badnet", defenses=("psim",), defense_options={"psim": {"train_head": False}}),
        "badnet-frozen-head-calibrated": dict(attack="badnet", defenses=("psim",),
                                              defense_options={"psim": {"train_head": False, "calibrate_fpr": 0.05}}),
        "badnet-lr-1e-3": dict(attack="badnet", defenses=("psim",), defense_options={"psim": {"lr": 1e-3}}),
        "badnet-4-epochs-lr-1e-3": dict(attack="badnet", defenses=("psim",),
                                        defense_options={"psim": {"epochs": 4.0, "lr": 1e-3}}),
    }),
    # why psim+rga failed on rga-10's HSOL BadNet victim (PSIM AUROC 0.74, every clean flag labelled 0): HSOL
    # is 88% class 0 and a label shuffle keeps that prior; uniform reset labels carry none
    "psim-reset": ("PSIM's reset labels, shuffled (the paper's balance-keeping draw) vs uniform, on an imbalanced "
                   "dataset, HSOL (88% class 0), and on SST-2: SmolLM2-135M, BadNet and InSent victims", {
        **{f"hsol-badnet-{reset}": dict(dataset="hsol", attack="badnet", defenses=("psim",),
                                        defense_options={"psim": {"calibrate_fpr": 0.05, "reset": reset}})
           for reset in ("shuffle", "uniform")},
        "hsol-badnet-psim-rga-uniform": dict(
            dataset="hsol", attack="badnet", defenses=("retrain", "psim+rga"),
            defense_options={"psim+rga": {"psim_calibrate_fpr": 0.05, "psim_reset": "uniform"}}),
        # the same on HSOL InSent, and on balanced SST-2 (where both draws carry no prior)
        **{f"{dataset}-{attack}-{reset}": dict(dataset=dataset, attack=attack, defenses=("psim",),
                                               defense_options={"psim": {"calibrate_fpr": 0.05, "reset": reset}})
           for dataset, attack in (("hsol", "insent"), ("sst2", "badnet")) for reset in ("shuffle", "uniform")},
        # psim+rga with the uniform draw (the default since) where rga-10's shuffled PSIM failed: HSOL InSent
        # seed 0, and seed 1 of both HSOL victims (rga-10's seed-1 victims and ReTrain, from the cache)
        **{f"hsol-{attack}-psim-rga-uniform{f'-seed{seed}' if seed else ''}": dict(
            dataset="hsol", attack=attack, defenses=("retrain", "psim+rga"), **({"seed": seed} if seed else {}),
            defense_options={"psim+rga": {"psim_calibrate_fpr": 0.05, "psim_reset": "uniform"}})
           for attack, seed in (("insent", 0), ("badnet", 1), ("insent", 1))},
    }),
    "attacks": ("Every attack against the undefended LoRA victim (SmolLM2-135M, SST-2)", {
        "badnet": dict(attack="badnet", defenses=("none",)),
        # the aligned SCPN file paraphrases 20% of SST-2's train split: the attacker's 800 rows hold 79
        # non-target rows with a paraphrase, so this attack poisons 72 (rate 0.09) instead of 160
        "syntactic": dict(attack="syntactic", poison_rate=0.09, defenses=("none",)),
        "style": dict(attack="style", defenses=("none",)),
        "proattack": dict(attack="proattack", defenses=("none",)),
        "multi": dict(attack="multi", defenses=("none",)),
        "badnet-clean-label": dict(attack="badnet", clean_label=True, defenses=("none",)),
        "insent": dict(attack="insent", defenses=("none",)),  # also measured in psim.md (same setting)
    }),
    "w2s-data": ("W2SDefense, data-poisoning setting (LoRA fine-tune on poisoned rows), SmolLM2-135M, SST-2", {
        "badnet": dict(setting="data", teacher_rows=400, clean_baseline=True),
        # the base student barely learns SST-2 in 2 LoRA epochs at 2e-4 (CA 51), nor the teacher (dev 53): train more
        "badnet-longer": dict(DATA_LONGER, clean_baseline=True, defense_options={"w2s": W2S_TEACHER}),
        # KD is what carries the teacher's true label onto the poisoned rows: weigh it more
        **{f"badnet-longer-beta-{beta:g}": dict(DATA_LONGER, defenses=("w2s",),
                                                defense_options={"w2s": {**W2S_TEACHER, "beta": beta}})
           for beta in (2.0, 5.0)},
    }),
    "w2s-ablation": ("W2SDefense ablations (seed Tables 4-7), data-poisoning setting (`w2s-data`'s longer training, "
                     "full loss b=2), SmolLM2-135M, SST-2, BadNet", {
        "full": dict(DATA_LONGER, clean_baseline=True, clean_defenses=("w2s",), defenses=("none", "w2s"),
                     defense_options={"w2s": W2S_DATA}),  # with the "clean model" case: w2s on unpoisoned data
        **{label: dict(DATA_LONGER, defenses=("w2s",), defense_options={"w2s": {**W2S_DATA, **weights}})
           for label, weights in (("ce-only", {"beta": 0.0, "gamma": 0.0}), ("ce+alignment", {"beta": 0.0}),
                                  ("ce+kd", {"gamma": 0.0}), ("beta-1", {"beta": 1.0}), ("gamma-1", {"gamma": 1.0}),
                                  # the CE weight (alpha; 1 in every other run)
                                  *((f"alpha-{a:g}", {"alpha": a}) for a in (0.0, 0.5, 2.0)))},
        **{f"rank-{rank}": dict(DATA_LONGER, defenses=("none", "w2s"), lora_rank=rank, lora_alpha=2.0 * rank,
                                defense_options={"w2s": W2S_DATA}) for rank in (4, 32)},
        **{peft: dict(DATA_LONGER, defenses=("none", "w2s"),
                      defense_options={"none": {"peft": peft, "lr": PROMPT_LR},
                                       "w2s": {**W2S_DATA, "peft": peft, "lr": PROMPT_LR}})
           for peft in ("prompt-tuning", "p-tuning")},
    }),
    # 3 unlearning epochs (the default until 10 replaced it: see rga-variants), the same in every run so seeds group
    "rga": ("Backdoor unlearning (seed Table 2 shape), the victim's poisoned rows known, 3 unlearning epochs, "
            "SmolLM2-135M: SST-2 BadNet (3 seeds), InSent, style; HSOL BadNet", {
        "badnet-seed0": dict(attack="badnet", defenses=(*UNLEARNING, "psim+rga"),
                             defense_options=epochs_3((*UNLEARNING, "psim+rga"))),
        # PSIM's threshold 0.7 flags most of the training set (661/800): unlearn only what a 5%-FPR threshold flags
        "badnet-seed0-psim-calibrated": dict(attack="badnet", defenses=("retrain", "psim+rga"),
                                             defense_options=epochs_3(("psim+rga",), psim_calibrate_fpr=0.05)),
        **{f"badnet-seed{seed}": dict(attack="badnet", seed=seed, defenses=UNLEARNING,
                                      defense_options=epochs_3(UNLEARNING)) for seed in (1, 2)},
        # other triggers and HSOL (the seed's second dataset), seed 0 first
        **{f"{attack}-seed0": dict(attack=attack, defenses=UNLEARNING, defense_options=epochs_3(UNLEARNING))
           for attack in ("insent", "style")},
        "hsol-badnet-seed0": dict(dataset="hsol", attack="badnet", defenses=UNLEARNING,
                                  defense_options=epochs_3(UNLEARNING)),
        # then the other seeds of those (`--keep rga`: the runs above stay as they are)
        **{f"{attack}-seed{seed}": dict(attack=attack, seed=seed, defenses=UNLEARNING,
                                        defense_options=epochs_3(UNLEARNING))
           for attack in ("insent", "style") for seed in (1, 2)},
        **{f"hsol-badnet-seed{seed}": dict(dataset="hsol", attack="badnet", seed=seed, defenses=UNLEARNING,
                                           defense_options=epochs_3(UNLEARNING)) for seed in (1, 2)},
    }),
    # beyond the `rga` suite: one lambda per row (at its 3 epochs), and longer unlearning (the paper: 30 epochs;
    # 3 left RGA's LFR at 48 on seed 0), 10 here: what made 10 the default
    "rga-variants": ("Backdoor unlearning variants: RGA with one lambda per row (3 epochs), and 10 unlearning epochs "
                     "instead of 3 (3 seeds); BadNet victim, SmolLM2-135M, SST-2", {
        "badnet-seed0-lambda-per-row": dict(
            attack="badnet", defenses=("retrain", "rga", "psim+rga"),
            defense_options={"rga": {"epochs": 3.0, "lambda_per_row": True},
                             "psim+rga": {"epochs": 3.0, "lambda_per_row": True, "psim_calibrate_fpr": 0.05}}),
        **{f"badnet-seed{seed}-10-epochs": dict(attack="badnet", **({"seed": seed} if seed else {}), defenses=UNLEARNING,
                                                defense_options={m: {"epochs": 10.0} for m in UNLEARNING[1:]})
           for seed in (0, 1, 2)},
    }),
    # the seed's Table 2 at the default 10 epochs, psim+rga at a 5% clean false-positive rate: next to rga-variants'
    # BadNet runs, the other triggers and HSOL over 3 seeds (the first 3 runs done; the rest ~15-30 min each on 2 cores)
    "rga-10": ("Backdoor unlearning at the default 10 epochs with psim+rga (calibrated PSIM), SmolLM2-135M: SST-2 "
               "BadNet psim+rga, SST-2 InSent and style, HSOL BadNet and InSent, SST-2 syntactic; 3 seeds", {
        **{f"sst2-badnet-psim-rga-seed{seed}": unlearning_10(seed, attack="badnet", defenses=("retrain", "psim+rga"))
           for seed in (0, 1, 2)},
        **{f"{dataset}-{attack}-seed{seed}": unlearning_10(seed, dataset=dataset, attack=attack)
           for seed in (0, 1, 2)
           for dataset, attack in (("sst2", "insent"), ("sst2", "style"), ("hsol", "badnet"), ("hsol", "insent"))},
        # the syntactic trigger last: the aligned SCPN file gives the attacker 72 poisoned rows (rate 0.09)
        # seed 2's 800 attacker rows hold only 68 non-target rows with a paraphrase: it poisons those 68 (0.085)
        **{f"sst2-syntactic-seed{seed}": unlearning_10(seed, attack="syntactic", poison_rate=0.09 if seed < 2 else 0.085)
           for seed in (0, 1, 2)},
    }),
    # the RGA paper's own model family next to its anchor (BERT SST-2 BadNets: ReTrain PACC 90.54, GA 50.08,
    # NPO 74.24, RGA 90.34): MiniLM-L6 (a 6-layer BERT) as the victim, rga-10's settings otherwise
    # The first run kept rga-10's SmolLM2 learning rates: the victim reached CA 78.33 and ReTrain 75.33 (LFR 42.38),
    # RGA's LoRA at 2e-4 unlearned little (LFR 62.91); the others give MiniLM the rates `w2s-data` found it needs
    # (its teacher: 1e-4) and its LoRA 1e-3 (W2S's data-setting student)
    "rga-bert": ("Backdoor unlearning on a BERT victim (MiniLM-L6, the RGA paper's model family), SST-2 BadNet, "
                 "10 epochs, psim+rga with calibrated PSIM; 3 seeds at MiniLM's learning rates", {
        "sst2-badnet-seed0": unlearning_10(0, attack="badnet", model="minilm-l6", teacher=None,
                                           lora_targets=("query", "value")),
        **{f"minilm-lr-sst2-badnet-seed{seed}": unlearning_10(
            seed, attack="badnet", model="minilm-l6", teacher=None, lora_targets=("query", "value"),
            attacker_epochs=4.0, attacker_lr=1e-4, user_lr=1e-3) for seed in (0, 1, 2)},
        # the paper's setting: every parameter unlearns (adapter=full, at the victim's own rate 1e-4), RGA's
        # distance from the clean MiniLM; the same victims and ReTrain as above (cached)
        **{f"minilm-lr-sst2-badnet-seed{seed}-full": dict(
            attack="badnet", model="minilm-l6", teacher=None, lora_targets=("query", "value"), attacker_epochs=4.0,
            attacker_lr=1e-4, user_lr=1e-3, **({"seed": seed} if seed else {}), defenses=("retrain", "ga", "npo", "rga"),
            defense_options={d: {"adapter": "full"} for d in ("ga", "npo", "rga")}) for seed in (0, 1, 2)},
        # at 10 epochs NPO and RGA leave these victims' backdoor whole (CE on the poisoned rows ~0.006: the ascent
        # gradient vanishes); the paper's 30 epochs
        "minilm-lr-sst2-badnet-seed0-30-epochs": dict(
            attack="badnet", model="minilm-l6", teacher=None, lora_targets=("query", "value"), attacker_epochs=4.0,
            attacker_lr=1e-4, user_lr=1e-3, defenses=("retrain", "npo", "rga"),
            defense_options={"npo": {"epochs": 30.0}, "rga": {"epochs": 30.0}}),
    }),
    # W2SDefense in its own setting (weight poisoning) at the released script's budget and objective: the full
    # budget (6,120 rows x 5 epochs, r=512, ~45 min a run in bf16 on 2 cores) for none / released / pooled, then
    # the main rows at the reduced budget (1 epoch) over 3 seeds, InSent, and the ablations (in priority order:
    # a partial run keeps the first ones)
    "w2s-paper": ("W2SDefense in its own setting (weight poisoning, SST-2 BadNet, SmolLM2-135M): the released "
                  "script's budget and objective (`--config w2s-paper`) vs the paper's text", {
        "full-none": paper_run(5.0, defense="none"),
        "full-w2s-released": paper_run(5.0, **RELEASED),
        "full-w2s-pooled": paper_run(5.0),
        **{label: run for seed in (0, 1, 2) for label, run in paper_reduced(seed).items()},
        # then InSent (the paper's sentence trigger) at the reduced budget
        **{f"insent-reduced-{label}-seed{seed}": dict(paper_run(PAPER_REDUCED, seed, defense, **options),
                                                      attack="insent")
           for seed in (0, 1, 2)
           for label, defense, options in (("none", "none", {}), ("w2s-released", "w2s", RELEASED),
                                           ("w2s-pooled", "w2s", {}))},
        # then the ablations, seed 0 first
        **{label: run for seed in (0, 1, 2) for label, run in paper_ablations(seed).items()},
        # then the reduced budget's best objective (the released one at the width-matched weight) at the full budget
        f"full-w2s-released-gamma-{WIDTH_MATCHED:g}": paper_run(5.0, **{**RELEASED, "gamma": WIDTH_MATCHED}),
    }),
    "table1": ("Defenses compared (the seed's Table 1 for our setting): SmolLM2-135M, SST-2 and CR, weight poisoning", {
        f"{dataset}-{attack}": dict(dataset=dataset, attack=attack, defenses=TABLE1_DEFENSES,
                                    **({"poison_rate": 0.09} if attack == "syntactic" else {}))
        # CR has no syntactic paraphrases in the shared data (a user paraphrase file would add them)
        for dataset, attack in (("sst2", "badnet"), ("sst2", "insent"), ("sst2", "syntactic"),
                                ("cr", "badnet"), ("cr", "insent"))
    }),
    # Table 1 in W2SDefense's data-poisoning setting, where its KD term sees the poisoned rows (`w2s-data`: ASR
    # 15.23 at b=2); the defenses that act on a released model (prune, finetune, quantize, merge) do not apply there
    "table1-data": ("Defenses compared, data-poisoning setting (`w2s-data`'s longer training, W2S b=2): SmolLM2-135M, "
                    "SST-2 and CR", {
        f"{dataset}-{attack}": dict(DATA_LONGER, dataset=dataset, attack=attack, defenses=("none", "onion", "w2s"),
                                    defense_options={"w2s": W2S_DATA})
        for dataset, attack in (("sst2", "badnet"), ("sst2", "insent"), ("cr", "badnet"), ("cr", "insent"))
    }),
    # The README's default experiment on each backend (same config and seed), after the step-time comparison.
    "jax": ("The default experiment (`unbackdoor run` defaults) on torch and on jax, same config and seed", {
        "torch-default": dict(DEFAULTS, backend="torch", clean_baseline=False),
        "jax-default": dict(DEFAULTS, backend="jax", clean_baseline=False),
    }),
    # issue 22: bf16 (bf16 matmuls, an adapted model's frozen base held in bf16) vs fp32, the default experiment on
    # each backend (the fp32 runs equal `jax`'s, cached), after precision.py's step time and memory
    "precision": ("fp32 vs bf16: step time and memory of a LoRA and a W2S step, and the default experiment, on "
                  "each backend (SmolLM2-135M)", {
        f"{backend}-{precision}": dict(DEFAULTS, backend=backend, precision=precision, clean_baseline=False)
        for backend in ("torch", "jax") for precision in ("fp32", "bf16")}),
    # issue 24: CUBE (the RGA authors' detector) on rga-10's victims, settings and seeds: cube+rga next to psim+rga
    # (run again: PSIM's reset draw is uniform since rga-10) and to rga-10's RGA with the poisoned rows known and
    # ReTrain, then cube+retrain (a full fine-tune, last). ReTrain and RGA are trained again only in the first run
    # (they reproduce rga-10's figures there); the others take them from rga-10's run of the same victim (BORROWED).
    # In priority order (a partial run, ~20-40 min a run on 2 cores, keeps the first ones): the paraphrase
    # triggers, where PSIM fails and the target is set, seed by seed, then the other four settings; cube+retrain on
    # seed 0 of each setting (cube_runs)
    "cube": ("CUBE (UMAP + HDBSCAN on the victim's hidden states) vs PSIM as the detector of detect-then-unlearn, "
             "rga-10's grid: SST-2 style, syntactic, BadNet, InSent, HSOL BadNet, InSent; 3 seeds", cube_runs(),
    ),
}


#: rows a suite's runs take from another suite's saved run of the same victim instead of training them again:
#: suite -> (the defenses, the suites to look in)
BORROWED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {"cube": (("retrain", "rga"), ("rga-10", "rga-variants"))}


def borrowed(results: dict[str, Any], defenses: tuple[str, ...], suites: tuple[str, ...],
             where: Path = RESULTS) -> dict[str, Any]:
    """``results`` with the rows of ``defenses`` it lacks taken from a saved run of ``suites`` (their JSON in
    ``where``) on the same victim.

    The same victim: the same experiment (:func:`unbackdoor.report.experiment_setting` on the keys both configs
    have) and seed, and the same released row (CA, ASR and PACC: the victim's figures). A row is taken only
    where that run gave its defense no options (the defense at its defaults). Each taken row says where it came
    from (``borrowed``); they go right after the released row, in the order of ``defenses``.
    """
    from unbackdoor.report import experiment_setting, released_row

    results = as_saved(results)  # a fresh run's tuples compare as the saved runs' lists
    def released(res: dict[str, Any]) -> tuple[Any, ...] | None:
        row = released_row(res)
        return None if row is None else (row.get("CA"), row.get("ASR"), row.get("PACC"))

    ours, have = experiment_setting(results), {r.get("defense") for r in results.get("rows", [])}
    seed, victim = results.get("config", {}).get("seed"), released(results)
    taken: list[dict[str, Any]] = []
    for suite_name in suites:
        file = where / f"{suite_name}.json"
        for label, run in (json.loads(file.read_text())["runs"] if file.exists() else {}).items():
            theirs = run["results"]
            setting = experiment_setting(theirs)
            if (victim is None or released(theirs) != victim or theirs.get("config", {}).get("seed") != seed
                    or any(ours[k] != setting[k] for k in ours.keys() & setting.keys())):
                continue
            options = theirs.get("config", {}).get("defense_options") or {}
            for row in theirs.get("rows", []):
                name = row.get("defense")
                if name in defenses and name not in have and not options.get(name):
                    taken.append({**row, "borrowed": f"{suite_name}.json run {label}"})
                    have.add(name)
    if not taken:
        return results
    rows = results["rows"]
    at = rows.index(released_row(results)) + 1  # the victim is there: ``victim`` is not None
    return {**results, "rows": [*rows[:at], *sorted(taken, key=lambda r: defenses.index(r["defense"])), *rows[at:]]}


#: suites whose runs change another base than W2S_SETTING (the keys given here replace W2S_SETTING's)
SUITE_BASES: dict[str, dict[str, Any]] = {"w2s-paper": PAPER}


def suite(name: str, cache: Path, keep: bool = False) -> dict[str, Any]:
    """Run every experiment of ``SUITES[name]``, writing the figures after each.

    ``keep``: runs already in ``results/<name>.json`` with the same change are kept as they are (not run
    again, their wall times and the file's hand-written notes kept), so a suite that grew runs only the new ones.
    """
    from report_md import render_suite

    title, runs = SUITES[name]
    base = {**W2S_SETTING, **SUITE_BASES.get(name, {})}
    data: dict[str, Any] = {"title": title, "command": f"nox -s bench -- {name}", "base": base,
                            "machine": platform.platform(), "cpus": os.cpu_count(), "runs": {}}
    previous, notes = kept(name) if keep else ({}, "")

    def same(label: str, change: dict[str, Any]) -> bool:  # a saved run this suite keeps as it is
        return label in previous and previous[label]["change"] == as_saved(change)

    def write() -> None:
        # the kept runs not reached yet too, in the suite's order: a --keep run stopped midway loses none
        shown = {**data, "runs": {label: data["runs"].get(label) or previous[label] for label, change in runs.items()
                                  if label in data["runs"] or same(label, change)}}
        page = render_suite(shown, RESULTS / "plots" / name)  # seconds (the plots): before the notes are read
        # with --keep, the page's notes as they are now (edited while a run trains), read just before the write
        save(name, shown, with_notes(page, notes_of(RESULTS / f"{name}.md") if keep else notes))

    if name == "jax":  # the jitted step vs the torch step first: minutes, where the runs take an hour
        from step_time import measure

        data["step_time"] = measure(cache)
        write()
    if name == "precision":  # minutes, each case in its own process; before the runs, which take longer
        import precision

        data["precision_steps"] = precision.measure(cache)
        write()
    unwritten = False  # kept runs since the last write
    for label, change in runs.items():
        if same(label, change):
            data["runs"][label], unwritten = previous[label], True
            continue
        setting = {**base, "clean_baseline": False, **change}
        cfg = ExperimentConfig(**setting, cache_dir=str(cache), out=str(cache / f"{name}-{label}"))
        results = run_experiment(cfg)
        if name in BORROWED:
            results = borrowed(results, *BORROWED[name])
        data["runs"][label] = {"change": change, "results": results}
        write()
        unwritten = False
    if unwritten:
        write()
    return data


def kept(name: str) -> tuple[dict[str, Any], str]:
    """The runs of ``results/<name>.json`` by label, and the hand-written notes of its markdown."""
    file = RESULTS / f"{name}.json"
    runs = json.loads(file.read_text())["runs"] if file.exists() else {}
    return runs, notes_of(RESULTS / f"{name}.md")


BENCHMARKS = ["w2s", "w2s-sweep", "demo", "loss-contract", "audit", "audit-jax", "audit-timing", "audit-variants",
              *SUITES]


def rerender(name: str) -> None:
    """Rewrite suite ``name``'s markdown and plots from its saved JSON (no model runs), keeping its notes."""
    from report_md import render_suite

    data = json.loads((RESULTS / f"{name}.json").read_text())
    data["title"] = SUITES[name][0]  # the suite as defined now (it may have gained runs since)
    _, notes = kept(name)
    atomic_write_text(RESULTS / f"{name}.md", with_notes(render_suite(data, RESULTS / "plots" / name), notes))


def merged_runs(ours: dict[str, Any], theirs: dict[str, Any], runs: dict[str, dict[str, Any]]) -> list[str]:
    """Add to ``ours`` (a suite's saved JSON) the runs of ``theirs`` (the same suite run on another machine)
    that ``ours`` lacks and that ``theirs`` made with the change the suite defines now; each added run names
    its machine (``machine``). ``ours``' runs are then in the suite's order. Returns the labels added."""
    added = []
    for label, change in runs.items():
        run = theirs["runs"].get(label)
        if label in ours["runs"] or run is None or run["change"] != as_saved(change):
            continue
        device = run["results"].get("device")
        where = f"{theirs['machine']}, {theirs['cpus']} CPUs"
        ours["runs"][label] = {**run, "machine": run.get("machine") or (f"{device} ({where})" if device else where)}
        added.append(label)
    order = [label for label in runs if label in ours["runs"]]
    ours["runs"] = {label: ours["runs"][label] for label in [*order, *(k for k in ours["runs"] if k not in runs)]}
    return added


def merge(name: str, file: Path) -> None:
    """``--merge SUITE FILE``: :func:`merged_runs` into ``results/<SUITE>.json``, then re-render its page."""
    ours = json.loads((RESULTS / f"{name}.json").read_text())
    added = merged_runs(ours, json.loads(file.read_text()), SUITES[name][1])
    atomic_write_json(RESULTS / f"{name}.json", ours)
    rerender(name)
    print(f"{name}: added {', '.join(added) or 'no run'} from {file}")


def merge_device(file: Path) -> int:
    """``--merge FILE``: the device check in ``file`` into ``results/device.{json,md}`` (2 and a message if
    ``file`` is missing or no device check)."""
    from device_report import DeviceReportError, merge

    try:
        label = merge(file, RESULTS)
    except DeviceReportError as exc:
        print(f"run.py --merge: error: {exc}", file=sys.stderr)
        return 2
    print(f"device: recorded {label!r} from {file} in {RESULTS / 'device.md'}")
    return 0


def main(argv: list[str]) -> int:
    """Run the named benchmarks (default ``w2s``); see :data:`BENCHMARKS`.

    ``--render SUITE...``: re-render only. ``--keep SUITE...``: keep the runs a suite's JSON already holds
    (``--keep audit``: the zoo models ``audit.json`` holds; the missing ones are built and audited).
    ``--merge SUITE FILE``: add the runs a copy of the suite's JSON made elsewhere (a GPU machine running
    ``--keep SUITE`` on this checkout) holds and ours lacks. ``--merge FILE``: record a device check's JSON
    (``device_check.py``) in ``results/device.json`` and ``results/device.md``.
    """
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: run.py [--keep | --render | --merge [SUITE] FILE] [SUITE...]\n{main.__doc__}\n"
              f"suites: {', '.join(BENCHMARKS)}")
        return 0
    if argv[:1] == ["--merge"] and len(argv) == 2:
        return merge_device(Path(argv[1]))
    if argv[:1] == ["--merge"]:
        if len(argv) != 3 or argv[1] not in SUITES or not Path(argv[2]).is_file():
            print(f"--merge takes a suite name and a JSON file of it; suites: {', '.join(SUITES)}", file=sys.stderr)
            return 2
        merge(argv[1], Path(argv[2]))
        return 0
    keep = argv[:1] == ["--keep"]
    argv = argv[1:] if keep else argv
    if argv[:1] == ["--render"]:
        unknown = sorted(set(argv[1:]) - {*SUITES, "audit"})
        if unknown or not argv[1:]:
            print(f"--render takes suite names; choose: audit, {', '.join(SUITES)}", file=sys.stderr)
            return 2
        for name in argv[1:]:
            if name == "audit":  # the zoo's page, from audit.json
                import audit_zoo

                audit_zoo.rerender()
            else:
                rerender(name)
        return 0
    names = argv or ["w2s"]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; choose: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    cache = Path(os.environ.get("UNBACKDOOR_BENCH_CACHE") or default_cache_dir() / "bench")
    if "w2s" in names:
        w2s(cache)
    if "w2s-sweep" in names:
        sweep(cache)
    if "demo" in names:
        demo(cache)
    if "loss-contract" in names:
        loss_contract(cache)
    if "audit" in names or "audit-jax" in names:  # the zoo's models train once; audit-jax adds the jax audits
        import audit_zoo

        audit_zoo.run(cache, ("torch", "jax") if "audit-jax" in names else ("torch",), keep=keep)
    if "audit-timing" in names:  # the jax audit of 2 zoo models and one SmolLM2 audit, beside `audit`'s page
        import audit_zoo

        audit_zoo.timing(cache)
    if "audit-variants" in names:  # other auditor options on the zoo's models, beside `audit`'s page
        import audit_zoo

        audit_zoo.variants(cache)
    for name in names:
        if name in SUITES:
            suite(name, cache, keep)
    return 0


def w2s(cache: Path) -> None:
    """Default-experiment wall time, loop throughput, and the clean/none/w2s comparison."""
    from throughput import measure  # the naive vs fused loop, torch only

    data: dict[str, Any] = {"command": "nox -s bench -- w2s", "machine": platform.platform(),
                            "cpus": os.cpu_count(), "cache": str(cache)}
    fresh = cache / f"fresh-{time.strftime('%Y%m%d-%H%M%S')}"  # an empty cache: conversion included
    data["default_experiment"] = default_wall_time(fresh)
    save("w2s", data, render(data))
    data["throughput"] = measure(cache)
    save("w2s", data, render(data))
    data["comparison"] = comparison(cache)
    save("w2s", data, render(data))
    print(render(data))


def demo(cache: Path) -> None:
    """``nox -s demo``'s experiment from an empty cache, timed, checked against what the demo must show."""
    from report_md import render_demo

    fresh = cache / f"fresh-{time.strftime('%Y%m%d-%H%M%S')}"
    data: dict[str, Any] = {"command": "nox -s bench -- demo", "machine": platform.platform(), "cpus": os.cpu_count(),
                            "run": default_wall_time(fresh)}
    save("demo", data, render_demo(data))
    print(render_demo(data))


def loss_contract(cache: Path) -> None:
    """The loss contract's step time and default-experiment figures against the code before it (issue 20)."""
    import loss_contract as contract

    data = contract.measure(cache)
    save("loss-contract", data, contract.render(data))
    print(contract.render(data))


def render(data: dict[str, Any]) -> str:
    """The markdown summary of whatever has been measured."""
    from report_md import render_w2s

    return render_w2s(data, W2S_SETTING)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main(sys.argv[1:]))
