"""Loaded by every Python subprocess a `unit` test starts (tests/conftest.py puts this folder first
on PYTHONPATH for those tests only): the first `import ray` in that process gets a `ray.init` that
refuses, after writing a note to $QDEEP_UNIT_TIER_NOTE, which the test's conftest then turns into
the test's failure, whatever the subprocess made of the refusal. Test-only: qdeep itself never
sees this file."""

import importlib.abc
import importlib.util
import os
import sys

NOTE = os.environ.get("QDEEP_UNIT_TIER_NOTE")


def _refuse(*_args, **_kwargs):
    with open(NOTE, "a") as f:
        f.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
    raise RuntimeError("a `unit` test's subprocess started or joined Ray (ray.init): mark the test `ray`")


class _RayGuard(importlib.abc.MetaPathFinder):
    """Finds `ray` as usual, then replaces its `init` once the package has loaded."""

    def find_spec(self, name, path=None, target=None):
        if name != "ray":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.init = _refuse

        spec.loader.exec_module = exec_module
        return spec


if NOTE:
    sys.meta_path.insert(0, _RayGuard())
