"""Docker cannot build here; what can be checked is that the image's pins satisfy setup.py's requirements."""

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text()
    return dict(re.findall(r"\b([a-z][a-z0-9_\-]*)==([0-9][0-9a-z.\-]*)", text))


def requirements() -> list[Requirement]:
    text = (REPO / "setup.py").read_text()
    return [Requirement(r) for r in re.findall(r'"([a-z][a-z0-9_\-]*\s*(?:>=|==|<=|~=|<|>)[^"]*)"', text)]


def test_every_pinned_package_satisfies_setup_py():
    found = pins()
    assert {"torch", "triton", "nvidia-dali-cuda130", "deepspeed"} <= found.keys()
    checked = 0
    for requirement in requirements():
        if requirement.name in found:
            assert found[requirement.name] in requirement.specifier, (requirement, found[requirement.name])
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize(
    "needle",
    ["python3.11 -m venv /opt/venv", "USER trainer", "WORKDIR /workspace/fastvit_ssl", "pip install --no-deps -e ."],
)
def test_image_runs_the_project_on_python_3_11_as_a_user(needle):
    assert needle in (REPO / "Dockerfile").read_text()


def test_dockerignore_keeps_local_state_out():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)
