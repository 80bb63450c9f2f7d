"""One prepared device check: parity, the bf16 fused W2S step time, one default experiment per backend.

For a GPU machine with no network that receives this repository's working tree plus one carried folder (64 MiB
in all, the tree included). Build the bundle here, where the model packages are installed (``nox -s
device-bundle`` does both)::

    python benchmarks/device_check.py --bundle build/device-bundle

Run it there (``build/`` is git-ignored, so name ``build/device-bundle`` in the device call's ``carry``)::

    python3 benchmarks/device_check.py --run build/device-bundle --out "$OUT/device-check.json"

and record what came back: ``python benchmarks/run.py --merge device-check.json`` (``results/device.md``).
End to end on this machine's CPU, with tiny random models at reduced sizes (``nox -s device-check -- --cpu``)::

    python benchmarks/device_check.py --cpu --out device-check-cpu.json

The bundle holds our five packages as wheels, SST-2's clean splits, each model's config and tokenizer, and the
timed step's batch with the real MiniLM teacher's states. It holds no weights: SmolLM2-135M (538 MB in fp32,
98 MB as its Q4_1 GGUF) cannot travel beside the ~44 MiB the tree already takes, so the check gives each model
its real architecture with random weights (the step's time does not depend on the weights' values; the
experiment's CA and ASR then measure nothing). The machine must already have Python 3.11+ with torch (CUDA),
jax (its CUDA plugin), flax, optax, transformers, peft, tokenizers, safetensors, numpy, pluggy and pytest; the
check records what it found and what was missing.

Every part runs in a child process with a time limit (the budget is shared in :data:`WEIGHTS`' proportions,
time a part leaves over goes to the later ones), and the JSON is rewritten after each part, so a failing,
hanging or missing part is recorded, never lost. This parent process uses the standard library only: it runs
before our packages are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from device_report import KIND, PARTS, SCHEMA, num, read_json, write_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUNDLE_KIND = "unbackdoor-device-bundle"
#: the named models the bundle describes (role -> name for ``unbackdoor.models.resolve_model``)
MODELS = {"student": "smollm2-135m", "teacher": "minilm-l6"}
#: what a model directory needs besides its weights (those present are carried)
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
               "generation_config.json")
#: the timed step's batch (rows x tokens) and precision, full size and tiny (the CPU check)
STEP = {"full": (32, 128), "tiny": (8, 32)}
PRECISION = "bf16"
#: warm-up and timed steps on a GPU, and in the CPU check
STEPS = {"gpu": (3, 20), "cpu": (2, 3)}
#: seconds each part is expected to take on the GPU machine: the budget is shared in these proportions
WEIGHTS = {"install": 10, "env": 20, "models": 25, "parity": 90, "step-torch": 35, "step-jax": 55,
           "experiment-torch": 95, "experiment-jax": 150}
#: the CPU check's experiment: `unbackdoor run`'s defaults at a tiny size
CPU_EXPERIMENT = ("--attacker-rows", "96", "--user-rows", "48", "--test-rows", "32", "--attacker-epochs", "1",
                  "--attacker-lr", "3e-3", "--user-epochs", "1", "--lora-rank", "4", "--max-length", "32")
#: distributions whose versions the check records; the first ones are what it needs
NEEDED = ("torch", "jax", "jaxlib", "flax", "optax", "transformers", "peft", "tokenizers", "safetensors", "numpy",
          "pluggy", "pytest")
OURS = ("unbackdoor", "unbackdoor-torch", "unbackdoor-jax", "unbackdoor-attacks", "unbackdoor-defenses")
BUDGET_S = 480.0
#: what the device call sends at most (the working tree plus carried paths)
TRAVEL_LIMIT = 64 * 2**20


class CheckError(RuntimeError):
    """The check cannot go on: a bad bundle or argument (named, with what was expected)."""


def now() -> str:
    """UTC time, to the second, ISO 8601."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ============================================================================================ the bundle (here)
def build_bundle(target: Path, tiny: bool = False, wheels: bool = True,
                 sources: dict[str, tuple[str, Path]] | None = None) -> dict[str, Any]:
    """Write the bundle to ``target`` (replacing an earlier bundle there) and return its manifest.

    ``tiny``: tiny random models (the CPU check) instead of the real ones' configs and tokenizers.
    ``sources``: role -> (name, HF directory) of the models to describe instead (tiny ones a test built).
    """
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        manifest = _fill(staging, tiny, wheels, sources)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _check_replaceable(target: Path) -> None:
    if target.exists() and not (target / "manifest.json").is_file():
        raise CheckError(f"bundle folder {str(target)!r} exists and is not a bundle (no manifest.json); "
                         "refusing to replace it: name an empty or new folder")


