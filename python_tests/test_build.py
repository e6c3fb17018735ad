"""setup.py's choices of GPU archs: a Hopper GPU is built as sm_90a (its wgmma kernels need it), and the build says
when it compiles sm_90a code."""

import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("raphael_ext_setup", SETUP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, builds nothing
    return module


def fake_torch(*capabilities):
    cuda = SimpleNamespace(device_count=lambda: len(capabilities), get_device_capability=lambda i: capabilities[i])
    return SimpleNamespace(cuda=cuda)


def test_visible_hopper_gpus_build_sm90a(setup_module):
    assert setup_module.visible_gpu_archs(fake_torch((9, 0))) == "9.0a"
    assert setup_module.visible_gpu_archs(fake_torch((9, 0), (8, 0), (9, 0))) == "8.0;9.0a"
    assert setup_module.visible_gpu_archs(fake_torch((8, 6))) == "8.6"
    assert setup_module.visible_gpu_archs(fake_torch((10, 0))) == "10.0"


def test_sm90a_is_recognised_in_arch_lists(setup_module):
    for arch_list in ("8.0;9.0a", "9.0a", "9.0a+PTX", "8.0 9.0a"):
        assert setup_module.builds_sm90a(arch_list), arch_list
    for arch_list in ("9.0", "8.0;9.0+PTX", "10.0a", ""):
        assert not setup_module.builds_sm90a(arch_list), arch_list


def test_build_requirements_match_requirements_dev():
    """`pip install .` builds with pyproject.toml's build requirements, CI without isolation against .venv
    (requirements-dev.txt): each build requirement must be in both, with the same version specifier, so CI builds
    with what users build with."""
    tomllib = pytest.importorskip("tomllib")
    root = SETUP.parent
    build = tomllib.loads((root / "pyproject.toml").read_text())["build-system"]["requires"]
    split = re.compile(r"^([A-Za-z0-9_.\-]+)\s*(.*)$")
    dev = {}
    for line in (root / "requirements-dev.txt").read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            name, spec = split.match(requirement).groups()
            dev[name.lower()] = spec.replace(" ", "")
    assert build
    for requirement in build:
        name, spec = split.match(requirement).groups()
        assert dev.get(name.lower()) == spec.replace(" ", ""), f"{requirement} in pyproject.toml"
