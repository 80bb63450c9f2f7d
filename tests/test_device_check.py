"""The device check (``benchmarks/device_check.py``) end to end on the CPU at a tiny size, its failures
recorded rather than lost, and its JSON merged into markdown (``benchmarks/device_report.py``,
``run.py --merge FILE``), bad files refused with a clear error."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from bench_import import bench_module


@pytest.fixture(scope="module")
def bench() -> SimpleNamespace:
    """``device_check``, ``device_report`` and ``run`` from benchmarks/."""
    return SimpleNamespace(check=bench_module("device_check"), report=bench_module("device_report"),
                           run=bench_module("run"))


@pytest.fixture(scope="module")
def tiny_bundle(bench, tiny_dirs, tmp_path_factory) -> Path:
    """A bundle of the suite's tiny models, without wheels (the children use the installed packages)."""
    bundle = tmp_path_factory.mktemp("device") / "bundle"
    sources = {"student": ("tiny-llama", tiny_dirs["llama"]), "teacher": ("tiny-bert", tiny_dirs["bert"])}
    manifest = bench.check.build_bundle(bundle, tiny=True, wheels=False, sources=sources)
    assert manifest["mode"] == "tiny" and manifest["models"]["student"]["params"] > 0
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json", "payload.tar.gz"]
    return bundle


def test_cpu_check_runs_this_backend_end_to_end_and_merges(bench, tiny_bundle, tmp_path, backend_name) -> None:
    """Every part for the backend under test (parity: one test), then ``--merge`` renders the figures."""
    other = {"torch": "jax", "jax": "torch"}[backend_name]
    out = tmp_path / "check.json"
    rc = bench.check.main(["--run", str(tiny_bundle), "--cpu", "--work", str(tmp_path / "work"), "--out", str(out),
                           "--skip", f"step-{other},experiment-{other}", "--parity-k", "comparator",
                           "--experiment-args", "--defenses none --attacker-rows 48 --user-rows 16 --test-rows 16"])
    record = json.loads(out.read_text())
    parts = record["parts"]
    assert rc == 0, {name: part.get("error") for name, part in parts.items()}
    assert list(parts) == ["install", "env", "models", "parity", f"step-{backend_name}", f"experiment-{backend_name}"]
    assert record["summary"]["failed"] == [] and record["mode"] == "cpu"
    assert (parts["parity"]["passed"], parts["parity"]["failed"], parts["parity"]["total"]) == (1, 0, 1)
    assert record["versions"]["numpy"] and backend_name in record["versions"]
    step = parts[f"step-{backend_name}"]
    assert step["step_s"] > 0 and step["rows"] == 8 and step["length"] == 32 and step["precision"] == "bf16"
    assert step["samples_per_s"] == pytest.approx(8 / step["step_s"]) and step["peak_tflops"] > 0
    experiment = parts[f"experiment-{backend_name}"]
    assert [row["defense"] for row in experiment["rows"]] == ["-", "none"]
    assert experiment["config"]["test_rows"] == 16 and experiment["device"] == "cpu"
    assert (tmp_path / "check.log").read_text().count("=====") == 5  # every child's output, one section each

    label = bench.report.merge(out, tmp_path / "results")
    md = (tmp_path / "results" / "device.md").read_text()
    assert f"## {label}" in md and "passed 1, failed 0, errors 0, skipped 0 of 1" in md
    assert f"| {backend_name} | cpu |" in md and "| poisoned + defense | none |" in md
    assert "a test of the check, not a device figure; tiny random models" in md


def test_a_failing_part_is_recorded_and_its_dependants_skipped(bench, tiny_bundle, tmp_path, capsys) -> None:
    out = tmp_path / "check.json"
    rc = bench.check.main(["--run", str(tiny_bundle), "--cpu", "--work", str(tmp_path / "work"), "--out", str(out),
                           "--skip", "env,parity", "--student", str(tmp_path / "no-model")])
    parts = json.loads(out.read_text())["parts"]
    assert rc == 1 and not parts["models"]["ok"] and "no-model" in parts["models"]["error"]
    assert {parts[name]["skipped"] for name in ("step-torch", "step-jax", "experiment-torch", "experiment-jax")} == {
        "the models part failed"}
    assert "models: FAILED" in capsys.readouterr().out


