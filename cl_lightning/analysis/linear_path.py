"""``cl-lightning path``: loss and accuracy along the straight line between two solutions.

The paper's evidence (Mirzadeh et al., ICLR 2021, §3 and §5) is the loss on task t₁'s test
data at w(α) = (1 - α) w_start + α w_end, α in [0, 1] (41 points in the paper): continual
solutions w_hat_{t₁} → w_hat_{t₂} cross a loss barrier on task t₁, while MC-SGD's
w_hat_{t₁} → w_bar_{t₂} stays low. ``--solutions t₁ t₂`` draws exactly that from the vectors an
MC-SGD run saved with ``save_solutions: true``; ``--start/--end`` takes any two endpoints:
Lightning checkpoints (``.ckpt``) or flat parameter vectors (``.pt``).

The network and the tasks are rebuilt from the run's ``config.yaml`` (its ``model``, ``data``
and ``seed_everything`` sections: the seed fixes the permutations and class splits), so the
points are evaluated on the very tasks the run trained on. Only parameters are interpolated;
the package's networks have no buffers (their BatchNorms use batch statistics, evaluated in
batches of ``data.eval_batch_size`` as the accuracy matrix is).

torch, Lightning and matplotlib are imported inside the functions that use them: ``path --help``
(which lists no ``--model.*``/``--data.*`` options) answers before any of them loads.
"""

from __future__ import annotations

import argparse
import csv
import io
import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser
from jsonargparse.typing import PositiveInt

from cl_lightning.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

    from cl_lightning.data.datamodule import ContinualDataModule
    from cl_lightning.models.module import ContinualModule

#: Data split the path is evaluated on.
Split = Literal["train", "val", "test"]

ENDPOINT_HELP = "a Lightning checkpoint (.ckpt) or a flat vector saved by MC-SGD's save_solutions (solutions/w_hat_XX.pt)"


class EndpointError(UserError, ValueError):
    """An endpoint file that is not a solution of the configured network."""


@dataclass
class PathResult:
    """Loss and accuracy (%) at each α (rows) on each task (columns, 0-based task ids in ``tasks``)."""

    label: str
    alphas: Tensor
    tasks: list[int]
    loss: Tensor
    accuracy: Tensor


def load_endpoint(path: Path, module: ContinualModule) -> Tensor:
    """The flat parameter vector (a plain network's parameter order) stored in ``path``: a saved
    solution, or the weights of a checkpoint (of the config's member, if it is a population's)."""
    import torch

    from cl_lightning.models.module import take_members

    expected = module.population.flat().shape[1]
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise EndpointError(f"cannot load {path} ({err}); pass {ENDPOINT_HELP}") from err
    if isinstance(stored, torch.Tensor):
        if stored.dim() != 1 or stored.numel() != expected:
            raise EndpointError(f"{path} holds a tensor of shape {tuple(stored.shape)}, but the network of the config has "
                                f"{expected} parameters: pass the config.yaml of the run that saved it")
        return stored.to(module.population.flat().dtype)
    if isinstance(stored, dict) and "state_dict" in stored:
        saved = (stored.get("hyper_parameters") or {}).get("seeds") or list(module.seeds)
        if not set(module.seeds) <= set(saved):
            raise EndpointError(f"the checkpoint {path} holds the members with seeds {saved}, not {list(module.seeds)}: "
                                "pass the config.yaml of a run (or member) it trained")
        state = take_members(stored["state_dict"], saved, module.seeds, module.hparams.get("population_member"))
        try:
            module.population.load_state_dict({k.removeprefix("population."): v for k, v in state.items()
                                               if k.startswith("population.")})
        except RuntimeError as err:
            raise EndpointError(f"the checkpoint {path} does not fit the network of the config ({err}); "
                                "pass the config.yaml of the run that wrote it") from err
        return module.population.flat()[0].cpu()
    raise EndpointError(f"{path} holds a {type(stored).__name__}, not a solution; pass {ENDPOINT_HELP}")


