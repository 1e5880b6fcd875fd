"""packaging/systemd/ is the units' one source: nothing else in the tree, the build copies it, a checkout reads it.

The wheel carries the units as package data (``kmuxd/share/systemd/``),
where ``kmuxd install-units`` finds them in an installed kmuxd; they are
not committed there but copied from ``packaging/systemd/`` by the build
(``setup.py``: ``BuildPy``), and a checkout's ``kmuxd install-units`` reads
``packaging/systemd/`` itself. So the two cannot drift: there is one copy
in git, and what the build packs is checked here against it. The built
wheels and the .deb are checked the same way in ``tests/systemd``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kmuxd.system import install

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "packaging" / "systemd"


def test_the_units_live_only_in_packaging_systemd():
    tracked = subprocess.run(["git", "ls-files", "*.service", "*.socket"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    if tracked:  # a git checkout (an unpacked sdist has no git: the next check covers it)
        assert {str(Path(p).parent) for p in tracked} == {"packaging/systemd"}, tracked
    assert sorted(p.name for p in SOURCE.iterdir()) == sorted(install.UNITS)
    assert not (ROOT / "kmuxd" / "share" / "systemd").exists(), "a second copy of the units in the package's source"


def test_a_checkout_installs_from_packaging_systemd():
    assert Path(str(install.units_dir())) == SOURCE


def test_an_installed_kmuxd_reads_them_from_its_package_data(tmp_path, monkeypatch):
    """No checkout around it (a wheel in a venv, the .deb): share/systemd/ inside the package."""
    share = tmp_path / "site-packages" / "kmuxd" / "share"
    (share / "systemd").mkdir(parents=True)
    (share / "systemd" / "kmuxd.service").write_text("[Service]\n")
    monkeypatch.setattr(install, "CHECKOUT_UNITS", tmp_path / "site-packages" / "packaging" / "systemd")
    monkeypatch.setattr(install, "share_dir", lambda: share)
    assert Path(str(install.units_dir())) == share / "systemd"
    (share / "systemd" / "kmuxd.service").unlink()
    with pytest.raises(install.InstallError, match="unit templates are missing"):
        install.units_dir()


def test_the_build_packs_packaging_systemd_byte_for_byte(tmp_path, monkeypatch):
    """setup.py's build_py step copies the units into the built package, and nothing else there.

    setup.py is run with ``setuptools.setup`` stood in for (the real build
    needs the isolated build environment's setuptools; ``tests/systemd``
    checks what ``python -m build`` really packs): what it would be given is
    captured, and its build_py's unit step is run into a build directory
    that holds a stale unit from an earlier build.
    """
    import runpy

    import setuptools

    given = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: given.update(kw))
    monkeypatch.setenv("KMUXD_PURE_PYTHON", "1")
    monkeypatch.chdir(ROOT)
    module = runpy.run_path(str(ROOT / "setup.py"), run_name="setup")
    assert given["cmdclass"]["build_py"] is module["BuildPy"]
    assert (module["UNITS_SOURCE"], module["UNITS_IN_PACKAGE"]) == ("packaging/systemd", "kmuxd/share/systemd")
    packed = tmp_path / "lib" / "kmuxd" / "share" / "systemd"
    packed.mkdir(parents=True)
    (packed / "stale.service").write_text("[Service]\n")
    written = module["copy_units"](SOURCE, packed)
    assert sorted(Path(p).name for p in written) == sorted(p.name for p in packed.iterdir())
    assert sorted(p.name for p in packed.iterdir()) == sorted(p.name for p in SOURCE.iterdir())
    for unit in SOURCE.iterdir():
        assert (packed / unit.name).read_bytes() == unit.read_bytes(), unit.name
