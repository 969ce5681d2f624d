"""benchmarks/mert_device.py, the one-shot GPU benchmark of issue 18, run on the CPU with a
tiny config: it must run with only torch, transformers and numpy (the device host has no
pydantic, redis, kafka or faiss), write every figure to its JSON, and keep its time budget.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "mert_device.py"
#: What the device host lacks: importing any of these fails in the child.
ABSENT = ("pydantic", "pydantic_settings", "redis", "kafka", "faiss", "fastapi", "soundfile", "torchaudio")
TINY_ARGS = ["--device", "cpu", "--config", "tiny", "--batch-sizes", "1,2", "--ref-batch", "2"]
# torch.compile is covered by tests/test_mert_speed.py; traced here too it would add 30 s.
TINY_ARGS += ["--agree-songs", "3", "--no-compile"]


def run_script(out: Path, *args: str) -> dict:
    blocker = f"import sys, runpy; sys.modules.update(dict.fromkeys({ABSENT!r})); "
    blocker += f"sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    proc = subprocess.run(
        [sys.executable, "-c", blocker, *TINY_ARGS, "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report: dict = json.loads(out.read_text())
    return report


def test_device_script_runs_every_case_on_the_cpu(tmp_path: Path) -> None:
    report = run_script(tmp_path / "full.json")
    cases = report["cases"]
    assert report["skipped"] == [] and report["complete"] is True
    errors = {name: c["error"] for name, c in cases.items() if "error" in c}
    assert errors == {}
    for name in [
        "plain HubertModel fp32, one clip",
        "encoder default, b=1",
        "encoder default, b=2",
        "attn eager, b=2",
        "flash_attention_2, b=2",
        "bf16 end to end, b=2",
        "pinned host buffers, b=2",
        "bf16 end to end + pinned, b=1",
        "mixed, arrival order, default",
        "mixed, sorted (today), default",
        "mixed, bucketed, bf16 end to end + pinned",
    ]:
        case = cases[name]
        assert case["audio_s_per_s"] > 0 and case["segments_per_s"] > 0, name
        assert set(case) >= {"peak_gib", "flop_fraction", "walls_s", "audio_s"}, name
    mixed = cases["mixed, sorted (today), default"]
    assert mixed["segments"] > mixed["songs"] >= 3  # songs cut into several segments and a tail
    agree = cases["agreement bf16 vs fp32"]["bf16 end to end"]
    assert 0.999 <= agree["min_cosine"] < 1.0 and agree["passes_0_999"] is True
    assert report["gflop_per_audio_s"] > 0 and report["peak_flops"] is None  # no FLOP peak for a CPU


def test_flops_of_mert_95m_match_the_issue() -> None:
    """The FLOP count behind every 'fraction of the limit': about 26 GFLOP per audio second."""
    spec = importlib.util.spec_from_file_location("mert_device", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gflop = module.flops_per_audio_s(module.MERT_95M, 30.0) / 1e9
    assert 25.0 < gflop < 28.0, gflop


def test_device_script_keeps_its_budget(tmp_path: Path) -> None:
    # 200 clips per call: the first cases outlast 3 s, so the deadline falls in one of them (or, on a
    # loaded machine, already in the setup); either way the run stops there and says so.
    report = run_script(tmp_path / "short.json", "--budget-s", "3", "--min-segments", "200")
    assert report["complete"] is False and report["out_of_time_in"]
    if report["out_of_time_in"] != "setup":
        assert report["skipped"][0] == report["out_of_time_in"]  # the case time ran out in comes first
        assert report["out_of_time_in"] not in report["cases"]  # the half-measured one is left out
        assert not set(report["cases"]) & set(report["skipped"])  # every later case: skipped, not run
        assert "agreement bf16 vs fp32" in report["skipped"]
    assert set(report) >= {"device_name", "gflop_per_audio_s", "peak_flops_source", "cases"}
