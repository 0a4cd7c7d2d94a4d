"""The method contract, checked for every registered method: a method added later (its file in
``cl_lightning/methods/`` and its offline config ``configs/<name>/permuted_digits.yaml``) is tested here
without a line of test code.

- Member 0 of a population is its solo run (a population of one), bitwise, whatever member 1's seed,
  per-member settings or divergence: member 1's weights turn NaN in the middle of task 2, and member 1
  alone is stopped.
- The method's state survives a checkpoint round trip (``weights_only``), also into a fresh method
  whose state is loaded before ``setup``.
- A run killed (SIGKILL) in the middle of a task and resumed from its checkpoint ends bitwise as the
  uninterrupted run: accuracy-matrix files, weights and the method's state.
- Under DDP on two CPU processes both hold the same weights and method state after every task.

Each method runs with the init arguments of its shipped digits config, on permuted 8x8 digits.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import processes
import pytest
import torch
import yaml
from ddp_probes import MethodStateAgreement, state_tensors, two_process_strategy
from lightning.pytorch import Callback, Trainer, seed_everything
from sequence_runs import fit_permuted_digits

from cl_lightning.callbacks.guards import FiniteGuard
from cl_lightning.cli.lightning_cli import cli_main
from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.evaluation.accuracy_matrix import AccuracyMatrix
from cl_lightning.methods.base import Method
from cl_lightning.methods.registry import method_class, registered_methods
from cl_lightning.models.member_settings import per_member_settings
from cl_lightning.models.module import ContinualModule
from cl_lightning.models.nets import MLP

CONFIGS = Path(__file__).parents[2] / "configs"
FAULTS = Path(__file__).parents[1] / "cli" / "faults"
METHODS = registered_methods()
NUM_TASKS = 3
pytestmark = pytest.mark.slow  # whole training runs, processes


def digits_config(method: type[Method]) -> Path:
    return CONFIGS / method.__name__.lower() / "permuted_digits.yaml"


def init_args(method: type[Method]) -> dict:
    """The method's init arguments in its shipped offline config."""
    config = yaml.safe_load(digits_config(method).read_text())
    callbacks = config["trainer"]["callbacks"]
    entry = next(c for c in callbacks if method_class(c["class_path"]) is method)
    return dict(entry.get("init_args") or {})


def make(method: type[Method], **overrides) -> Method:
    return method(**{**init_args(method), **overrides})


def member_one_differs(method: type[Method]) -> dict:
    """Per-member settings where member 1 takes another (valid) value than member 0."""
    args = init_args(method)
    defaults = {name: p.default for name, p in inspect.signature(method).parameters.items()}
    return {name: [float(value), float(value) / 2 or 0.5]
            for name in per_member_settings(method) for value in [args.get(name, defaults[name])]}


def same_state(a: dict, b: dict) -> bool:
    ta, tb = state_tensors(a), state_tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


class PoisonMember(Callback):
    """Member ``member``'s weights become NaN before the middle batch of task 2."""

    def __init__(self, member: int) -> None:
        self.member = member

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        task = trainer.datamodule.task_of_epoch(trainer.current_epoch)
        if task == 1 and batch_idx == trainer.num_training_batches // 2:
            with torch.no_grad():
                for p in pl_module.population.stacked.parameters():
                    p[self.member] = float("nan")


@pytest.fixture(scope="module", params=METHODS, ids=lambda m: m.__name__)
def solo(request, tmp_path_factory):
    """The method's solo run with seed 0: (method, accuracy matrix, module)."""
    method = make(request.param)
    matrix, module = fit_permuted_digits(tmp_path_factory.mktemp("solo"), [method, FiniteGuard()],
                                         num_tasks=NUM_TASKS, hidden=(32,))
    return method, matrix, module


