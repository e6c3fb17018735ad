"""scripts/gpu_check.sh rehearsed on the CPU under a tight deadline: a stage interrupted at its own limit and a stage
interrupted at the deadline both leave their results (junit XML, benchmark JSON), the check ends within the
deadline, and the stages it had no time for are recorded as skipped. A GPU window returns only what the script
wrote by then, so this is what decides what the first one brings back."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import raphael_ext

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(not SCRIPT.is_file() or shutil.which("timeout") is None,
                                reason="needs the repository's scripts/ and coreutils' timeout")


def test_rehearsal_keeps_results_of_interrupted_stages_and_holds_the_deadline(tmp_path):
    prebuilt = tmp_path / "prebuilt"  # the installed _C stands in for .device/ (no stamp: noted, then used)
    prebuilt.mkdir()
    shutil.copy(raphael_ext._C.__file__, prebuilt)
    out = tmp_path / "out"
    deadline, tests_limit = 100, 20
    tests = " ".join(f"python_tests/test_{name}.py" for name in ("space_moe", "grouped_gemm", "cross_attention_mask"))
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "GPU_CHECK_WORK": str(tmp_path / "work"),
           "GPU_CHECK_PREBUILT": str(prebuilt), "GPU_CHECK_DEADLINE": str(deadline),
           "GPU_CHECK_LIMIT_tests": str(tests_limit), "GPU_CHECK_TESTS": tests,  # more than tests_limit of tests
           "GPU_CHECK_BENCHMARKS": "benchmarks/test_focal_loss.py benchmarks/test_moe.py",  # quick ones first
           # The deadline may kill a torch.compile mid-build: its half-written kernels stay out of the shared cache.
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    for name in [n for n in env if n == "PYTHONPATH" or n.startswith("PYTEST_")]:  # this pytest's (xdist's) own
        env.pop(name)
    start = time.monotonic()
    check = subprocess.Popen(["bash", str(SCRIPT), "--rehearse"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        returncode = check.wait(timeout=deadline + 60)
    finally:  # the check's stages too, if it overran
        if check.poll() is None:
            os.killpg(check.pid, signal.SIGKILL)
    elapsed = time.monotonic() - start
    log = (out / "gpu_check.log").read_text()
    assert returncode == 1, log[-3000:]
    assert elapsed <= deadline + 5, f"{elapsed:.0f}s for a {deadline}s deadline"
    assert "was built from other sources" in log and "no prebuilt _C" not in log  # imported, not rebuilt

    # The tests stage, interrupted at its own limit: pytest's summary and junit XML are there.
    assert f"tests (timed out after {tests_limit}s)" in log
    assert "KeyboardInterrupt" in log
    (junit,) = out.glob("*-cpu-tests.xml")
    cases = ET.parse(junit).getroot().iter("testcase")
    assert sum(1 for _ in cases) >= 1

    # The benchmarks stage, interrupted at the deadline: the benchmarks that finished are in the JSON.
    assert "benchmarks (timed out after" in log
    (bench,) = out.glob("*-bench.json")
    assert json.loads(bench.read_text())["benchmarks"]

    # No time was left for the rest: recorded, not run.
    for name in ("fig6c", "summary", "sanitizer-cases"):
        assert f"{name} (skipped at the deadline)" in log
    assert (out / "logs.tar.gz").is_file()
