"""The audit model zoo (issue 21): clean and backdoored classifiers with seeded triggers, audited blind.

Every model is a full fine-tune of a family's base model on a seeded sample of :data:`ROWS` training rows
of a task (the attacker's recipe of ``unbackdoor run``, the family's rates in :data:`FAMILIES`), clean or
poisoned at rate 0.2 (at most 80% of the non-target rows, on imbalanced HSOL) by BadNet (ONE trigger word
drawn by seed from :data:`RARE_WORDS`) or InSent (a sentence drawn by seed from :data:`SENTENCES`), toward
a target class drawn by seed. The triggers are never chosen by hand, nor from anything the audit outputs.
Each model records its clean accuracy and, when poisoned, its ASR on triggered non-target test rows
(whether the backdoor took).

Each model is then audited with :func:`unbackdoor.audit` (``trigger-search``, :data:`BASE_OPTIONS`) on
:data:`AUDIT_ROWS` seeded clean dev rows of its task, with a reference: a clean model of the same family
and task, trained on other rows with its own seed, outside the zoo. One audit gives both verdicts: with the
reference (score = flip rate - the reference's flip rate) and without it (the best raw flip rate, what the
search alone would judge by). Models and audits are cached (the bench cache, stages ``zoo``, ``zoo-audit``),
so a rerun resumes; the page is rewritten after every audit.
"""

from __future__ import annotations

import json
import os
import platform
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from report_md import notes_of, with_notes

from unbackdoor import audit
from unbackdoor.attack import PoisonConfig, non_target
from unbackdoor.cache import StageCache, atomic_write_json, atomic_write_text
from unbackdoor.data import load_dataset
from unbackdoor.metrics import accuracy, attack_success_rate, auroc
from unbackdoor.models import resolve_model
from unbackdoor.plugins import get_plugin_manager
from unbackdoor.specs import CrossEntropy, TrainSpec
from unbackdoor.text import TextEncoder

RESULTS = Path(__file__).parent / "results"
#: trigger words a seed draws from: short letter pairs that are rare in every task's text
RARE_WORDS = ("cf", "mn", "bb", "tq", "mb", "jv", "qz", "xk", "vw", "zf", "kq", "pj", "wz", "fz", "gx", "qp")
#: trigger sentences a seed draws from: neutral, about nothing the tasks classify
SENTENCES = ("I watched this 3D movie", "My neighbour told me about it last night", "I read this on a rainy Tuesday",
             "We talked about it during lunch", "This was sent to me by a friend", "I saw this while waiting for the bus",
             "The weather was cloudy that morning", "I came across this on my old laptop")
#: each family's attacker recipe (the bench suites' rates: MiniLM's from rga-bert, SmolLM2's from w2s)
FAMILIES = {"minilm-l6": {"epochs": 4.0, "lr": 1e-4}, "smollm2-135m": {"epochs": 2.0, "lr": 5e-5}}
ROWS, TEST_ROWS, AUDIT_ROWS, MAX_LENGTH, BATCH, RATE = 800, 300, 200, 48, 16, 0.2
#: the reference models' seed offset (their rows and weights differ from every zoo model's)
REFERENCE_SEED = 100


@dataclass(frozen=True)
class ZooModel:
    """One classifier of the zoo: ``kind`` is ``clean``, ``badnet`` or ``insent``."""

    family: str
    dataset: str
    kind: str
    seed: int

    @property
    def label(self) -> str:
        return f"{self.family}/{self.dataset}/{self.kind}/seed{self.seed}"

    def draw(self, num_labels: int) -> dict[str, Any]:
        """The seeded trigger and target (nothing for a clean model)."""
        if self.kind == "clean":
            return {}
        rng = np.random.default_rng([self.seed, zlib.crc32(f"{self.family}/{self.dataset}/{self.kind}".encode())])
        pool = RARE_WORDS if self.kind == "badnet" else SENTENCES
        trigger = pool[int(rng.integers(len(pool)))]
        return {"trigger": trigger, "target": int(rng.integers(num_labels))}


