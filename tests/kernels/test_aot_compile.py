"""The ahead-of-time compile check (fastvit_ssl.kernels.aot): every kernel compiles for sm_80 and sm_90a at the
configurations its launcher picks there, within shared memory and without spills; and the check can fail."""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def run_compiler(code: str, tmp_path) -> subprocess.CompletedProcess:
    """Python code in a process without TRITON_INTERPRET (the interpreter cannot compile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)


def test_every_kernel_compiles_for_a100_and_h100(tmp_path):
    code = "import sys; from fastvit_ssl.kernels import aot; sys.exit(aot.main(['--jobs', '2', '--json', 'rows.json']))"
    done = run_compiler(code, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    from fastvit_ssl.kernels import aot

    launched = {(r["kernel"], r["arch"]) for r in rows}
    for name in aot.kernels(aot.project_modules()):
        kernel = name.rsplit(".", 1)[1]
        assert {(kernel, "sm_80"), (kernel, "sm_90a")} <= launched, f"{kernel} not compiled for both GPUs"
    assert all(r["problem"] == "" and r["spill_bytes"] == 0 and r["blocks_per_sm"] >= 1 for r in rows)


def test_the_check_reports_broken_and_forgotten_kernels(tmp_path):
    code = (
        "import sys; import broken_kernels as b; from fastvit_ssl.kernels import aot; "
        "sys.exit(aot.main(['--arch', '80', '90', '--jobs', '2'], cases=b.CASES, modules=[b]))"
    )
    done = run_compiler(code, tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    failures = [line for line in done.stdout.splitlines() if line.startswith("FAIL ")]
    tiny = [line for line in failures if "_tiny_dot_kernel" in line]
    huge = [line for line in failures if "_huge_tile_kernel" in line]
    assert len(tiny) == 2 and all("compile error" in line for line in tiny), done.stdout
    assert len(huge) == 2 and all("shared memory" in line for line in huge), done.stdout
    assert any("_forgotten_kernel: no shape launches it" in line for line in failures), done.stdout
