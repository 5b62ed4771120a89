"""The installable package: dependencies agree with requirements.txt, and ``pip install .`` builds a
``matcher`` command that runs from anywhere (assets read from $MATCHER_HOME)."""
import os
import shutil
import subprocess
import sys
import tomllib

from tests.helpers import REPO


def test_pyproject_dependencies_equal_requirements_txt():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert pyproject["project"]["dependencies"] == requirements
    assert pyproject["project"]["scripts"]["matcher"] == "matcher.cli.main:main"


def test_installed_package_carries_its_configs_and_runs_the_cli(tmp_path):
    source, target = tmp_path / "source", tmp_path / "site"  # built from a copy: the checkout gets no build/
    shutil.copytree(REPO / "matcher", source / "matcher", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", source)
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--target", str(target), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    assert (target / "matcher" / "models" / "configs" / "offline-teacher.json").exists()
    assert (target / "matcher" / "models" / "configs" / "presets" / "offline.json").exists()
    assert (target / "matcher" / "train" / "recipes" / "student.json").exists()
    assert (target / "bin" / "matcher").exists()
    env = {**os.environ, "PYTHONPATH": str(target), "MATCHER_HOME": str(REPO)}
    info = subprocess.run([sys.executable, "-m", "matcher", "info"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "offline-teacher" in info.stdout and "offline: teacher=offline-teacher" in info.stdout
    where = subprocess.run([sys.executable, "-c", "import matcher.paths as p; print(p.PACKAGE_DIR, p.REPO_ROOT)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    package_dir, home = where.stdout.split()
    assert package_dir.startswith(str(target)) and home == str(REPO)


def test_every_bench_script_imports():
    """The scripts in bench/ are run by hand, so nothing else notices when a name they import moves."""
    import importlib.util

    import pytest

    scripts = sorted((REPO / "bench").glob("*.py"))
    assert scripts
    for path in scripts:
        spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)  # top level only: main() runs under __main__
        except ImportError as exc:
            pytest.fail(f"bench/{path.name}: {exc}")
