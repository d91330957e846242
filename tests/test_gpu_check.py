"""benchmarks/gpu_check.py on a CPU: every check runs or says why it skips, one JSON line each, and the checks that
need no GPU confirm what they claim. (On a GPU the same script is the evidence; this only keeps it from rotting.)"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def test_cpu_run_reports_every_check_as_one_json_line(capsys):
    gpu_check = load_script()
    names = ["default_dtype", "kl_zero_at_step_zero", "kv_cache_in_place", "lora_keeps_one_input", "flash_attention",
             "host_syncs", "memory_plan", "deterministic_resume", "step_host_syncs"]
    lines = gpu_check.main(["--device", "cpu", "--quick", "--only", *names])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == lines and [line["check"] for line in lines] == [n for n, _, _ in gpu_check.CHECKS if n in names]
    results = {line["check"]: line["result"] for line in lines}
    assert results["flash_attention"] == results["host_syncs"] == results["memory_plan"] == "skipped"
    for name in ("default_dtype", "kl_zero_at_step_zero", "kv_cache_in_place", "lora_keeps_one_input",
                 "deterministic_resume", "step_host_syncs"):
        assert results[name] == "confirmed", lines
