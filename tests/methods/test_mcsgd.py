"""MC-SGD trained for real on small seeded task sequences."""

import json
from pathlib import Path

import pytest
import torch
from sequence_runs import assert_same_run, fit_permuted_digits, straight_and_resumed
from torch.nn.utils import parameters_to_vector

from cl_lightning.cli import cli_main
from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.methods.base import TaskAwareCallback
from cl_lightning.methods.mcsgd import MCSGD
from cl_lightning.metrics.evaluate import task_accuracies
from cl_lightning.models.module import ContinualModule
from cl_lightning.models.nets import MLP

CONFIGS = Path(__file__).parents[2] / "configs"


def flat(module) -> torch.Tensor:
    return parameters_to_vector(module.net.parameters()).detach().clone()


class Probe(TaskAwareCallback):
    """Records, after MC-SGD acted, where each task starts and what is kept after it."""

    def __init__(self, mcsgd: MCSGD) -> None:
        self.mcsgd = mcsgd
        self.start, self.kept, self.w_hat, self.w_bar, self.accuracy = {}, {}, {}, {}, {}

    def on_task_start(self, trainer, pl_module, task):
        self.start[task] = flat(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):  # runs after the task's validation
        task = trainer.datamodule.task_of_epoch(trainer.current_epoch)
        self.kept[task] = flat(pl_module)
        self.w_hat[task], self.w_bar[task] = self.mcsgd.w_hat.clone(), self.mcsgd.w_bar.clone()
        self.accuracy[task] = task_accuracies(pl_module, trainer.datamodule, list(range(task + 1)), "test")


MCSGD_ARGS = {"alpha0": 0.25, "lr": 0.005, "batch_size": 16, "subset_size": 64}
RUN_ARGS = {"num_tasks": 3, "hidden": (64, 64), "dropout": 0.25, "lr_decay": 0.8}


def fit_mcsgd(tmp_path, **mcsgd_args):
    """3 permuted-digits tasks with MC-SGD and a probe behind it: (mcsgd, probe, matrix, module)."""
    mcsgd = MCSGD(**{**MCSGD_ARGS, **mcsgd_args})
    probe = Probe(mcsgd)
    matrix, module = fit_permuted_digits(tmp_path, [mcsgd, probe], **RUN_ARGS)
    return mcsgd, probe, matrix, module


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return fit_mcsgd(tmp_path_factory.mktemp("mcsgd"))


def test_matrix_row_t_is_accuracy_of_w_bar_t(digits_run):
    mcsgd, probe, matrix, _ = digits_run
    for task in range(3):
        assert torch.equal(probe.kept[task], probe.w_bar[task])  # the model evaluated after task t is w_bar_t
        assert matrix[task, : task + 1].tolist() == pytest.approx(probe.accuracy[task].tolist(), abs=1e-4)  # logged as float32
    assert not torch.equal(probe.w_bar[2], probe.w_hat[2])  # consolidation moved the weights


def test_first_task_is_not_consolidated(digits_run):
    _, probe, _, _ = digits_run
    assert torch.equal(probe.w_bar[0], probe.w_hat[0])


def test_next_task_starts_from_w_hat_by_default(digits_run):
    _, probe, _, _ = digits_run
    for task in (1, 2):
        assert torch.equal(probe.start[task], probe.w_hat[task - 1])


def test_next_task_can_start_from_w_bar(tmp_path):
    _, probe, _, _ = fit_mcsgd(tmp_path, next_task_start="w_bar")
    for task in (1, 2):
        assert torch.equal(probe.start[task], probe.w_bar[task - 1])


def test_consolidation_starts_at_alpha0_on_the_segment(tmp_path):
    # with a vanishing learning rate w_bar_t stays at its starting point
    _, probe, _, _ = fit_mcsgd(tmp_path, lr=1e-30, alpha0=0.3)
    for task in (1, 2):
        expected = probe.w_bar[task - 1] + 0.3 * (probe.w_hat[task] - probe.w_bar[task - 1])
        torch.testing.assert_close(probe.w_bar[task], expected)