def test_a_bad_bundle_or_part_name_is_refused(bench, tiny_bundle, tmp_path, capsys) -> None:
    assert bench.check.main(["--run", str(tmp_path), "--cpu", "--work", str(tmp_path / "w")]) == 2
    assert "holds no bundle (no manifest.json)" in capsys.readouterr().err
    assert bench.check.main(["--run", str(tiny_bundle), "--cpu", "--skip", "parity,step"]) == 2
    assert "--skip: unknown part 'step'; the parts are install, env" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text('{"kind": "something else"}')
    out = tmp_path / "check.json"
    assert bench.check.main(["--run", str(tmp_path / "b"), "--cpu", "--work", str(tmp_path / "w"), "--out",
                             str(out), "--skip", "env"]) == 1
    parts = json.loads(out.read_text())["parts"]
    assert "is not a device bundle" in parts["install"]["error"]
    assert parts["parity"]["skipped"] == "the bundle was not unpacked (see install)"
    with pytest.raises(bench.check.CheckError, match="exists and is not a bundle"):
        bench.check.build_bundle(tmp_path / "w")


def test_a_part_past_its_limit_is_ended(bench, tmp_path) -> None:
    options = argparse.Namespace(argv=[], skip=set(), parity_k=None, student=None, teacher=None, experiment_args=[])
    check = bench.check.Check(tmp_path, tmp_path / "c.json", tmp_path, True, 10.0, options)
    check.log.write_text("")
    rc, tail = check.spawn("slow", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                           1.0)
    assert rc == -9 and tail.startswith("timed out after 1 s") and "started" in tail


def test_junit_counts_name_each_failure(bench, tmp_path) -> None:
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="1" skipped="1">'
                   '<testcase name="test_a"/><testcase name="test_b"><failure message="first diverging leaf x"/>'
                   '</testcase><testcase name="test_c"><error message="fixture broke"/></testcase>'
                   '<testcase name="test_d"><skipped/></testcase></testsuite></testsuites>')
    counts = bench.check.junit_counts(xml)
    assert {k: counts[k] for k in ("passed", "failed", "errors", "skipped", "total")} == {
        "passed": 1, "failed": 1, "errors": 1, "skipped": 1, "total": 4}
    assert counts["failures"] == [{"test": "test_b", "message": "first diverging leaf x"},
                                  {"test": "test_c", "message": "fixture broke"}]


# ------------------------------------------------------------------------------------------- merge
def _gpu_check(created: str = "2026-12-02T10:00:00Z") -> dict[str, Any]:
    """A GPU check as ``device_check.py --run`` writes it (figures made up)."""
    step = {"ok": True, "setting": "smollm2-135m, 30 layers; LoRA r=8", "device": "cuda:0 (NVIDIA H200)",
            "first_step_s": 1.5, "step_s": 0.04, "samples_per_s": 800.0, "tokens_per_s": 102400.0,
            "model_tflops": 46.2, "peak_tflops": 700.0, "seconds": 20.0}
    rows = [{"stage": "poisoned (released)", "defense": "-", "CA": 50.5, "ASR": 12.0},
            {"stage": "poisoned + defense", "defense": "w2s", "CA": 51.0, "ASR": 11.0}]
    return {"kind": "unbackdoor-device-check", "schema": 1, "created": created, "mode": "gpu", "budget_s": 480.0,
            "machine": {"device": "NVIDIA H200", "platform": "Linux", "cpus": 16, "python": "3.12.3"},
            "versions": {"torch": "2.11.0", "jax": "0.11.2"}, "missing": ["gguf"], "total_s": 400.0,
            "bundle": {"mode": "full", "size_mib": 1.5, "holds": "5 wheels"},
            "parts": {"install": {"ok": True, "seconds": 2.0},
                      "parity": {"ok": False, "passed": 33, "failed": 1, "errors": 0, "skipped": 0, "total": 34,
                                 "torch_device": "cuda", "jax_device": "gpu", "seconds": 80.0,
                                 "failures": [{"test": "test_x", "message": "first diverging leaf 'logits'"}],
                                 "error": "pytest exit 1"},
                      "step-torch": step, "step-jax": {**step, "step_s": 0.02, "compile_s": 30.0},
                      "experiment-torch": {"ok": True, "command": "unbackdoor run --backend torch", "seconds": 60.0,
                                           "device": "cuda:0 (NVIDIA H200)", "rows": rows, "timings_s": {"total": 50}},
                      "experiment-jax": {"skipped": "jax does not import here: ImportError: x"}}}