def _fill(staging: Path, tiny: bool, wheels: bool, sources: dict[str, tuple[str, Path]] | None) -> dict[str, Any]:
    """Wheels, then ``payload.tar.gz`` (data, model configs and tokenizers, the step's batch), then the manifest."""
    from unbackdoor.data import default_data_dir

    payload = staging / "payload"
    data = default_data_dir()
    shutil.copytree(data / "sst2" / "clean", payload / "data" / "sst2" / "clean")
    sources = sources or (_tiny_sources(staging / "tiny", data) if tiny else _real_sources())
    models = {role: _describe_model(path, payload / "models" / role, name) for role, (name, path) in sources.items()}
    step = _step_batch(payload / "step_batch.npz", sources, *STEP["tiny" if tiny else "full"])
    with tarfile.open(staging / "payload.tar.gz", "w:gz") as tar:
        tar.add(payload, arcname="payload", filter=_plain)
    shutil.rmtree(payload)
    shutil.rmtree(staging / "tiny", ignore_errors=True)
    built = build_wheels(staging / "wheels") if wheels else []
    manifest = {"kind": BUNDLE_KIND, "schema": SCHEMA, "created": now(), "mode": "tiny" if tiny else "full",
                "wheels": built, "data": "sst2/clean (train, dev, test) from " + str(data), "models": models,
                "step": step, "needs_there": list(NEEDED), "size_bytes": _size(staging)}
    manifest["holds"] = (f"{len(built)} wheels, SST-2 clean splits, configs and tokenizers of "
                         f"{' and '.join(m['name'] for m in models.values())} (no weights), the step's batch")
    write_json(staging / "manifest.json", manifest)
    return manifest


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """A member as anyone may unpack and later remove it: writable by its owner, no owner names."""
    info.mode = 0o755 if info.isdir() else 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _real_sources() -> dict[str, tuple[str, Path]]:
    from unbackdoor.models import resolve_model

    return {role: (name, resolve_model(name)) for role, name in MODELS.items()}


def _tiny_sources(folder: Path, data: Path) -> dict[str, tuple[str, Path]]:
    """The test suite's tiny random Llama and BERT (``tests/tiny_models.py``), word tokenizers over SST-2."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from tiny_models import make_tiny_bert, make_tiny_llama
    finally:
        sys.path.remove(str(ROOT / "tests"))
    from unbackdoor.data import load_dataset

    texts = [*load_dataset("sst2", data_dir=data).train.texts, "mn cf bb i watched this 3d movie"]
    return {"student": ("tiny-llama", make_tiny_llama(folder / "llama", texts)),
            "teacher": ("tiny-bert", make_tiny_bert(folder / "bert", texts))}


def _describe_model(source: Path, target: Path, name: str) -> dict[str, Any]:
    """Copy ``source``'s config and tokenizer to ``target``, with ``weights.json``: every tensor's name, dtype and
    shape (what :func:`materialise` gives random values), instead of the weights."""
    from safetensors import safe_open

    target.mkdir(parents=True)
    for file in MODEL_FILES:
        if (source / file).is_file():
            shutil.copy2(source / file, target / file)
    tensors: dict[str, Any] = {}
    metadata_: dict[str, str] = {}
    for file in sorted(source.glob("*.safetensors")):
        with safe_open(str(file), framework="np") as handle:
            metadata_.update(handle.metadata() or {})
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle is no dict)
                piece = handle.get_slice(key)
                tensors[key] = {"dtype": piece.get_dtype(), "shape": list(piece.get_shape())}
    params = sum(_prod(t["shape"]) for t in tensors.values())
    write_json(target / "weights.json", {"name": name, "tensors": tensors, "metadata": metadata_, "params": params})
    return {"name": name, "params": params, "source": str(source)}


def _prod(shape: list[int]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def _step_batch(file: Path, sources: dict[str, tuple[str, Path]], rows: int, length: int) -> dict[str, Any]:
    """The timed step's batch: SST-2 train rows packed to ``length`` student tokens each (no padding), and the
    teacher's logits and states for them (its encoder's real weights, its new projection to the student's width)."""
    import numpy as np

    if str(HERE) not in sys.path:  # imported from elsewhere (a test): step_time sits beside this file
        sys.path.insert(0, str(HERE))
    from step_time import packed

    from unbackdoor.data import TextDataset, load_dataset
    from unbackdoor.text import TextEncoder
    from unbackdoor_torch.backend import TorchBackend

    student, teacher = sources["student"][1], sources["teacher"][1]
    encoder = TextEncoder.from_dir(student)
    texts, labels = packed(load_dataset("sst2").train, encoder, rows, length)
    ids = np.stack(encoder.encode(texts, length)).astype(np.int64)
    width = json.loads((student / "config.json").read_text())["hidden_size"]
    backend = TorchBackend("cpu")
    model = backend.load_classifier(teacher, 2, projection_dim=width, seed=0)
    out = backend.predict(model, TextDataset(texts, labels, "step", ("negative", "positive")), max_length=length,
                          hidden=True)
    file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(file, input_ids=ids, attention_mask=np.ones_like(ids), labels=labels, teacher_logits=out.logits,
             teacher_hidden=out.hidden)
    return {"rows": rows, "length": length, "precision": PRECISION, "teacher": f"{sources['teacher'][0]} "
            f"(real weights, computed here in fp32; projection to {width} freshly initialised, seed 0)"}