def interpolate(module: ContinualModule, dm: ContinualDataModule, start: Tensor, end: Tensor, tasks: list[int],
                points: int = 41, split: str = "test", label: str = "") -> PathResult:
    """Loss and accuracy on ``tasks`` at ``points`` evenly spaced α in [0, 1] from ``start`` to ``end``.

    ``torch.lerp`` gives exactly ``start`` at α = 0 and exactly ``end`` at α = 1.
    """
    import torch

    from cl_lightning.evaluation.evaluate import task_metrics

    device = module.device
    start, end = start.to(device), end.to(device)
    alphas = torch.linspace(0, 1, points, dtype=torch.float64)
    loss = torch.empty(points, len(tasks), dtype=torch.float64)
    accuracy = torch.empty_like(loss)
    for j, alpha in enumerate(alphas.tolist()):
        module.population.load_flat(torch.lerp(start, end, alpha).unsqueeze(0))
        member_loss, member_accuracy = task_metrics(module, dm, tasks, split)
        loss[j], accuracy[j] = member_loss[0], member_accuracy[0]
    return PathResult(label, alphas, tasks, loss, accuracy)


def to_csv(results: Sequence[PathResult]) -> str:
    """Long format: one row per (path, α, task); tasks 1-based as everywhere in files."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "alpha", "task", "loss", "accuracy"])
    for r in results:
        for j, alpha in enumerate(r.alphas.tolist()):
            for k, task in enumerate(r.tasks):
                writer.writerow([r.label, f"{alpha:.6g}", task + 1, f"{r.loss[j, k].item():.6g}", f"{r.accuracy[j, k].item():.4f}"])
    return out.getvalue()


def describe(results: Sequence[PathResult]) -> str:
    """Per path and task: loss at both ends and the highest loss on the way (the barrier)."""
    lines = []
    for r in results:
        for k, task in enumerate(r.tasks):
            loss = r.loss[:, k]
            top = int(loss.argmax())
            lines.append(f"{r.label}, task {task + 1}: loss {loss[0]:.4f} -> {loss[-1]:.4f}, highest {loss[top]:.4f} at "
                         f"α={r.alphas[top]:.3f}; accuracy {r.accuracy[0, k]:.2f} % -> {r.accuracy[-1, k]:.2f} %")
    return "\n".join(lines)


def run_folder_of(endpoint: Path) -> Path:
    """The run folder an endpoint file belongs to: the folder above ``checkpoints/`` or
    ``solutions/``, else the file's own folder."""
    folder = endpoint.absolute().parent
    return folder.parent if folder.name in ("checkpoints", "solutions") else folder


def endpoint_names(start: Path, end: Path) -> tuple[str, str]:
    """Names that tell two endpoints apart: the parts of their run folders that differ (e.g.
    ``version_3`` vs ``version_4``, ``mcsgd/seed_0`` vs ``naive/seed_0``; the run folder's own name when
    both are in one run), then the file's stem. Two ``last.ckpt`` are ``version_3/last`` and
    ``version_4/last``, not both ``last``."""
    runs = [run_folder_of(p).parts for p in (start, end)]
    differ = [i for i, (a, b) in enumerate(zip(*runs)) if a != b] if len(runs[0]) == len(runs[1]) else []
    names = []
    for parts, path in zip(runs, (start, end)):
        prefix = "/".join(parts[i] for i in differ) if differ else parts[-1]
        names.append(f"{prefix}/{path.stem}")
    return names[0], names[1]


def check_new(files: Sequence[Path], overwrite: bool) -> str | None:
    """The problem with writing ``files``, if one exists already and ``overwrite`` is off: an earlier
    analysis is never replaced silently."""
    existing = [str(f) for f in files if f.exists()]
    if existing and not overwrite:
        return (f"{', '.join(existing)} already exist{'s' * (len(existing) == 1)} (an earlier `path` call): pass "
                "--overwrite to replace, or --out <folder> to write elsewhere")
    return None


