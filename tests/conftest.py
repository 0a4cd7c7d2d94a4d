"""Shared fixtures: tiny fake datasets in the real on-disk formats (see ``fakedata.py``), and one
uninterrupted MC-SGD run that several modules compare their interrupted runs with.

Each data fixture returns the ``root`` folder to pass to torchvision / ``load_source``. The
session-scoped folders and runs are shared by every test: do not modify them (copy them, or call
``fakedata.write_*`` into ``tmp_path``, to test damaged files).

Below the fixtures, what keeps the suite fast (docs/speed.md, "Test suite"): the guard that keeps
tests that start processes out of the fast tier, and how tests are handed to ``pytest -n 2`` workers.
"""

from __future__ import annotations

import functools
import multiprocessing.process
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fakedata import patch_cifar100_md5, write_cifar100, write_mnist

if TYPE_CHECKING:
    from cl_lightning.data.datamodule import ContinualDataModule


def pytest_configure(config: pytest.Config) -> None:
    """In every process that runs tests: one torch thread, as the CLI's default `num_threads: 1` (the tests'
    batches are tiny, and with 2 threads on a 2-core machine any concurrent process makes every torch op
    stall; see cl_lightning.cli.lightning_cli). Not in the controller of `pytest -n 2`, which runs none: importing torch
    and Lightning there (10 s of CPU) would delay the workers' start."""
    if not getattr(config.option, "numprocesses", None) or hasattr(config, "workerinput"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/MNIST/raw/`` with the four extracted IDX files: 600 train / 200 test, 28x28, 10 classes."""
    root = tmp_path_factory.mktemp("mnist")
    write_mnist(root, "MNIST", n_train=600, n_test=200, seed=0)
    return root


@pytest.fixture
def fashion_root(tmp_path: Path) -> Path:
    """``root/FashionMNIST/raw/`` holding ONLY the four ``.gz`` files: 600 train / 200 test.

    Function scope, so it is still gz-only in every test (loading extracts the files in place).
    A different seed than ``mnist_root``, so the two are different datasets.
    """
    write_mnist(tmp_path, "FashionMNIST", n_train=600, n_test=200, seed=1, gz=True)
    return tmp_path


@pytest.fixture(scope="session")
def _cifar_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("cifar")
    return root, write_cifar100(root, n_train_per_class=20, n_test_per_class=5, seed=0)


@pytest.fixture
def cifar_root(_cifar_files: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> Path:
    """``root/cifar-100-python/{train,test,meta}``: 100 classes, 20 train / 5 test per class
    (2000 / 500 images, 32x32x3). torchvision's ``CIFAR100`` md5 sums are patched to the fake
    files' for the duration of the test (function scope for that reason; the files are written
    once per session)."""
    root, md5 = _cifar_files
    patch_cifar100_md5(monkeypatch, md5)
    return root


@pytest.fixture(scope="session")
def digits() -> ContinualDataModule:
    """Three permuted 8x8-digits tasks, seed 0, set up (offline). Shared: do not modify it."""
    from cl_lightning.data.datamodule import ContinualDataModule

    dm = ContinualDataModule(source="digits", benchmark="permuted", num_tasks=3, seed=0)
    dm.setup()
    return dm


MCSGD_DIGITS = Path(__file__).parents[1] / "configs" / "mcsgd" / "permuted_digits.yaml"


def mcsgd_digits_args(out: Path, *extra: str) -> list[str]:
    """``fit`` of three permuted-digits MC-SGD tasks (the shipped config), deterministic, writing under ``out``."""
    return ["fit", "--config", str(MCSGD_DIGITS), "--data.num_tasks", "3", "--trainer.deterministic", "true",
            "--trainer.logger.init_args.save_dir", str(out), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--accuracy_matrix.print_table", "false", *extra]


@pytest.fixture(scope="session")
def mcsgd_digits_run(tmp_path_factory: pytest.TempPathFactory):
    """The uninterrupted run of :func:`mcsgd_digits_args`, in-process: its folder and the CLI object (the
    trained model, data module and callbacks). The signal, fault-injection and resume tests compare their
    interrupted runs with it, bitwise: one run for all of them (a run is the same in any process of this
    machine). Shared: do not modify it."""
    from cl_lightning.cli.lightning_cli import cli_main

    out = tmp_path_factory.mktemp("mcsgd_digits")
    cli = cli_main(mcsgd_digits_args(out))
    return out / "lightning_logs" / "version_0", cli


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """One local Ray (2 CPUs) for the tests of the group "ray" (its start costs seconds, each sweep's own would
    too): they pass its address to ``sweep --address``. Started by the first of them, stopped with the session."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(autouse=True)