def test_a_member_is_its_solo_run_whatever_the_other_member_does(solo, tmp_path):
    method, matrix, module = solo
    cls = type(method)
    population = make(cls, **member_one_differs(cls))
    matrices, members = fit_permuted_digits(tmp_path, [population, PoisonMember(1), FiniteGuard(check_every_n_batches=5)],
                                            num_tasks=NUM_TASKS, hidden=(32,), seeds=[0, 2], lr=[0.1, 0.05])
    assert torch.equal(matrices[0].nan_to_num(-1), matrix.nan_to_num(-1))
    assert torch.equal(members.population.flat()[0], module.population.flat()[0])
    assert members.failed.tolist() == [False, True]  # member 1 alone was stopped
    assert not matrices[1, 0, 0].isnan() and matrices[1, 1:].isnan().all()  # its row of task 1 is kept


def test_the_state_survives_a_checkpoint_round_trip(solo, tmp_path):
    method, _, module = solo
    torch.save(method.state_dict(), tmp_path / "state.pt")
    restored = make(type(method))
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))  # before setup: applied there
    restored.setup(module.trainer, module, "fit")
    assert same_state(restored.method_state(), method.method_state())




def final_state(run: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A run's accuracy-matrix files, its last checkpoint's weights and its methods' states."""
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    methods = {key: state_tensors(value) for key, value in checkpoint["callbacks"].items()
               if method_class(key.split("{")[0])}
    return {p.name: p.read_text() for p in sorted(run.glob("*accuracy_matrix.*"))}, checkpoint["state_dict"], methods


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
def test_a_sigkill_mid_task_then_resume_ends_as_the_uninterrupted_run(method, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(FAULTS))  # the killed run's config.yaml names the injector
    run_args = ["--config", str(digits_config(method)), "--data.num_tasks", str(NUM_TASKS), "--trainer.deterministic",
                "true", "--accuracy_matrix.print_table", "false", "--trainer.enable_model_summary", "false",
                "--trainer.enable_progress_bar", "false", "--model.net.init_args.hidden_sizes", "[32]"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cli_main(["fit", *run_args, "--trainer.logger.init_args.save_dir", str(straight)])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")])}
    faulted = processes.run(
        ["fit", *run_args, "--trainer.logger.init_args.save_dir", str(killed), "--trainer.callbacks+=injector.FaultInjector",
         "--trainer.callbacks.point", "mid_task", "--trainer.callbacks.task", "1"], env=env)
    assert faulted.returncode == -9, faulted.stderr[-3000:]
    run = killed / "lightning_logs" / "version_0"
    cli_main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    (files, weights, states), (files0, weights0, states0) = final_state(run), final_state(straight / "lightning_logs" / "version_0")
    assert files == files0 and "accuracy_matrix.json" in files
    assert weights.keys() == weights0.keys() and all(torch.equal(weights[k], weights0[k]) for k in weights)
    assert states.keys() == states0.keys() == {method.__qualname__}
    assert all(torch.equal(states[m][k], states0[m][k]) for m in states for k in states0[m])


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
def test_two_processes_hold_the_same_state_after_every_task(method, tmp_path):
    seed_everything(0)
    dm = ContinualDataModule(source="digits", benchmark="permuted", num_tasks=NUM_TASKS, batch_size=16, seeds=[0, 3])
    # the seeds here too: the strategy loads the children's weights back into this (never set up) module
    module = ContinualModule(MLP(64, [32], 10, dropout=0.25), lr=0.1, seeds=[0, 3])
    instance, out = make(method), tmp_path / "agreement.jsonl"
    trainer = Trainer(
        **dm.trainer_settings(), accelerator="cpu", devices=2, strategy=two_process_strategy(),
        callbacks=[instance, MethodStateAgreement(instance, str(out)), AccuracyMatrix(print_table=False),
                   FiniteGuard(check_every_n_batches=7)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, dm)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.pop("task") for r in records] == list(range(NUM_TASKS))
    for r in records:
        assert r.pop("world_size") == 2 and r and all(r.values()), r