def build(parser: ArgumentParser, argv: list[str]) -> tuple:
    """Parse ``argv`` (with ``--config`` reduced to its model/data/seed sections) into the arguments,
    the module and the set-up datamodule."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if (arg == "--config" and i + 1 < len(argv)) or arg.startswith("--config="):
            value_at = i + 1 if arg == "--config" else i
            path = Path(argv[value_at].removeprefix("--config="))
            try:
                config = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError) as err:
                parser.error(f"cannot read --config {path}: {err}")
            if not isinstance(config, dict) or "model" not in config:
                parser.error(f"--config {path} has no `model:` section: pass a run's config.yaml or a configs/*.yaml file")
            kept = {key: config[key] for key in ("model", "data", "seed_everything") if key in config}
            argv[i: value_at + 1] = ["--config", yaml.safe_dump(kept)]
            args = parser.parse_args(argv)
            args.config_path = path
            break
    else:
        args = parser.parse_args(argv)
        args.config_path = None
    if args.data.seed is None and isinstance(args.seed_everything, int) and not isinstance(args.seed_everything, bool):
        args.data.seed = args.seed_everything  # the run's seed: same permutations / class splits
    if args.model.get("seeds") is None and args.data.seed is not None:
        args.model.seeds = [args.data.seed]  # the member of a population's checkpoint this config is
    objects = parser.instantiate(args) if hasattr(parser, "instantiate") else parser.instantiate_classes(args)
    module, dm = objects.model, objects.data
    dm.setup()
    module.class_mask = dm.class_mask
    module.to(args.device)
    return args, module, dm


def make_parser(run_options: bool = True) -> ArgumentParser:
    """The command's parser. ``run_options=False`` leaves out the run's ``--model.*`` and ``--data.*``
    options (the network's and the datamodule's, whose classes need torch and Lightning): the parser
    that ``--help`` needs, as the help hides them anyway (:func:`hide_from_help`)."""
    parser = ArgumentParser(
        prog="cl-lightning path",
        allow_abbrev=False,  # a typo must not silently set another option
        usage="cl-lightning path --config <run>/config.yaml (--start A --end B | --solutions T1 T2) [options]",
        description="Loss and accuracy along the straight line between two solutions, on chosen tasks' data: a CSV "
        "(path, alpha, task, loss, accuracy) and a PNG. --solutions T1 T2 is the paper's §5 picture (an MC-SGD run "
        "with --trainer.callbacks.init_args.save_solutions true). The --model.* and --data.* options of "
        "`cl-lightning fit --help` override the config, e.g. --data.root.",
    )
    parser.add_argument("--config", action=ActionConfigFile,
                        help="the run's config.yaml (only its model, data and seed_everything sections are used)")
    parser.add_argument("--start", type=Path | None, default=None, help=f"start of the line (α = 0): {ENDPOINT_HELP}")
    parser.add_argument("--end", type=Path | None, default=None, help="end of the line (α = 1), as --start")
    parser.add_argument("--solutions", type=PositiveInt, nargs=2, default=None, metavar=("T1", "T2"),
                        help="two tasks T1 < T2 (1-based): w_hat_T1 -> w_hat_T2 against w_hat_T1 -> w_bar_T2, "
                        "read from <config's folder>/solutions/")
    parser.add_argument("--tasks", type=PositiveInt, nargs="+", default=None,
                        help="tasks (1-based) to evaluate; default: all, or T1 with --solutions")
    parser.add_argument("--points", type=PositiveInt, default=41, help="number of evenly spaced α in [0, 1] (paper: 41)")
    parser.add_argument("--split", type=Split, default="test", help="data split to evaluate")
    parser.add_argument("--device", type=str, default="cpu", help="torch device to evaluate on, e.g. cuda")
    parser.add_argument("--out", type=Path | None, default=None,
                        help="folder for the CSV and the PNG (default: <config's folder>/linear_path)")
    parser.add_argument("--overwrite", type=bool, default=False,
                        help="replace the CSV and PNG of an earlier call with the same endpoints (default: refuse)")
    parser.add_argument("--seed_everything", type=int | bool | None, default=None, help="the run's seed (from its config)")
    if run_options:
        from cl_lightning.data.datamodule import ContinualDataModule
        from cl_lightning.models.module import ContinualModule

        parser.add_class_arguments(ContinualModule, "model")
        parser.add_class_arguments(ContinualDataModule, "data")
        hide_from_help(parser, "model", "data")
    return parser


def hide_from_help(parser: ArgumentParser, *sections: str) -> None:
    """Keep the ``--<section>.*`` options but leave them out of ``--help``: they are the run's own
    ``fit`` options, documented by ``cl-lightning fit --help``, and listed here (130 lines) they
    would push this command's own options off the screen."""
    for section in sections:
        for action in parser.groups[section]._group_actions:
            action.help = argparse.SUPPRESS


