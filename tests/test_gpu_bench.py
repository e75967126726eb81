"""benchmarks/gpu_bench.py runs end to end on a CPU with --tiny and writes its report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_on_cpu_writes_json_and_markdown(tmp_path):
    bench = load_script()
    report = bench.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "gpu.json").read_text())
    page = (tmp_path / "gpu.md").read_text()
    assert set(data["models"]) == {"digits", "sd15", "dit"} == set(report["models"])
    assert data["meta"]["tiny"] and data["meta"]["device"].startswith("CPU")
    for name, model in data["models"].items():
        methods = {row["method"] for row in model["rows"]}
        assert "sequential (fpsolve.solve)" in methods and "sequential (tight loop, no host sync)" in methods
        assert any(m.startswith("taa window=auto") for m in methods), name
        for row in model["rows"]:
            assert row["median_s"] is None or row["median_s"] > 0
        tight = next(r for r in model["rows"] if r["method"].startswith("sequential (tight"))
        assert tight["note"] == "same sample as fpsolve.solve"
    digits = data["models"]["digits"]["rows"]
    parallel = ("taa", "newton")
    assert all(r["iterations_source"].startswith("measured")
               for r in digits if r["method"].startswith(parallel))
    assert all(r["estimated"] for r in data["models"]["sd15"]["rows"] if r["method"].startswith(parallel))
    # newton, fpsolve.solve's default solver, has a row at the full window next to taa's, per model
    steps = {name: model["steps"] for name, model in data["models"].items()}
    newton = {name: [r for r in model["rows"] if r["method"].startswith("newton")]
              for name, model in data["models"].items()}
    assert [r["method"] for r in newton["digits"]] == [f"newton window={steps['digits']}"]
    assert newton["digits"][0]["window"] == steps["digits"] and newton["digits"][0]["iterations"] >= 1
    for name in ("sd15", "dit"):
        assert [r["method"] for r in newton[name]] == [f"newton window={steps[name]} (estimate)"], name
        assert newton[name][0]["median_s"] > 0 and newton[name][0]["iterations"] >= 1
    assert {r["model"] for r in data["latency"]} == {"digits", "sd15", "dit"}
    assert "# GPU wall clock" in page and "| sequential (fpsolve.solve) | eager |" in page


def test_help_names_the_options(capsys):
    bench = load_script()
    with pytest.raises(SystemExit):
        bench.parse(["--help"])
    text = capsys.readouterr().out
    for option in ("--tiny", "--device", "--runs", "--models", "--budget-s", "--out"):
        assert option in text