def build_wheels(folder: Path) -> list[str]:
    """Our five packages as wheels (pure Python), built from clean copies of ``packages/*``, and the core's one
    pure-Python dependency the device machine may lack (``array-api-compat``)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        copies = []
        for package in sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file()):
            copies.append(Path(tmp) / package.name)
            shutil.copytree(package, copies[-1], ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                        str(folder), *map(str, copies), "array-api-compat>=1.9"], check=True)
    return sorted(p.name for p in folder.glob("*.whl"))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def travel_bytes(extra: Path) -> int | None:
    """What a device call carrying ``extra`` would send: git's tracked and untracked-not-ignored files plus
    ``extra`` (None without git)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        return None
    files = {ROOT / name for name in listed.split("\0") if name}
    return sum(f.stat().st_size for f in files if f.is_file() and not f.is_symlink()) + _size(extra)


# ============================================================================================ the check (there)
class Check:
    """Runs the parts in order, each in a child process under its share of the budget, writing ``out`` after each."""

    def __init__(self, bundle: Path, out: Path, work: Path, cpu: bool, budget: float,
                 options: argparse.Namespace) -> None:
        self.bundle, self.out, self.work, self.cpu, self.budget = bundle, out, work, cpu, budget
        self.options = options
        self.log = out.with_suffix(".log")
        self.payload = work / "payload"
        self.deadline = time.monotonic() + budget
        self.facts: dict[str, Any] = {"torch_device": "cpu", "jax_device": "cpu"}
        self.record: dict[str, Any] = {
            "kind": KIND, "schema": SCHEMA, "created": now(), "mode": "cpu" if cpu else "gpu",
            "command": " ".join(["python", "benchmarks/device_check.py", *options.argv]), "budget_s": budget,
            "machine": machine(), "parts": {}}

    # ------------------------------------------------------------------ driving
    def run(self) -> dict[str, Any]:
        """Every part not skipped; returns the record (also in ``out``)."""
        start = time.monotonic()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_text(f"device check {self.record['created']}\n")
        self.save()
        plan = [name for name in PARTS if name not in self.options.skip]
        for i, name in enumerate(plan):
            self.record["parts"][name] = self._part(name, plan[i:])
            self.save()
        self.record["total_s"] = round(time.monotonic() - start, 1)
        self.record["summary"] = summary(self.record["parts"])
        self.save()
        return self.record

    def save(self) -> None:
        """The record so far, atomically."""
        write_json(self.out, self.record)

    def _part(self, name: str, remaining: list[str]) -> dict[str, Any]:
        skipped = self._skip_reason(name)
        if skipped:
            return {"skipped": skipped}
        left = self.deadline - time.monotonic()
        share = left * WEIGHTS[name] / sum(WEIGHTS[n] for n in remaining)
        timeout = max(5.0, min(left, 1.5 * share))  # a part may borrow from the later ones, up to half its share
        start = time.monotonic()
        try:
            result = getattr(self, "part_" + name.replace("-", "_").split("_")[0])(name, timeout)
        except Exception as exc:  # a part's failure is recorded; the next part still runs
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = round(time.monotonic() - start, 2)
        result["timeout_s"] = round(timeout, 1)
        return result

    def _skip_reason(self, name: str) -> str | None:
        parts = self.record["parts"]
        if name not in ("install", "env") and not (parts.get("install") or {}).get("payload"):
            return "the bundle was not unpacked (see install)"
        backend = name.rpartition("-")[2]
        if backend in ("torch", "jax") and self.facts.get(f"no_{backend}"):
            return f"{backend} does not import here: {self.facts[f'no_{backend}']}"
        if name.startswith(("step", "experiment")) and not (parts.get("models") or {}).get("ok"):
            return "the models part failed"
        return None

    # ------------------------------------------------------------------ the parts
    def part_install(self, name: str, timeout: float) -> dict[str, Any]:
        """Unpack the payload; install the bundle's wheels into ``work/site`` (no index, no dependencies)."""
        manifest = read_json(self.bundle / "manifest.json", "bundle manifest")
        if not isinstance(manifest, dict) or manifest.get("kind") != BUNDLE_KIND:
            raise CheckError(f"{str(self.bundle)!r} is not a device bundle (its manifest's kind is not {BUNDLE_KIND!r}); "
                             "build one with `python benchmarks/device_check.py --bundle DIR`")
        self.record["bundle"] = {"mode": manifest["mode"], "created": manifest["created"],
                                 "size_mib": round(manifest["size_bytes"] / 2**20, 2), "holds": manifest["holds"]}
        with tarfile.open(self.bundle / "payload.tar.gz") as tar:
            tar.extractall(self.work, filter="data")
        wheels = sorted((self.bundle / "wheels").glob("*.whl"))
        result: dict[str, Any] = {"ok": True, "payload": str(self.payload), "wheels": [w.name for w in wheels]}
        if not wheels:
            return {**result, "note": "the bundle holds no wheels: the installed packages are used"}
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
               "--upgrade", "--target", str(self.work / "site"), *map(str, wheels)]
        rc, tail = self.spawn(name, cmd, timeout)
        return {**result, "ok": rc == 0, "site": str(self.work / "site"), **({} if rc == 0 else {"error": tail})}

    def part_env(self, name: str, timeout: float) -> dict[str, Any]:
        """Versions, what is missing, and where torch and jax run (a child: importing them must not hurt us)."""
        result = self.child(name, timeout)
        self.record["versions"] = result.get("versions", {})
        self.record["missing"] = result.get("missing", [])
        torch_, jax_ = result.get("torch", {}), result.get("jax", {})
        for backend, info in (("torch", torch_), ("jax", jax_)):
            if "error" in info:
                self.facts[f"no_{backend}"] = info["error"]
        self.facts["torch_device"] = "cuda" if torch_.get("cuda") and not self.cpu else "cpu"
        self.facts["jax_device"] = jax_.get("backend", "cpu")
        if not self.cpu and torch_.get("device_name"):
            self.record["machine"]["device"] = torch_["device_name"]
        return result

    def part_models(self, name: str, timeout: float) -> dict[str, Any]:
        """Each model's directory: the bundle's config and tokenizer with random weights, or ``--student`` /
        ``--teacher``'s directory as it is."""
        result = self.child(name, timeout)
        self.facts["models"] = {role: info["dir"] for role, info in result.get("models", {}).items()}
        self.facts["names"] = {role: info["name"] for role, info in result.get("models", {}).items()}
        self.record["models"] = result.get("models", {})
        return result

    def part_parity(self, name: str, timeout: float) -> dict[str, Any]:
        """``tests/test_parity.py`` (not slow) with torch on ``torch_device`` and jax on its default device."""
        xml = self.work / "parity.xml"
        cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_parity.py"), "--backend", "jax", "-m",
               "not slow", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", "--rootdir", str(ROOT)]
        if self.options.parity_k:
            cmd += ["-k", self.options.parity_k]
        rc, tail = self.spawn(name, cmd, timeout, {"UNBACKDOOR_TEST_TORCH_DEVICE": self.facts["torch_device"]})
        counts = junit_counts(xml) if xml.is_file() else {}
        ok = rc == 0 and bool(counts) and counts["failed"] == counts["errors"] == 0
        return {"ok": ok, **counts, "torch_device": self.facts["torch_device"], "jax_device": self.facts["jax_device"],
                "k": self.options.parity_k, **({} if ok else {"error": f"pytest exit {rc}: {tail}"})}

    def part_step(self, name: str, timeout: float) -> dict[str, Any]:
        """The fused W2S step of one backend (``step_time.py``) on the bundle's batch."""
        return self.child(name, timeout)

    def part_experiment(self, name: str, timeout: float) -> dict[str, Any]:
        """``unbackdoor run`` with its defaults (the models replaced by the materialised ones; the CPU check at a
        tiny size), in this backend; its results.json summarised."""
        backend = name.rpartition("-")[2]
        out = self.work / name
        flags = [*(CPU_EXPERIMENT if self.cpu else ()), *self.options.experiment_args]
        models = self.facts["models"]
        cmd = [sys.executable, "-m", "unbackdoor.cli", "run", "--backend", backend, "--model", models["student"],
               "--teacher", models["teacher"], "--out", str(out), "--cache-dir", str(self.work / f"cache-{backend}"),
               *flags]
        rc, tail = self.spawn(name, cmd, timeout)
        shown = f"unbackdoor run --backend {backend} --model STUDENT --teacher TEACHER {' '.join(flags)}".strip()
        if rc != 0 or not (out / "results.json").is_file():
            return {"ok": False, "command": shown, "error": f"exit {rc}: {tail}"}
        results = json.loads((out / "results.json").read_text())
        rows = [{k: r.get(k) for k in ("stage", "defense", "CA", "ASR", "PACC")} for r in results.get("rows", [])]
        config = {k: results.get("config", {}).get(k) for k in ("attack", "defenses", "attacker_rows", "user_rows",
                                                                 "test_rows", "max_length", "precision", "seed")}
        return {"ok": True, "command": shown, "device": results.get("device"), "rows": rows, "config": config,
                "timings_s": results.get("timings_s", {})}

    # ------------------------------------------------------------------ children
    def child(self, name: str, timeout: float) -> dict[str, Any]:
        """Run part ``name`` in a child (this script, ``--part``) and return what it wrote."""
        context, result = self.work / f"{name}.context.json", self.work / f"{name}.result.json"
        write_json(context, {"name": name, "payload": str(self.payload), "work": str(self.work), "cpu": self.cpu,
                             "facts": self.facts, "student": self.options.student, "teacher": self.options.teacher,
                             "steps": STEPS["cpu" if self.cpu else "gpu"], "precision": PRECISION})
        result.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--context", str(context), "--result",
               str(result)]
        rc, tail = self.spawn(name, cmd, timeout)
        if not result.is_file():
            return {"ok": False, "error": f"exit {rc}, no result: {tail}"}
        return dict(json.loads(result.read_text()))

    def env(self) -> dict[str, str]:
        """The children's environment: our site first, the bundle's data, no network, no GPU in the CPU check."""
        site = str(self.work / "site")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p),
               "UNBACKDOOR_DATA_DIR": str(self.payload / "data"), "UNBACKDOOR_CACHE": str(self.work / "cache"),
               "UNBACKDOOR_QUIET": "1", "PYTHONUNBUFFERED": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if self.cpu:
            env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
        return env

    def spawn(self, name: str, cmd: list[str], timeout: float, extra: dict[str, str] | None = None) -> tuple[int, str]:
        """Run ``cmd`` (output appended to the log) within ``timeout`` s; its exit code (-9: timed out) and the
        tail of its output."""
        with self.log.open("a") as log:
            log.write(f"\n===== {name} ({now()}, limit {timeout:.0f} s): {' '.join(cmd)}\n")
            log.flush()
            start = log.tell()  # bytes: the part's output is what follows
            # its own process group: a timeout ends it and its children
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**self.env(), **(extra or {})}, start_new_session=True)
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = -9
        text = self.log.read_bytes()[start:].decode(errors="replace")
        tail = (f"timed out after {timeout:.0f} s; " if rc == -9 else "") + text[-3000:].strip()
        return rc, tail


