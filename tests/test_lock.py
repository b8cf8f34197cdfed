"""requirements.lock: what `make demo` / `make test` install, pinned, and stale locks refused."""

import importlib.metadata
import importlib.util
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lock_tool", REPO / "tools" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)


def test_the_committed_lock_matches_pyproject():
    assert lock.check() is None


def _declared_names(requirements):
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_declared_dependency_is_pinned():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _declared_names(project["dependencies"]) | _declared_names(project["optional-dependencies"]["test"])
    pinned = lock.pins()
    assert declared - set(pinned) == set()
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", v) for v in pinned.values())


def test_this_environment_holds_the_locked_versions():
    # `make test` installed from the lock: every locked package present here has its pinned version.
    pinned = lock.pins()
    installed = {}
    for dist in importlib.metadata.distributions():
        installed[dist.metadata["Name"].lower().replace("_", "-")] = dist.version
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "torch"):
        assert name in pinned, name
    wrong = {name: (installed[name], version) for name, version in pinned.items()
             if name in installed and installed[name] != version}
    assert wrong == {}, f"installed (got, locked): {wrong}"


@pytest.mark.parametrize("edit, stale", [
    (lambda text: text.replace('"pyyaml>=6.0",', '"pyyaml>=6.0",\n  "requests>=2",'), True),  # a new dependency
    (lambda text: text.replace('"pyyaml>=6.0"', '"pyyaml>=6.0.2"'), True),                     # a changed bound
    (lambda text: text.replace('"pytest>=8"', '"pytest>=9"'), True),                          # the test extra
    (lambda text: text.replace('version = "0.1.0"', 'version = "0.1.1"'), False),              # not a dependency
])
def test_a_changed_dependency_makes_the_lock_stale(tmp_path, edit, stale):
    pyproject = tmp_path / "pyproject.toml"
    original = (REPO / "pyproject.toml").read_text()
    pyproject.write_text(edit(original))
    assert pyproject.read_text() != original
    problem = lock.check(pyproject=pyproject, lock=REPO / "requirements.lock")
    if stale:
        assert problem is not None and "make lock" in problem and "changed" in problem
    else:
        assert problem is None


def test_a_missing_or_unstamped_lock_is_refused(tmp_path):
    assert "missing" in lock.check(lock=tmp_path / "requirements.lock")
    unstamped = tmp_path / "requirements.lock"
    unstamped.write_text("jax==0.10.2\n")
    assert "make lock" in lock.check(lock=unstamped)