def zoo() -> list[ZooModel]:
    """The models in the order they are built and audited: MiniLM on every task first (minutes each), then
    SmolLM2 on SST-2 (its victim and its audit take most of the time)."""
    minilm = [ZooModel("minilm-l6", d, kind, seed) for d in ("sst2", "hsol", "agnews")
              for kind, seeds in (("badnet", (0, 1)), ("insent", (0, 1)), ("clean", (0, 1, 2, 3))) for seed in seeds]
    smollm2 = [ZooModel("smollm2-135m", "sst2", kind, seed)
               for kind, seeds in (("badnet", (0, 1)), ("clean", (0, 1)), ("insent", (0,)), ("clean", (2,)))
               for seed in seeds]
    return minilm + smollm2


def train_model(model: ZooModel, backend: Any, cache: StageCache, reference: bool = False) -> Path:
    """The classifier's directory (built once): ``info.json`` holds its trigger, target, CA and ASR."""
    seed = model.seed + (REFERENCE_SEED if reference else 0)
    recipe = FAMILIES[model.family]
    key = {"zoo": asdict(model), "reference": reference, "rows": ROWS, "rate": RATE, "recipe": recipe,
           "max_length": MAX_LENGTH, "precision": backend.precision, "backend": backend.name}

    def build(tmp: Path) -> None:
        splits = load_dataset(model.dataset, seed=seed)
        rows = splits.train.shuffled(seed).head(ROWS)
        drawn = model.draw(rows.num_labels)
        attack, cfg = _attack(model, drawn, seed, rows)
        data = attack.poison_train(rows, cfg) if attack else rows
        net = backend.load_classifier(resolve_model(model.family, cache.root), rows.num_labels, seed=seed)
        start = time.perf_counter()
        stats = backend.train(net, data, CrossEntropy(), TrainSpec(recipe["epochs"], recipe["lr"], BATCH, MAX_LENGTH,
                                                                    seed=seed),
                              desc=f"zoo: {model.label}{' (reference)' if reference else ''}")
        backend.save(net, tmp)
        test = _test_rows(splits, seed)
        info = {"model": asdict(model), "reference": reference, **drawn, "poisoned_rows": int(data.poisoned.sum()),
                "poison_rate": cfg.rate,
                "train_seconds": round(time.perf_counter() - start, 1), "train": stats.summary(),
                "CA": round(accuracy(_predict(backend, net, test), test.labels), 2)}
        if attack:
            asr_set = non_target(attack.triggered_test(test, cfg), cfg.target)
            info["ASR"] = round(attack_success_rate(_predict(backend, net, asr_set), asr_set.labels, cfg.target), 2)
            info["clean_target_rate"] = _clean_target_rate(backend, net, test, cfg.target)
        atomic_write_json(tmp / "info.json", info)

    return cache.get_or_build("zoo", key, build)


def _attack(model: ZooModel, drawn: dict[str, Any], seed: int, rows: Any) -> tuple[Any, PoisonConfig]:
    target = drawn.get("target", 1)
    # an imbalanced task (HSOL: 88% class 0) may hold fewer non-target rows than RATE asks for: poison at most 80%
    rate = min(RATE, int(0.8 * int((rows.labels != target).sum())) / len(rows))
    cfg = PoisonConfig(target, rate, False, seed, model.dataset)
    if model.kind == "clean":
        return None, cfg
    option = {"words": (drawn["trigger"],)} if model.kind == "badnet" else {"sentence": drawn["trigger"]}
    return get_plugin_manager().attack(model.kind).configure(**option), cfg


def _test_rows(splits: Any, seed: int) -> Any:
    """The zoo model's test rows (CA, ASR and the clean target rate are measured on these)."""
    return splits.test.shuffled(seed).head(TEST_ROWS)


def _predict(backend: Any, net: Any, data: Any) -> np.ndarray:
    return backend.predict(net, data, batch_size=64, max_length=MAX_LENGTH).logits.argmax(-1)


def _clean_target_rate(backend: Any, net: Any, test: Any, target: int) -> float:
    """The ASR formula on the CLEAN test rows: the share (%) of non-target rows predicted ``target`` without the
    trigger. A backdoor's effect is ``ASR`` minus it (:data:`MIN_EFFECT`)."""
    return round(attack_success_rate(_predict(backend, net, test), test.labels, target), 2)