def test_consolidation_lowers_the_line_losses(tmp_path):
    dm = ContinualDataModule(source="digits", benchmark="permuted", num_tasks=2, seed=0)
    dm.setup()
    torch.manual_seed(0)
    module = ContinualModule(MLP(64, [64], 10))
    w_bar_prev = flat(module)
    w_hat = w_bar_prev + 0.5 * torch.randn_like(w_bar_prev)  # a far-away "solution" of task 2
    mcsgd = MCSGD(alpha0=0.5, lr=0.05, batch_size=32, subset_size=256, epochs=3)
    trainer = type("TrainerStandIn", (), {"datamodule": dm, "log_dir": str(tmp_path), "default_root_dir": tmp_path})
    mcsgd.setup(trainer, module, "fit")
    for task in (0, 1):
        mcsgd.memory.add_task(dm, task, dm.resolved_seed)
    start = w_bar_prev + 0.5 * (w_hat - w_bar_prev)

    def line_losses(w):
        memory = [mcsgd.line(w_bar_prev, w, *mcsgd._line_batch(b, w.device, None))[1].mean()
                  for b in mcsgd._memory_batches(dm, 1)]
        subset = [mcsgd.line(w_hat, w, *mcsgd._line_batch(b, w.device, None))[1].mean()
                  for b in mcsgd._subset_batches(dm, 1)]
        return torch.stack(memory).mean() + torch.stack(subset).mean()

    w_bar, losses = mcsgd.consolidate(dm, module, 1, w_bar_prev, w_hat)
    assert line_losses(w_bar) < 0.9 * line_losses(start)
    assert set(losses) == {"line_loss_memory", "line_loss_subset"}


def test_resume_between_tasks_gives_the_same_run(tmp_path):
    straight, resumed = straight_and_resumed(tmp_path, lambda: [MCSGD(**MCSGD_ARGS)], **RUN_ARGS)
    assert_same_run(straight, resumed)
    [straight_mcsgd], [resumed_mcsgd] = straight[0], resumed[0]
    assert torch.equal(resumed_mcsgd.w_bar, straight_mcsgd.w_bar) and torch.equal(resumed_mcsgd.w_hat, straight_mcsgd.w_hat)
    assert resumed_mcsgd.memory.tasks == [0, 1, 2]
    assert all(torch.equal(resumed_mcsgd.memory.indices[t], straight_mcsgd.memory.indices[t]) for t in range(3))


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The README's offline demo for MC-SGD and the same configuration without it."""
    runs = {}
    for method in ("naive", "mcsgd"):
        out = tmp_path_factory.mktemp(method)
        cli_main(["fit", "--config", str(CONFIGS / method / "permuted_digits.yaml"),
                  "--trainer.logger.init_args.save_dir", str(out), "--trainer.enable_progress_bar", "false",
                  "--accuracy_matrix.print_table", "false"])
        runs[method] = out / "lightning_logs" / "version_0"
    return runs


def test_mcsgd_beats_naive_sgd_on_the_digits_demo(demo_runs):
    naive = json.loads((demo_runs["naive"] / "accuracy_matrix.json").read_text())
    mcsgd = json.loads((demo_runs["mcsgd"] / "accuracy_matrix.json").read_text())
    assert mcsgd["average_accuracy"] > naive["average_accuracy"] + 5.0
    assert mcsgd["forgetting"] < naive["forgetting"] - 0.1


def test_w_hat_chain_is_the_naive_run(demo_runs):
    # with next_task_start=w_hat, w_hat_t is plain SGD from w_hat_{t-1}: the naive run, for free
    naive = json.loads((demo_runs["naive"] / "accuracy_matrix.json").read_text())["matrix"]
    w_hat = json.loads((demo_runs["mcsgd"] / "w_hat_accuracy_matrix.json").read_text())["matrix"]
    assert len(w_hat) == len(naive)
    for w_hat_row, naive_row in zip(w_hat, naive):
        assert [v is None for v in w_hat_row] == [v is None for v in naive_row]
        assert [v for v in w_hat_row if v is not None] == pytest.approx(
            [v for v in naive_row if v is not None], abs=1e-4)  # logged values are float32