def test_merge_renders_a_check_and_keeps_every_check(bench, tmp_path) -> None:
    file = tmp_path / "check.json"
    file.write_text(json.dumps(_gpu_check()))
    label = bench.report.merge(file, tmp_path)
    assert label == "2026-12-02T10:00:00Z NVIDIA H200 (gpu)"
    md = (tmp_path / "device.md").read_text()
    assert "passed 33, failed 1, errors 0, skipped 0 of 34" in md and "- `test_x`: first diverging leaf" in md
    assert "| torch | cuda:0 (NVIDIA H200) | 1.500 | - | 0.0400 | 800.0 | 102400 | 46.20 | 700.0 | 6.6 |" in md
    assert "jax / torch step time: **0.50x**" in md and "| torch | poisoned + defense | w2s | 51.00 | 11.00 |" in md
    assert "| experiment-jax | skipped: jax does not import here: ImportError: x |" in md
    assert "Missing there: gguf." in md and "- `parity`: pytest exit 1" in md
    bench.report.merge(file, tmp_path)  # the same check again: replaced, not doubled
    file.write_text(json.dumps(_gpu_check("2026-12-03T10:00:00Z")))
    bench.report.merge(file, tmp_path)
    runs = json.loads((tmp_path / "device.json").read_text())["runs"]
    assert list(runs) == ["2026-12-03T10:00:00Z NVIDIA H200 (gpu)", label]  # newest first


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object, got list"),
    ('{"kind": "suite"}', "is not a device check: its 'kind' is 'suite', expected 'unbackdoor-device-check'"),
    ('{"kind": "unbackdoor-device-check", "schema": 1, "created": "x", "mode": "gpu"}', r"lacks the keys \['parts'\]"),
    ('{"kind": "unbackdoor-device-check", "schema": 9, "created": "x", "mode": "gpu", "parts": {}}', "has schema 9"),
    ('{"kind": "unbackdoor-device-check", "schema": 1, "created": "x", "mode": "gpu", "parts": {"a": 1}}',
     "'parts' must map part names"),
])
def test_merge_refuses_a_bad_file_by_name(bench, tmp_path, content, message) -> None:
    file = tmp_path / "check.json"
    if content is not None:
        file.write_text(content)
    with pytest.raises(bench.report.DeviceReportError, match=message) as caught:
        bench.report.merge(file, tmp_path / "results")
    assert str(file) in str(caught.value)
    assert not (tmp_path / "results").exists()


def test_run_py_merge_file_reports_a_bad_file_and_records_a_good_one(bench, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench.run, "RESULTS", tmp_path)
    assert bench.run.main(["--merge", str(tmp_path / "missing.json")]) == 2
    assert "run.py --merge: error: device check" in capsys.readouterr().err
    (tmp_path / "device.json").write_text("[]")
    file = tmp_path / "check.json"
    file.write_text(json.dumps(_gpu_check()))
    assert bench.run.main(["--merge", str(file)]) == 2
    assert "device results" in capsys.readouterr().err
    (tmp_path / "device.json").unlink()
    assert bench.run.main(["--merge", str(file)]) == 0
    assert "NVIDIA H200" in (tmp_path / "device.md").read_text()