def run(argv: Sequence[str]) -> list[Path]:
    """The command: returns the files written."""
    if "-h" in argv or "--help" in argv:
        make_parser(run_options=False).parse_args(["--help"])
    import numpy as np

    from cl_lightning.analysis import plots
    from cl_lightning.rundir import solution_path

    parser = make_parser()
    args, module, dm = build(parser, list(argv))
    if (args.solutions is None) == (args.start is None or args.end is None):
        parser.error("give either --start and --end, or --solutions T1 T2")
    run_folder = args.config_path.parent if args.config_path else Path(".")
    out = args.out or run_folder / "linear_path"
    if args.solutions is not None:
        if not 1 <= args.solutions[0] < args.solutions[1] <= dm.num_tasks:
            parser.error(f"--solutions needs two tasks 1 <= T1 < T2 <= {dm.num_tasks}, got {args.solutions}")
        t1, t2 = (t - 1 for t in args.solutions)
        files = {name: solution_path(run_folder, kind, t) for name, kind, t in
                 (("start", "w_hat", t1), ("continual", "w_hat", t2), ("mcsgd", "w_bar", t2))}
        absent = [str(p) for p in files.values() if not p.exists()]
        if absent:
            parser.error(f"missing {', '.join(absent)}: run MC-SGD with --trainer.callbacks.init_args.save_solutions true, "
                         "and pass that run's config.yaml (the solutions/ folder sits next to it)")
        tasks = [t - 1 for t in args.tasks] if args.tasks else [t1]
        endpoints = [(f"w_hat_{t1 + 1} -> w_hat_{t2 + 1}", files["start"], files["continual"]),
                     (f"w_hat_{t1 + 1} -> w_bar_{t2 + 1}", files["start"], files["mcsgd"])]
        stem = f"solutions_{t1 + 1:02d}_{t2 + 1:02d}"
    else:
        tasks = [t - 1 for t in args.tasks] if args.tasks else list(range(dm.num_tasks))
        start, end = endpoint_names(args.start, args.end)
        endpoints = [(f"{start} -> {end}", args.start, args.end)]
        stem = f"path_{start}_to_{end}".replace("/", "-")
    if not all(0 <= t < dm.num_tasks for t in tasks):
        parser.error(f"--tasks must be in 1..{dm.num_tasks}, got {[t + 1 for t in tasks]}")
    files = [out / f"{stem}.csv", out / f"{stem}.png"]
    if problem := check_new(files, args.overwrite):
        parser.error(problem)
    results = [interpolate(module, dm, load_endpoint(a, module), load_endpoint(b, module), tasks, args.points, args.split, label)
               for label, a, b in endpoints]
    out.mkdir(parents=True, exist_ok=True)
    files[0].write_text(to_csv(results))
    series = [(f"{r.label}, task {task + 1}" if len(r.tasks) > 1 or len(results) == 1 else r.label,
               r.loss[:, k].numpy(), r.accuracy[:, k].numpy()) for r in results for k, task in enumerate(r.tasks)]
    shown = "" if len(tasks) > 4 else f", task{'s' * (len(tasks) > 1)} {', '.join(str(t + 1) for t in tasks)}"
    title = f"linear path, {args.split} split{shown}"
    plots.linear_path(np.asarray(results[0].alphas), series, title, files[1])
    print(describe(results))
    return files


def main(argv: Sequence[str] | None = None) -> None:
    """``cl-lightning path``; ``argv`` are the arguments after ``path`` (default: ``sys.argv[2:]``)."""
    files = run(sys.argv[2:] if argv is None else argv)
    print(f"written: {', '.join(map(str, files))}")