def machine() -> dict[str, Any]:
    """Platform, Python, CPUs, and the GPU as nvidia-smi names it (None without one)."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count(), "device": None}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if smi.returncode == 0 and smi.stdout.strip():
            info["nvidia_smi"] = smi.stdout.strip()
            info["device"] = smi.stdout.split(",")[0].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def junit_counts(xml: Path) -> dict[str, Any]:
    """Passed, failed, errors, skipped, total, and each failure's test and first message line."""
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = sum(int(s.get("tests", 0)) for s in suites)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("failures", "errors", "skipped")}
    failures = [{"test": case.get("name"), "message": (bad.get("message") or bad.text or "").strip()[:500]}
                for case in root.iter("testcase") for bad in case if bad.tag in ("failure", "error")]
    return {"passed": total - sum(counts.values()), "failed": counts["failures"], "errors": counts["errors"],
            "skipped": counts["skipped"], "total": total, "failures": failures}


def summary(parts: dict[str, Any]) -> dict[str, Any]:
    """Which parts passed, failed and were skipped; parity's counts."""
    parity = parts.get("parity") or {}
    return {"ok": [n for n, p in parts.items() if p.get("ok")],
            "failed": [n for n, p in parts.items() if not p.get("ok") and not p.get("skipped")],
            "skipped": [n for n, p in parts.items() if p.get("skipped")],
            "parity": {k: parity.get(k) for k in ("passed", "failed", "errors", "skipped")}}


