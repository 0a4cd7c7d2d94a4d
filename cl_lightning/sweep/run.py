"""``cl-lightning sweep``: a grid of settings x seeds on Ray Tune, selection on validation, final seeds on test.

Phases, all below ``<root>/<name>/``:

1. search: every setting of the grid file is a Ray Tune trial running an ordinary ``cl-lightning
   fit`` of the base config with the setting's overrides and ``data.val_fraction`` of the training
   data held out, its ``seeds`` trained together as one population (``--solo``: one trial per seed);
   each seed's run goes to ``search/<benchmark>/<method>[<setting>]/seed_<n>/``.
2. selection: the setting of best mean final average accuracy on that validation split
   (:mod:`cl_lightning.sweep.select`), written to ``selection.md`` and as a ready config, ``best.yaml``
   (``data.val_fraction`` 0 again: the whole training set, evaluated on the test set).
3. final: ``best.yaml`` over ``final_seeds`` (one population) into ``final/<benchmark>/<method>/seed_<n>/``, then
   ``cl-lightning report`` of that folder: test average accuracy ± std and forgetting.

Trials run in parallel on a local Ray started and stopped here, or on the Ray cluster at
``--address``. What is done is read from the run folders (:mod:`cl_lightning.sweep.trial`), so the
same command, rerun, skips finished trials and resumes interrupted ones.

Ray, torch and Lightning (through the run folders' and the trials' modules) are imported inside the
functions that use them: ``sweep --help`` and a refused argument answer before any of them loads.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cl_lightning.errors import UserError
from cl_lightning.sweep.grid_file import (
    Grid,
    GridFileError,
    Setting,
    check_keys,
    load_grid,
    override_args,
    setting_label,
    short_names,
)

if TYPE_CHECKING:
    from cl_lightning.sweep.select import SettingScore
    from cl_lightning.sweep.trial import Job, TrialSpec

#: The first Ray with the Tune-only ``ray.tune.report`` / ``tune.RunConfig`` (the extra in pyproject.toml says the same).
MIN_RAY = "2.41"


class SweepError(UserError, RuntimeError):
    """A sweep that cannot start (missing config, no Ray) or whose final runs failed."""


def import_ray() -> Any:
    """Ray Tune, or a message saying how to install it (it is an optional extra)."""
    try:
        import ray
        from ray import tune  # noqa: F401
    except ImportError as err:
        raise SweepError(f"`cl-lightning sweep` needs Ray Tune, which is not installed ({err}): "
                         f"pip install 'cl_lightning[sweep]' (or pip install 'ray[tune]>={MIN_RAY}')") from err
    version = tuple(int(part) for part in ray.__version__.split(".")[:2] if part.isdigit())
    if version < tuple(map(int, MIN_RAY.split("."))):
        raise SweepError(f"`cl-lightning sweep` needs Ray >= {MIN_RAY} (ray.tune.report, tune.RunConfig), found "
                         f"{ray.__version__}: pip install -U 'cl_lightning[sweep]'")
    return ray


def resolve_config(args: list[str]) -> str:
    """The full config ``cl-lightning fit <args>`` would run, as YAML (LightningCLI's ``--print_config``)."""
    from cl_lightning.cli.lightning_cli import cli_main

    out, err = io.StringIO(), io.StringIO()
    code: Any = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main(["fit", *args, "--print_config"])
        except SystemExit as exit_:
            code = exit_.code
    if code not in (None, 0):
        message = next((line for line in reversed(err.getvalue().splitlines()) if line.startswith("error:")), err.getvalue())
        raise SweepError(f"cl-lightning fit {' '.join(args)} does not parse: {message.removeprefix('error: ')}")
    return out.getvalue()


class KnownTrialFailures(logging.Filter):
    """Drops the traceback Ray Tune logs for a trial whose run failed (:class:`TrialFailedError`): the
    status line prints its reason, the run folder's ``FAILED`` marker and Ray's ``error.txt`` keep it,
    and a grid of diverging learning rates would otherwise bury the sweep's output in tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        from cl_lightning.sweep.trial import TrialFailedError

        return not (record.exc_info and isinstance(record.exc_info[1], TrialFailedError))


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Connect to the cluster at ``address`` or start a local Ray, and let it go at the end; an
    already connected Ray (a script's, a test's) is used as it is and left connected."""
    ray = import_ray()
    if ray.is_initialized():
        yield
        return
    # Trials run `python -m cl_lightning...` in Ray's workers: give them this process's import path.
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env} if env else None)
    except ConnectionError as err:
        raise SweepError(f"cannot reach the Ray cluster at --address {address}: {err} Start it (ray start --head) or drop "
                         "--address to run on a local Ray") from err
    except Exception as err:  # Ray raises a bare Exception when its local processes do not come up in time
        if address is not None:
            raise
        raise SweepError(f"the local Ray did not start: {err} On a busy machine its processes can miss Ray's start-up "
                         "deadline: run the command again when the load is lower, or start Ray once yourself "
                         "(ray start --head --num-cpus N) and pass --address auto. Finished trials are kept; rerunning "
                         "the same command resumes the sweep") from err
    try:
        yield
    finally:
        ray.shutdown()