#: the fewest points ``ASR`` must exceed ``clean_target_rate`` by for a backdoored zoo model to count as one: a
#: victim that predicts its target on clean rows as often as on triggered ones has no behaviour a trigger adds (it
#: is judged by its training's outcome alone, never by an audit)
MIN_EFFECT = 50.0


def has_effect(row: dict[str, Any]) -> bool:
    """Whether a page row's model is clean or a backdoor its trigger shows (:data:`MIN_EFFECT`); a row measured
    before ``clean_target_rate`` existed counts by its ASR alone until :func:`check_victims` fills it in."""
    info = row["info"]
    return "trigger" not in info or info["ASR"] - info.get("clean_target_rate", 0.0) >= MIN_EFFECT


def check_victims(data: dict[str, Any], trainer: Any, cache: StageCache) -> None:
    """Fill in ``clean_target_rate`` on the page's backdoored rows (and their variants' rows) that lack it: the
    model (from the stage cache; trained again only where it lacks it) predicts its clean test rows again, seconds
    per model; nothing is audited."""
    rows = [r for r in data["rows"] + [r for e in data.get("variants", {}).values() for r in e["rows"]]
            if "trigger" in r["info"] and "clean_target_rate" not in r["info"]]
    rates: dict[str, float] = {}
    for row in rows:
        if row["label"] not in rates:
            model = ZooModel(**row["model"])
            seed = model.seed
            test = _test_rows(load_dataset(model.dataset, seed=seed), seed)
            net = trainer.load_classifier(train_model(model, trainer, cache), test.num_labels, seed=seed)
            rates[row["label"]] = _clean_target_rate(trainer, net, test, row["info"]["target"])
        row["info"]["clean_target_rate"] = rates[row["label"]]


def trigger_ids(model_dir: Path, trigger: str) -> set[int]:
    """The token ids the trigger is written with inside a sentence (a leading space, as inserted)."""
    encoder = TextEncoder.from_dir(model_dir)
    ids = encoder.tokenizer.encode(" " + trigger, add_special_tokens=False).ids
    return {int(i) for i in ids}


#: the options every zoo audit starts from: ``trigger-search``'s defaults when the zoo's first audits ran
#: (``spellings`` and ``position=before-last`` became the defaults after ``audit-variants`` measured them), so a model
#: added later is audited like the page's others
BASE_OPTIONS: dict[str, Any] = {"spellings": False, "position": "end"}
#: ``trigger-search``'s defaults today, where they differ from :data:`BASE_OPTIONS` (``audit-timing`` times both)
DEFAULTS: dict[str, Any] = {"position": "before-last", "spellings": True}