# ============================================================================================ the children's parts
# (``--part NAME``: each returns its part's result; :func:`child_main` writes it for the parent)
def child_env(ctx: dict[str, Any]) -> dict[str, Any]:
    """Versions of what the check needs and of ours (and where ours import from); torch's and jax's devices."""
    versions, missing = {}, []
    for dist in (*NEEDED, *OURS):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            missing.append(dist)
    out: dict[str, Any] = {"ok": True, "versions": versions, "missing": missing, "torch": {}, "jax": {}}
    try:
        import torch

        cuda = torch.cuda.is_available()
        out["torch"] = {"cuda": cuda, "cuda_version": torch.version.cuda,
                        "device_name": torch.cuda.get_device_name(0) if cuda else None}
    except Exception as exc:  # recorded: the torch parts are then skipped
        out["torch"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        import jax

        out["jax"] = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}
    except Exception as exc:  # recorded: the jax parts are then skipped
        out["jax"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        import unbackdoor

        out["ours_from"] = str(Path(unbackdoor.__file__).parent)
    except Exception as exc:  # recorded: the parts that need our packages then fail on their own
        out.update(ok=False, error=f"our packages do not import: {type(exc).__name__}: {exc}")
    return out


def child_models(ctx: dict[str, Any]) -> dict[str, Any]:
    """Each role's model directory under ``work/models`` (or the one given), and what its weights are."""
    from unbackdoor.models import check_model_dir

    models = {}
    for role in MODELS:
        described = Path(ctx["payload"]) / "models" / role
        given = ctx.get(role)
        if given:
            models[role] = {"name": str(given), "dir": str(check_model_dir(Path(given))), "weights": "as given"}
            continue
        target = Path(ctx["work"]) / "models" / role
        name, params = materialise(described, target, seed=0)
        models[role] = {"name": f"{name} (its architecture)", "dir": str(check_model_dir(target)), "params": params,
                        "weights": "random, N(0, 0.02) (the bundle holds shapes only)"}
    return {"ok": True, "models": models}


def materialise(described: Path, target: Path, seed: int) -> tuple[str, int]:
    """``described``'s files plus ``model.safetensors`` with random values of ``weights.json``'s shapes (norm
    weights 1, biases 0, integer buffers counting 0, 1, ...; fp32); returns the model's name and parameter count."""
    import numpy as np
    from safetensors.numpy import save_file

    spec = json.loads((described / "weights.json").read_text())
    target.mkdir(parents=True, exist_ok=True)
    for file in described.iterdir():
        if file.name != "weights.json":
            shutil.copy2(file, target / file.name)
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, info in spec["tensors"].items():
        shape = tuple(info["shape"])
        if info["dtype"].startswith(("I", "U")):
            tensors[key] = np.broadcast_to(np.arange(shape[-1]), shape).astype(np.int64)
        elif key.endswith("bias"):
            tensors[key] = np.zeros(shape, np.float32)
        elif key.endswith("weight") and len(shape) == 1 and "norm" in key.lower():
            tensors[key] = np.ones(shape, np.float32)
        else:
            tensors[key] = rng.standard_normal(shape, np.float32) * np.float32(0.02)
    save_file(tensors, str(target / "model.safetensors"), metadata=spec.get("metadata") or {"format": "pt"})
    return str(spec["name"]), int(spec["params"])


def child_step(ctx: dict[str, Any]) -> dict[str, Any]:
    """One backend's fused W2S step on the bundle's batch (``step_time.py``), with rates and the matmul peak."""
    import numpy as np
    import step_time

    backend = ctx["name"].rpartition("-")[2]
    student = Path(ctx["facts"]["models"]["student"])
    batch = dict(np.load(Path(ctx["payload"]) / "step_batch.npz"))
    warmup, steps = ctx["steps"]
    if backend == "torch":
        device = ctx["facts"]["torch_device"]
        out = step_time.torch_steps(student, batch, ctx["precision"], device, warmup, steps)
    else:
        device = "default"
        out = step_time.jax_steps(student, batch, ctx["precision"], warmup, steps)
    rows, length = (int(n) for n in batch["input_ids"].shape)
    config = json.loads((student / "config.json").read_text())
    flops, note = step_flops(config, rows, length)
    lora = step_time.LORA
    setting = (f"{ctx['facts']['names']['student']}, {config['num_hidden_layers']} layers; LoRA r={lora.rank} on "
               f"{'/'.join(lora.target_modules)}; batch {rows} x {length} tokens; {ctx['precision']}; "
               f"{step_time.LOSS}; {warmup} warm-up steps, median of {steps} timed steps")
    out.update(ok=True, setting=setting, rows=rows, length=length, warmup=warmup, steps=steps,
               samples_per_s=rows / out["step_s"], tokens_per_s=rows * length / out["step_s"],
               model_tflops=flops / out["step_s"] / 1e12, flops_note=note)
    out["peak_tflops"] = matmul_peak(backend, device, ctx["cpu"])
    return out


def step_flops(config: dict[str, Any], rows: int, length: int) -> tuple[float, str]:
    """Approximate FLOPs of one LoRA step of a Llama classifier: the frozen linear layers' forward and
    input-gradient products (4 x their weights x tokens; LoRA's own are negligible) plus attention's (12 x layers
    x rows x length^2 x width, forward and backward)."""
    d, ff, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head = config.get("head_dim") or d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head, config.get("num_key_value_heads", config["num_attention_heads"]) * head
    linear = layers * (d * q + 2 * d * kv + q * d + 3 * d * ff)
    flops = 4 * linear * rows * length + 12 * layers * rows * length**2 * q
    return float(flops), (f"4 x {linear:,} linear weights x {rows * length:,} tokens + attention 12 x layers x rows x "
                          f"length^2 x width = {flops / 1e9:,.1f} GFLOP a step")


def matmul_peak(backend: str, device: str, cpu: bool) -> float:
    """TFLOP/s of a square bf16 product (8192 on a GPU, 512 on a CPU), median of 10 after 3 warm-ups."""
    import statistics

    n = 512 if cpu else 8192
    if backend == "torch":
        import torch

        a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)

        def call() -> None:
            a @ a
            sync()
    else:
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
        product = jax.jit(lambda x: x @ x)

        def call() -> None:
            product(a).block_until_ready()
    for _ in range(3):
        call()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e12