def per_member_keys(config: dict[str, Any]) -> frozenset[str]:
    """The grid keys whose values members of one population may differ in: the model's and the
    method's per-member settings (annotated ``PerMember[...]``). ``trainer.callbacks.init_args.<name>``
    sets the config's last callback, so only the method's settings when the method is last."""
    from cl_lightning.member_outputs import member_settings
    from cl_lightning.methods.registry import method_callbacks

    keys = {f"model.{name}" for name in member_settings("cl_lightning.models.module.ContinualModule")}
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    methods = method_callbacks(callbacks)
    if methods and methods[-1] is callbacks[-1]:
        keys |= {f"trainer.callbacks.init_args.{name}" for name in member_settings(methods[-1]["class_path"])}
    return frozenset(keys)


def jobs_of(pending: list[TrialSpec], args: argparse.Namespace, member_keys: frozenset[str]) -> list[Job]:
    """The pending trials as Ray trials: populations (:func:`pack`), or one per trial with ``--solo``."""
    from cl_lightning.sweep.trial import pack

    return list(pending) if args.solo else pack(pending, member_keys, args.members_per_trial)


def run_phase(phase: str, specs: list[TrialSpec], args: argparse.Namespace, storage: Path,
              member_keys: frozenset[str] = frozenset()) -> None:
    """Run the specs neither finished nor failed yet (failed too with ``--retry_failed``) as Ray
    Tune trials, printing the live status. A failure is a result of the search (a learning rate
    that diverges fails again), so a rerun does not repeat it unless asked."""
    from ray import tune

    from cl_lightning.rundir import has_failed, is_finished
    from cl_lightning.sweep.status import StatusLine
    from cl_lightning.sweep.trial import ray_trainable

    controller_log = logging.getLogger("ray.tune.execution.tune_controller")
    if not any(isinstance(f, KnownTrialFailures) for f in controller_log.filters):
        controller_log.addFilter(KnownTrialFailures())

    finished = [spec for spec in specs if is_finished(spec.folder)]
    failed = [spec for spec in specs if not is_finished(spec.folder) and has_failed(spec.folder) and not args.retry_failed]
    pending = [spec for spec in specs if spec not in finished and spec not in failed]
    print(f"[{phase}] {len(specs)} run(s): {len(finished)} finished and {len(failed)} failed already"
          + (" (--retry_failed runs them again)" if failed else ""), flush=True)
    if not pending:
        return
    # populations of a setting's seeds and of settings differing in per-member values (--solo: one trial per run)
    jobs = jobs_of(pending, args, member_keys)
    # Ctrl-C is the sweep's (main): Tune's own handler would stop the trials and print how to
    # restore its experiment, while a rerun of the same command is what resumes a sweep.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    by_name = {job.name: job for job in jobs}
    resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(ray_trainable, specs=by_name), resources),
        param_space={"trial": tune.grid_search(list(by_name))},
        tune_config=tune.TuneConfig(max_concurrent_trials=args.max_concurrent, trial_dirname_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(
            name=f"{phase}_{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(storage), verbose=0,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            callbacks=[StatusLine(phase, by_name, 0, [], len(jobs))],
        ),
    )
    tuner.fit()