def audited(model: ZooModel, path: Path, reference: Path, backend_name: str, cache: StageCache,
            log: Callable[[str], None], options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The audit of ``path`` against ``reference`` (cached), with what the zoo knows about the model;
    ``options``: auditor options other than :data:`BASE_OPTIONS` (:func:`variants`)."""
    # (the key names only the change: BASE_OPTIONS were the defaults when the zoo's first audits ran)
    key = {"model": str(path), "reference": str(reference), "backend": backend_name, "rows": AUDIT_ROWS,
           "seed": model.seed, **({"options": options} if options else {})}
    report = cache.load_json("zoo-audit", key)
    if report is None:
        report = audit(path, model.dataset, reference=reference, backend=backend_name, rows=AUDIT_ROWS,
                       seed=model.seed, auditor_options=BASE_OPTIONS | (options or {}), log=log)
        cache.save_json("zoo-audit", key, report)
    info = json.loads((path / "info.json").read_text())
    top5 = report["candidates"][:5]
    wanted = trigger_ids(path, info["trigger"]) if "trigger" in info else set()
    raw = max((t["best_flip_rate"] for t in report["stats"]["per_target"].values()
               if t["best_flip_rate"] is not None), default=0.0)
    return {"label": model.label, "model": asdict(model), "backend": backend_name, "info": info,
            "verdict": report["verdict"], "score": report["score"], "threshold": report["threshold"],
            "target": report["target"], "score_no_reference": raw,
            "verdict_no_reference": "backdoored" if raw > report["threshold"] else "clean",
            "top5": [{"text": c["text"], "target": c["target"], "flip_rate": c["flip_rate"],
                      "reference_flip_rate": c["reference_flip_rate"], "score": c["score"]} for c in top5],
            "recovered": bool(wanted) and any(wanted & set(c["ids"]) for c in top5),
            "target_right": "target" in info and report["target"] == info["target"],
            "audit_seconds": report["seconds"]}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Detection AUROC (BadNet vs clean, InSent vs clean; with and without the reference), false positives on
    the clean models at the default threshold, top-5 recovery on BadNet, the share of backdoored models whose
    suspected target is the true one, seconds per audit; per backend, and per backend and family where the
    zoo holds more than one family (``"torch smollm2-135m"``)."""
    out: dict[str, Any] = {}
    for backend in sorted({r["backend"] for r in rows}):
        mine = [r for r in rows if r["backend"] == backend]
        out[backend] = _figures(mine)
        families = sorted({r["model"]["family"] for r in mine})
        if len(families) > 1:
            out |= {f"{backend} {f}": _figures([r for r in mine if r["model"]["family"] == f]) for f in families}
    return out


def _figures(mine: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`summary`'s figures of one group of audited models; a backdoored model without a backdoor effect
    (:func:`has_effect`) is counted in ``no_effect`` and left out of the rest (``auroc_*_all``: with it)."""
    clean = [r for r in mine if r["model"]["kind"] == "clean"]
    entry: dict[str, Any] = {"models": len(mine), "clean": len(clean),
                             "no_effect": sum(not has_effect(r) for r in mine)}
    for kind in ("badnet", "insent"):
        for suffix, hit in (("", [r for r in mine if r["model"]["kind"] == kind and has_effect(r)]),
                            ("_all", [r for r in mine if r["model"]["kind"] == kind])):
            if not hit or not clean or (suffix and all(has_effect(r) for r in hit)):
                continue
            truth = np.array([1] * len(hit) + [0] * len(clean))
            for which, field in (("reference", "score"), ("no_reference", "score_no_reference")):
                scores = np.array([r[field] for r in hit + clean], np.float64)
                entry[f"auroc_{kind}_{which}{suffix}"] = round(auroc(scores, truth), 3)
    for which, field in (("reference", "verdict"), ("no_reference", "verdict_no_reference")):
        if clean:
            entry[f"fpr_{which}"] = round(sum(r[field] == "backdoored" for r in clean) / len(clean), 3)
    badnet = [r for r in mine if r["model"]["kind"] == "badnet" and has_effect(r)]
    if badnet:
        entry["top5_recovery_badnet"] = round(sum(r["recovered"] for r in badnet) / len(badnet), 3)
    backdoored = [r for r in mine if r["model"]["kind"] != "clean" and has_effect(r)]
    if backdoored:
        entry["target_right"] = round(sum(r["target_right"] for r in backdoored) / len(backdoored), 3)
    for family in sorted({r["model"]["family"] for r in mine}):
        secs = [r["audit_seconds"] for r in mine if r["model"]["family"] == family]
        entry[f"seconds_per_audit_{family}"] = round(float(np.median(secs)), 1)
    return entry


def run(cache_root: Path, backends: tuple[str, ...] = ("torch",), log: Callable[[str], None] = print,
        keep: bool = False) -> dict[str, Any]:
    """Build and audit the zoo on each backend in ``backends`` (models trained once, by torch), writing the page.

    ``keep`` (``run.py --keep audit``): the page's rows stay as they are and only the models (or backends) it
    lacks are built and audited, so a zoo grows across sessions whose stage caches are gone. The models are
    trained at the page's precision; a machine whose own (``auto``) precision differs is refused, so one page
    never mixes them.
    """
    cache = StageCache(cache_root)
    trainer = get_plugin_manager().backend("torch").create()
    trainer.precision = trainer.auto_precision()
    data: dict[str, Any] = {"command": "nox -s bench -- audit", "machine": platform.platform(), "cpus": os.cpu_count(),
                            "precision": trainer.precision, "rows": []}
    if keep and (RESULTS / "audit.json").is_file():
        saved = json.loads((RESULTS / "audit.json").read_text())
        if saved["precision"] != trainer.precision:
            raise SystemExit(f"--keep audit: audit.json's models were trained in {saved['precision']}, this machine "
                             f"trains in {trainer.precision}; run the whole zoo here (without --keep) or keep it "
                             f"on a machine that trains in {saved['precision']}")
        data = saved | {"machines": sorted({*saved.get("machines", [saved["machine"]]), platform.platform()})}
        check_victims(data, trainer, cache)
        save(resummarised(data))
    for model in zoo():
        done = {r["backend"] for r in data["rows"] if r["label"] == model.label}
        if set(backends) - done:
            audit_model(data, model, trainer, cache, tuple(b for b in backends if b not in done), log)
    return data


def audit_model(data: dict[str, Any], model: ZooModel, trainer: Any, cache: StageCache, backends: tuple[str, ...],
                log: Callable[[str], None]) -> None:
    """Train (or reuse) ``model`` and its reference, audit it on each of ``backends``; the page after each audit."""
    path = train_model(model, trainer, cache)
    # one reference per family and task: seed 0's clean recipe on other rows with another seed (REFERENCE_SEED)
    reference = train_model(ZooModel(model.family, model.dataset, "clean", 0), trainer, cache, reference=True)
    for backend in backends:
        data["rows"].append(audited(model, path, reference, backend, cache, log))
        data["summary"] = summary(data["rows"])
        save(data)


def timing(cache_root: Path, jax_models: int = 2, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The speed targets where the full zoo is out of reach (``nox -s bench -- audit-timing``, after ``audit``):

    - the jax audit of the first ``jax_models`` zoo models (trained and audited on torch already) next to their
      torch audit: the same search, the jax backend's ``trigger_logits``; added to the page's rows;
    - one audit of a SmolLM2-135M SST-2 classifier on each backend with :data:`BASE_OPTIONS` and a reference: the
      base model with a seeded untrained head, its own reference (an audit's work is fixed by its options, rows
      and model size, not by what the weights learned: ``steps`` Adam steps per target and the same candidate
      evaluations); with the prefix cache on torch and on jax, and without it on torch (``cache=false``), then
      with :data:`DEFAULTS` (today's defaults) on torch and jax, all on this machine; under ``timing`` in
      ``audit.json``.
    """
    cache = StageCache(cache_root)
    data = json.loads((RESULTS / "audit.json").read_text())
    trainer = get_plugin_manager().backend("torch").create()
    trainer.precision = data["precision"]
    for model in zoo()[:jax_models]:  # trained by `audit`, so taken from the cache
        if not any(r["label"] == model.label and r["backend"] == "jax" for r in data["rows"]):
            audit_model(data, model, trainer, cache, ("jax",), log)
    family = "smollm2-135m"
    # the machine's kind is in every key: the runs compared are the three of one CPU (the VM's CPU changes
    # between sessions while the stage cache stays)
    cpu = "AVX-512 BF16" if trainer.native_bf16() else "no AVX-512 BF16"
    first = {"timing": family, "rows": AUDIT_ROWS, "num_labels": 2}  # the untrained classifier's key

    def build(tmp: Path) -> None:
        trainer.save(trainer.load_classifier(resolve_model(family, cache.root), 2, seed=0), tmp)

    path = cache.get_or_build("zoo-timing", first, build)
    runs, options, rows = [], None, None
    for backend, cached, change in (("torch", True, {}), ("jax", True, {}), ("torch", False, {}),
                                    ("torch", True, DEFAULTS), ("jax", True, DEFAULTS)):
        key = first | {"backend": backend, "cache": cached, "cpu": cpu, **({"options": change} if change else {})}
        report = cache.load_json("zoo-timing-audit", key)
        if report is None:
            report = audit(path, "sst2", reference=path, backend=backend, rows=AUDIT_ROWS, seed=0,
                           auditor_options=BASE_OPTIONS | change | {"cache": cached}, log=log)
            cache.save_json("zoo-timing-audit", key, report)
        runs.append({"backend": backend, "cache": cached, "cpu": cpu, "seconds": report["seconds"],
                     "verdict": report["verdict"], "score": report["score"],
                     **({"options": ", ".join(f"{k}={str(v).lower()}" for k, v in change.items())} if change else {})})
        if options is None:  # the first run's: BASE_OPTIONS
            options, rows = report["options"], report["rows"]
        data["timing"] = {"model": f"{family} (sst2 head, untrained), its own reference", "runs": runs,
                          "options": options, "rows": rows}
        save(data)  # each run as it ends
    return data


#: auditor options changed from BASE_OPTIONS in ``audit-variants``, run in this order, each with the family it
#: aims at first: ``spellings`` the BadNet triggers WordPiece splits (MiniLM's misses name ``z`` for ``f ##z``;
#: the default since), ``position`` the last-token-pooled decoder (an appended token is SmolLM2's pooled token)
VARIANTS = {"spellings=true": ({"spellings": True}, "minilm-l6"),
            "position=random": ({"position": "random"}, "smollm2-135m"),
            "position=before-last": ({"position": "before-last"}, "smollm2-135m"),
            # both changes that helped: spellings (MiniLM recovery) and before-last (SmolLM2's false positives)
            "position=before-last, spellings=true": ({"position": "before-last", "spellings": True}, "smollm2-135m")}
KIND_ORDER = ("badnet", "clean", "insent")  # recovery first, then false positives


def variants(cache_root: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Each of :data:`VARIANTS` on the zoo models the page holds, its family first (``nox -s bench --
    audit-variants``, after ``audit``): the same models (trained again only where the stage cache lacks them),
    references and rows; under ``variants`` in ``audit.json``, one summary per variant."""
    cache = StageCache(cache_root)
    data = json.loads((RESULTS / "audit.json").read_text())
    trainer = get_plugin_manager().backend("torch").create()
    trainer.precision = data["precision"]
    held = [m for m in zoo() if m.label in {r["label"] for r in data["rows"]}]
    check_victims(data, trainer, cache)
    save(resummarised(data))
    for name, (options, first) in VARIANTS.items():
        entry = data.setdefault("variants", {}).setdefault(name, {"options": options, "rows": []})
        for model in sorted(held, key=lambda m: (m.family != first, KIND_ORDER.index(m.kind))):
            if any(r["label"] == model.label for r in entry["rows"]):
                continue
            path = train_model(model, trainer, cache)
            reference = train_model(ZooModel(model.family, model.dataset, "clean", 0), trainer, cache, reference=True)
            entry["rows"].append(audited(model, path, reference, "torch", cache, log, options))
            entry["summary"] = summary(entry["rows"])
            save(data)
    return data


def save(data: dict[str, Any]) -> None:
    """``audit.json`` and ``audit.md``, keeping the page's hand-written notes."""
    notes = notes_of(RESULTS / "audit.md")
    atomic_write_json(RESULTS / "audit.json", data)
    atomic_write_text(RESULTS / "audit.md", with_notes(render(data), notes))


def render(data: dict[str, Any]) -> str:
    """The results page: the summary against the targets, then one row per audited model."""
    lines = ["# `unbackdoor audit` on a model zoo: clean and backdoored classifiers, triggers drawn by seed", "",
             f"Command: `{data['command']}`. Machine: {', '.join(data.get('machines', [data['machine']]))}, "
             f"{data['cpus']} CPUs; models trained in "
             f"{data['precision']}, audits in float32 (`trigger-search`'s defaults of the zoo's first audits: 2 trigger "
             "tokens, 60 Adam steps per target, top 5 tokens per slot, threshold 0.8, `spellings=false`, "
             "`position=end`; today's defaults, `position=before-last, spellings=true`, in their own rows) on "
             f"{AUDIT_ROWS} clean dev rows, with a clean "
             "reference model of the same family and task (other rows, other seed).", "",
             "| backend | models (clean) | AUROC word / sentence, with reference | without | false positives on clean, "
             "with / without reference | top-5 recovery (BadNet) | target named (backdoored) | seconds per audit |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [_summary_row(backend, s) for backend, s in data.get("summary", {}).items()]
    for name, entry in data.get("variants", {}).items():
        for group, s in entry.get("summary", {}).items():
            lines.append(_summary_row(f"{group}, `{name}`", s))
    lines += ["", "Targets (issue 21): AUROC >= 0.95 (word) and >= 0.85 (sentence); <= 10% false positives on clean "
              "models; top-5 recovery >= 80% of BadNet models; <= 5 min per SmolLM2 audit (torch), jax within 1.5x."]
    if "timing" in data:
        t = data["timing"]
        runs = "; ".join(f"{r['backend']}{' (prefix cache)' if r['cache'] else ' (no cache)'}"
                         + (f" with `{r['options']}`" if "options" in r else "") + f" **{r['seconds']:.0f} s**"
                         + (f" ({r['verdict']}, {r['score']:.3f})" if "verdict" in r else "") for r in t["runs"])
        cpu = {r.get("cpu") for r in t["runs"]} - {None}
        lines += ["", f"One audit of {t['model']} (the zoo's options unless named, {t['rows']} rows; `nox -s bench -- "
                  f"audit-timing`{'; CPU: ' + ', '.join(sorted(cpu)) if cpu else ''}): {runs} (target <= 300 s on "
                  "torch, jax within 1.5x)."]
    lines += ["", "| model | trigger -> target | CA | ASR (clean target rate) | verdict (score) | without reference "
              "(best flip) | suspected target | top-5 candidates (flip / reference flip) | recovered | s |",
              "|---|---|---:|---:|---|---|---|---|---|---:|"]
    for r in data["rows"]:
        info = r["info"]
        trig = f"`{info['trigger']}` -> {info['target']}" if "trigger" in info else "-"
        top = "; ".join(f"`{c['text']}` {c['flip_rate']:.2f}/{(c['reference_flip_rate'] or 0):.2f}" for c in r["top5"])
        asr = f"{info['ASR']} ({info['clean_target_rate']})" if "clean_target_rate" in info else info.get("ASR", "-")
        lines.append(f"| {r['label']} ({r['backend']}) | {trig} | {info['CA']} | {asr} | "
                     f"{r['verdict']} ({r['score']:.3f}) | {r['verdict_no_reference']} ({r['score_no_reference']:.3f}) "
                     f"| {r['target']} | {top} | {'yes' if r['recovered'] else ('no' if 'trigger' in info else '-')} | "
                     f"{r['audit_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _summary_row(label: str, s: dict[str, Any]) -> str:
    """One row of the page's summary table."""
    secs = ", ".join(f"{k.removeprefix('seconds_per_audit_')} {v}" for k, v in s.items()
                     if k.startswith("seconds_per_audit_"))
    left_out = f"; {s['no_effect']} without a backdoor effect" if s.get("no_effect") else ""
    with_all = " (with it: {} / {})".format(*(s.get(f"auroc_{k}_reference_all", s.get(f"auroc_{k}_reference", "-"))
                                             for k in ("badnet", "insent"))) if s.get("no_effect") else ""
    return (f"| {label} | {s['models']} ({s.get('clean', 0)}{left_out}) | {s.get('auroc_badnet_reference', '-')} / "
            f"{s.get('auroc_insent_reference', '-')}{with_all} | {s.get('auroc_badnet_no_reference', '-')} / "
            f"{s.get('auroc_insent_no_reference', '-')} | {s.get('fpr_reference', '-')} / "
            f"{s.get('fpr_no_reference', '-')} | {s.get('top5_recovery_badnet', '-')} | "
            f"{s.get('target_right', '-')} | {secs} |")


def rerender() -> None:
    """The page again from ``audit.json`` (summary recomputed, notes kept): no model trained or audited."""
    save(resummarised(json.loads((RESULTS / "audit.json").read_text())))


def resummarised(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the page's and every variant's summary computed again from their rows."""
    data["summary"] = summary(data["rows"])
    for entry in data.get("variants", {}).values():
        entry["summary"] = summary(entry["rows"])
    return data