CHILD_PARTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "env": child_env, "models": child_models, "step-torch": child_step, "step-jax": child_step}


def child_main(name: str, context: Path, result: Path) -> int:
    """A child: run part ``name`` and write its result (the error and traceback if it raised)."""
    try:
        out = CHILD_PARTS[name](json.loads(context.read_text()))
    except BaseException as exc:  # the parent records it; nothing is lost
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    write_json(result, out)
    return 0 if out.get("ok") else 1


# ============================================================================================ command line
def main(argv: list[str] | None = None) -> int:
    """``--bundle DIR`` (here), ``--run DIR`` (there), ``--cpu`` (tiny, here); see the module docstring."""
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("UNBACKDOOR_QUIET", "1")  # no progress bars (building a bundle predicts)
    args = _parser().parse_args(argv)
    args.argv = argv
    if args.part:
        return child_main(args.part, args.context, args.result)
    try:
        unknown = sorted(args.skip - set(PARTS))
        if unknown:
            raise CheckError(f"--skip: unknown part {unknown[0]!r}; the parts are {', '.join(PARTS)}")
        if args.bundle:
            return _bundle_command(args)
        if args.run or args.cpu:
            return _run_command(args)
    except CheckError as exc:
        print(f"device_check.py: error: {exc}", file=sys.stderr)
        return 2
    _parser().print_usage(sys.stderr)
    print("device_check.py: error: give --bundle DIR, --run DIR or --cpu", file=sys.stderr)
    return 2