def search_specs(grid: Grid, config: Path, method: str, benchmark: str, root: Path,
                 extra: list[str]) -> dict[Setting, list[TrialSpec]]:
    """The search trials of every setting: the base config, the overrides given after ``--``, the
    setting's values (they win over those), and the held-out split (it wins over everything)."""
    from cl_lightning.sweep.trial import TrialSpec

    names = short_names(list(grid.params))
    labels: dict[str, Setting] = {}
    for setting in grid.settings():
        label = setting_label(setting, names)
        if label in labels:
            raise GridFileError(f"{grid.path}: the settings {labels[label]} and {setting} would share the run folder "
                                f"{method}[{label}]: remove the repeated value")
        labels[label] = setting
    return {
        setting: [TrialSpec(root / "search", benchmark, f"{method}[{label}]", seed,
                            ["--config", str(config), *extra, "--data.val_fraction", str(grid.val_fraction)], Path.cwd(),
                            setting)
                  for seed in grid.seeds]
        for label, setting in labels.items()
    }


def claim(root: Path, config: Path, grid: Path) -> None:
    """Record which base config and grid file the sweep folder belongs to (``sweep.json``), and refuse
    to mix another sweep into it: its best.yaml and final runs would be taken for this one's."""
    record = {"config": str(config), "grid": str(grid.resolve())}
    path = root / "sweep.json"
    if path.exists():
        owner = json.loads(path.read_text())
        if owner != record:
            raise SweepError(f"{root} holds the sweep of {owner['config']} with {owner['grid']}, not of {config} with "
                             f"{grid}: pass another --name (or --root)")
        return
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def install_best(root: Path, text: str) -> None:
    """Write ``best.yaml``. When it changes (the grid grew and another setting won), the final runs of
    the previous one are moved aside to ``.final.replaced<k>`` (hidden from ``report``): the final
    runs always belong to the current ``best.yaml``."""
    path, final = root / "best.yaml", root / "final"
    if path.exists() and path.read_text() != text and final.exists():
        k = 1
        while (aside := root / f".final.replaced{k}").exists():
            k += 1
        final.rename(aside)
        print(f"the selected setting changed: the final runs of the previous one moved to {aside}", flush=True)
    path.write_text(text)


def select(grid: Grid, search: dict[Setting, list[TrialSpec]], config: Path, extra: list[str], root: Path,
           args: argparse.Namespace) -> SettingScore:
    """Score every setting on validation, pick the best, write ``selection.md`` and ``best.yaml``."""
    from cl_lightning.sweep.select import best, best_config, score, table

    names = short_names(list(grid.params))
    scores = [score(setting, setting_label(setting, names), specs) for setting, specs in search.items()]
    chosen = best(scores)
    selection = table(scores, chosen)
    (root / "selection.md").write_text(f"# Selection: {args.grid} on {args.config}\n\nScore: final average accuracy on "
                                       f"the validation split (data.val_fraction {grid.val_fraction:g}), mean ± std over "
                                       f"seeds {grid.seeds}.\n\n{selection}\n")
    resolved = resolve_config(["--config", str(config), *extra, *override_args(chosen.setting), "--data.val_fraction", "0"])
    install_best(root, best_config(resolved, chosen, args.config, grid.val_fraction))
    print(f"\n{selection}\n\nbest setting: {chosen.label} -> {root / 'best.yaml'}", flush=True)
    return chosen


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(
        prog="cl-lightning sweep",
        allow_abbrev=False,  # a typo must not silently set another option
        usage="cl-lightning sweep --config CONFIG --grid GRID [options] [-- fit overrides for every trial]",
        description="Search a grid of settings on a validation split held out of the training data, write the best "
        "setting as a config (best.yaml), run it over the final seeds on the full training set and report test "
        "average accuracy ± std and forgetting. Trials run in parallel on Ray Tune; rerun the same command to resume. "
        "Everything goes to <root>/<name>/. See docs/sweep.md.",
    )
    parser.add_argument("--config", type=Path, required=True, help="base config, e.g. configs/mcsgd/rotated_mnist.yaml "
                        "(method = its folder, benchmark = its name)")
    parser.add_argument("--grid", type=Path, required=True, help="grid file, e.g. configs/grids/mcsgd_rotated_mnist.yaml")
    parser.add_argument("--root", type=Path, default=Path("lightning_logs/sweeps"),
                        help="folder of the sweeps (default: %(default)s)")
    parser.add_argument("--name", default=None, help="the sweep's folder below --root (default: the grid file's name)")
    parser.add_argument("--max_concurrent", type=int, default=None, help="trials at once (default: as many as the "
                        "resources allow)")
    parser.add_argument("--cpus_per_trial", type=float, default=1, help="CPUs Ray reserves per trial (default: %(default)s)")
    parser.add_argument("--gpus_per_trial", type=float, default=0, help="GPUs per trial, fractions allowed "
                        "(default: %(default)s); add `-- --trainer.accelerator gpu`")
    parser.add_argument("--address", default=None, help="Ray cluster to run on, e.g. auto or ray://head:10001 "
                        "(default: start a local Ray for this sweep)")
    parser.add_argument("--retry_failed", action="store_true", help="run failed trials again (default: a rerun "
                        "keeps their failure and runs only unfinished ones)")
    parser.add_argument("--search_only", action="store_true", help="stop after writing best.yaml")
    parser.add_argument("--solo", action="store_true", help="one trial per (setting, seed) instead of population "
                        "trials (a setting's seeds, and settings that differ only in per-member values, trained together "
                        "in one fit)")
    parser.add_argument("--members_per_trial", type=int, default=8, help="most runs one population trial holds "
                        "(default: %(default)s; raise it on a GPU, where a population of hundreds costs about one run)")
    parser.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                        help="draw the final report's PNG figures (as cl-lightning report)")
    parser.add_argument("--dry_run", action="store_true", help="print the search trials' commands; run nothing")
    return parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv), extra