def _warm_launched_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fits that a grid or a sweep trial running in the test's own process launches start warm, as the
    tests' own children do (tests/processes.py): each is still a process of its own, in a session of its
    own, with its log, signals and exit status, but forked with its imports done. A grid or sweep the test
    starts as a command (``python -m cl_lightning grid``, Ray's trial workers) launches its fits cold."""
    from processes import start_launched_fit

    from cl_lightning.launch import process

    monkeypatch.setattr(process, "start_fit", functools.partial(start_launched_fit, cold=process.start_fit))


# The fast tier (`pytest -m "not slow"`, `make test-fast`) takes seconds only while no test in it starts
# processes: a `cl-lightning` child, a grid or a sweep, Ray, a DDP worker, a fault injection (a killed
# child). Such a test must be marked slow; the guard below fails a test that is not, in the full run as in the
# fast one, at whatever phase it starts one (a module fixture's run counts for the test that set it up). It
# watches rather than refuses: the test runs as it would, then fails naming what it started. Helpers that
# libraries start for themselves (typeshed_client asks a Python for its sys.path) are not ours to mark.

#: What the running test started so far, while that test is not marked slow (None: not watching).
_started: list[str] | None = None
#: A process is ours when its command line names one of these: our command line tool and Ray.
_OURS = ("cl_lightning", "cl-lightning", "/ray/")


def _audit(event: str, args: tuple) -> None:
    """Python raises one of these audit events for every child process it starts (subprocess.Popen and the os calls)."""
    if _started is not None and event in ("subprocess.Popen", "os.system", "os.posix_spawn", "os.spawn"):
        command = " ".join(map(str, args[1] if event == "subprocess.Popen" else args[:2]))
        if any(name in command for name in _OURS):
            _started.append(command[:200])


sys.addaudithook(_audit)  # cannot be removed; it does nothing unless a test is watched
_start_process = multiprocessing.process.BaseProcess.start


def _start_watched(self: multiprocessing.process.BaseProcess) -> None:
    """A multiprocessing start (DDP workers, the warm children of tests/processes.py) raises no audit event."""
    if _started is not None:
        _started.append(f"multiprocessing {self.name}")
    _start_process(self)


multiprocessing.process.BaseProcess.start = _start_watched


def _watch(item: pytest.Item):
    """One phase of a test (setup, call or teardown); fails it if it started processes without the slow mark."""
    global _started
    _started = None if item.get_closest_marker("slow") else []
    try:
        result = yield
    finally:
        started, _started = _started, None
    if started:
        more = f" (and {len(started) - 1} more)" if len(started) > 1 else ""
        pytest.fail(f"{item.nodeid} starts processes, so it must be marked @pytest.mark.slow to stay out of the fast "
                    f"tier: {started[0]}{more}", pytrace=False)
    return result


pytest_runtest_setup = pytest.hookimpl(wrapper=True)(_watch)
pytest_runtest_call = pytest.hookimpl(wrapper=True)(_watch)
pytest_runtest_teardown = pytest.hookimpl(wrapper=True)(_watch)


# With `pytest -n 2 --dist loadgroup --no-loadscope-reorder` (make test, make test-fast) each worker takes
# the next unit of work when it is free: a test, or a group that one worker runs in a row. A test that uses
# a module-scoped fixture goes with its module (the fixture's run then happens once, not once per worker);
# an explicit `xdist_group` (tests that cannot run beside each other, e.g. "ray") wins. The units with the
# most slow tests are handed out first, so that no long test starts last while the other worker idles.
# Without -n, nothing here changes the order or the marks.


#: Tests that go first in their group: the check that no Ray runs on this machine comes before the group's own Rays.
FIRST_IN_GROUP = ("test_an_unreachable_cluster_is_named",)


def _in_xdist_worker(config: pytest.Config) -> bool:
    """A worker of ``-n N --dist loadgroup`` (xdist sets its ``dist`` to "no" and ``loadgroup`` to True)."""
    return hasattr(config, "workerinput") and bool(getattr(config.option, "loadgroup", False))


def _uses_module_fixture(item: pytest.Item) -> bool:
    definitions = getattr(item, "_fixtureinfo", None)
    definitions = definitions.name2fixturedefs if definitions else {}
    return any(d.scope == "module" for name in getattr(item, "fixturenames", ()) for d in definitions.get(name, ()))


def _group(item: pytest.Item) -> str | None:
    mark = item.get_closest_marker("xdist_group")
    return (mark.args[0] if mark.args else mark.kwargs.get("name", "default")) if mark else None


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _in_xdist_worker(config):
        return
    for item in items:
        if _group(item) is None and _uses_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.path.relative_to(config.rootpath).as_posix()))
    units = [_group(item) or item.nodeid for item in items]
    slow = Counter(unit for unit, item in zip(units, items) if item.get_closest_marker("slow"))
    first = {unit: i for i, unit in reversed(list(enumerate(units)))}
    later = [getattr(item, "originalname", item.name) not in FIRST_IN_GROUP for item in items]
    order = sorted(range(len(items)), key=lambda i: (-slow[units[i]], first[units[i]], later[i], i))
    items[:] = [items[i] for i in order]


def pytest_collection_finish(session: pytest.Session) -> None:
    """xdist marks a grouped test by adding "@<group>" to its node id, which pytest 9.2's node ids no longer take."""
    items = session.items
    if _in_xdist_worker(session.config) and any(_group(i) for i in items) and not any("@" in i.nodeid for i in items):
        warnings.warn("pytest-xdist does not group tests on this pytest (pytest-dev/pytest-xdist#1386): module fixtures "
                      "run on both workers and two Rays may overlap; install the test extra (pytest<9.2)", stacklevel=1)