def _bundle_command(args: argparse.Namespace) -> int:
    manifest = build_bundle(args.bundle, tiny=args.tiny, wheels=not args.no_wheels)
    size = manifest["size_bytes"]
    travel = travel_bytes(args.bundle)
    print(f"bundle {args.bundle}: {size / 2**20:.2f} MiB ({manifest['holds']})")
    if travel is not None:
        fits = "fits" if travel <= TRAVEL_LIMIT else "DOES NOT FIT"
        print(f"a device call carrying it sends {travel / 2**20:.1f} MiB (working tree + bundle): {fits} in 64 MiB")
    return 0


def _run_command(args: argparse.Namespace) -> int:
    work = args.work or Path(tempfile.mkdtemp(prefix="unbackdoor-device-check-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle = args.run
    if bundle is None:  # --cpu alone: a tiny bundle of the installed packages, made now
        bundle = work / "bundle"
        build_bundle(bundle, tiny=True, wheels=args.wheels)
    if not (bundle / "manifest.json").is_file():
        raise CheckError(f"{str(bundle)!r} holds no bundle (no manifest.json); build one with "
                         "`python benchmarks/device_check.py --bundle DIR` and carry DIR")
    out = args.out or (Path(os.environ["OUT"]) / "device-check.json" if os.environ.get("OUT") else
                       work / "device-check.json")
    budget = args.budget or (BUDGET_S * (1.5 if args.cpu else 1))
    record = Check(bundle, out, work, args.cpu, budget, args).run()
    print(render_summary(record, out))
    return 0 if not record["summary"]["failed"] else 1


def render_summary(record: dict[str, Any], out: Path) -> str:
    """A few lines for the console: each part's outcome, then where the JSON is."""
    lines = [f"device check ({record['mode']}, {record['machine'].get('device') or 'no GPU'}), "
             f"{record['total_s']} s:"]
    for name, part in record["parts"].items():
        state = f"skipped ({part['skipped']})" if part.get("skipped") else ("ok" if part.get("ok") else "FAILED")
        figures = ""
        if "passed" in part:
            figures = f" passed {part['passed']}, failed {part['failed']}, errors {part['errors']}"
        elif "step_s" in part:
            figures = f" step {part['step_s'] * 1e3:.1f} ms, {part['samples_per_s']:.1f} samples/s"
        elif part.get("rows"):
            figures = " " + "; ".join(f"{r['defense'] if r['defense'] != '-' else 'released'} CA {num(r['CA'], 1)} "
                                      f"ASR {num(r['ASR'], 1)}" for r in part["rows"])
        lines.append(f"  {name}: {state}{figures} [{part.get('seconds', 0):.1f} s]")
    lines.append(f"JSON: {out} (then: python benchmarks/run.py --merge FILE)")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="device_check.py", description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--bundle", type=Path, metavar="DIR", help="build the bundle into DIR (here)")
    what.add_argument("--run", type=Path, metavar="DIR", help="run the check from the bundle in DIR (there)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU; alone: a tiny bundle made now, tiny sizes")
    parser.add_argument("--tiny", action="store_true", help="with --bundle: tiny random models (the CPU check's)")
    parser.add_argument("--no-wheels", action="store_true", help="with --bundle: leave the wheels out")
    parser.add_argument("--wheels", action="store_true", help="with --cpu alone: build and install the wheels too")
    parser.add_argument("--out", type=Path, help="the JSON (default: $OUT/device-check.json, else in --work)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--budget", type=float, help=f"seconds for every part together (default {BUDGET_S:.0f}; "
                        "x1.5 with --cpu)")
    parser.add_argument("--skip", type=lambda s: {x for x in s.split(",") if x}, default=set(),
                        help=f"comma-separated parts to leave out: {', '.join(PARTS)}")
    parser.add_argument("--parity-k", metavar="EXPR", help="run only the parity tests pytest's -k EXPR selects")
    parser.add_argument("--student", help="a HF directory with real weights to use as the student")
    parser.add_argument("--teacher", help="a HF directory with real weights to use as the teacher")
    parser.add_argument("--experiment-args", type=str.split, default=[], metavar="FLAGS",
                        help="more `unbackdoor run` flags for both experiments, as one string: "
                        "--experiment-args='--test-rows 100'")
    parser.add_argument("--part", choices=sorted(CHILD_PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--context", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    sys.exit(main())