def main(argv: Sequence[str] | None = None) -> None:
    """``cl-lightning sweep``; ``argv`` are the arguments after ``sweep`` (default: ``sys.argv[2:]``).
    Ctrl-C ends it with one line naming the rerun, which resumes the sweep."""
    argv = list(sys.argv[2:] if argv is None else argv)
    try:
        sweep(*parse_args(argv))
    except KeyboardInterrupt:
        from cl_lightning.launch.process import interrupted_exit

        interrupted_exit(f"cl-lightning sweep {shlex.join(argv)}")


def sweep(args: argparse.Namespace, extra: list[str]) -> None:
    """The sweep's phases, from the parsed arguments and the ``fit`` overrides after ``--``."""
    from cl_lightning.analysis.tables import write_report
    from cl_lightning.rundir import has_failed, is_finished
    from cl_lightning.sweep.trial import TrialSpec

    grid = load_grid(args.grid)
    if args.members_per_trial < 1:  # before the dry run too, which packs the trials
        raise SweepError(f"--members_per_trial must be at least 1, got {args.members_per_trial}")
    if not args.config.is_file():
        raise SweepError(f"no base config {args.config}: pass one of configs/<method>/<benchmark>.yaml "
                         "(run from the repository root)")
    config = args.config.resolve()
    method, benchmark = config.parent.name, config.stem
    resolved = yaml.safe_load(resolve_config(["--config", str(config), *extra]))
    check_keys(grid, resolved, args.config)
    member_keys = per_member_keys(resolved)
    root = (args.root / (args.name or args.grid.stem)).resolve()
    search = search_specs(grid, config, method, benchmark, root, extra)
    if args.dry_run:
        pending = []
        for spec in (s for specs in search.values() for s in specs):
            if is_finished(spec.folder) or (has_failed(spec.folder) and not args.retry_failed):
                print(f"{spec.name}: {'finished' if is_finished(spec.folder) else 'failed'} already")
            else:
                pending.append(spec)
        for job in jobs_of(pending, args, member_keys):
            print(f"{job.name}: cl-lightning {' '.join(job.fit_args())}")
        return
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise SweepError(f"--max_concurrent must be at least 1, got {args.max_concurrent}")
    claim(root, config, args.grid)
    start = time.monotonic()
    with ray_session(args.address):
        run_phase("search", [s for specs in search.values() for s in specs], args, root / "ray", member_keys)
        chosen = select(grid, search, config, extra, root, args)
        if args.search_only:
            return
        # best.yaml holds the overrides after `--` already
        finals = [TrialSpec(root / "final", benchmark, method, seed, ["--config", str(root / "best.yaml")], Path.cwd())
                  for seed in grid.final_seeds]
        run_phase("final", finals, args, root / "ray")
    report, files = write_report(root / "final", draw=args.plots)
    print(f"\nTest split, best setting {chosen.label}, seeds {grid.final_seeds}: average accuracy (%) ± std / forgetting ± std\n"
          f"{report.table()}\nwritten: {files[0]}; sweep wall time {time.monotonic() - start:.0f} s", flush=True)
    failed = [run.name for run in report.not_finished]
    if failed:
        raise SweepError(f"{len(failed)} final run(s) did not finish: {', '.join(failed)}; fix the cause and rerun the same "
                         "command with --retry_failed (finished runs are kept)")
