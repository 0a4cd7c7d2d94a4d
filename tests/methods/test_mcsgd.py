"""MC-SGD trained for real on small seeded task sequences."""

import json
from pathlib import Path

import pytest
import torch
from sequence_runs import assert_same_run, fit_permuted_digits, straight_and_resumed
from torch.nn.utils import parameters_to_vector

from cl_lightning.cli import cli_main, main
from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.evaluation.evaluate import task_accuracies
from cl_lightning.methods.base import TaskAwareCallback
from cl_lightning.methods.mcsgd import MCSGD
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
        mcsgd.memory.add_task(dm, task)
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


def consolidation_case(tmp_path, **mcsgd_args):
    """Task 3 of permuted digits about to be consolidated: (mcsgd, dm, module, w_bar_prev, w_hat)."""
    dm = ContinualDataModule(source="digits", benchmark="permuted", num_tasks=3, seed=0)
    dm.setup()
    torch.manual_seed(0)
    module = ContinualModule(MLP(64, [32], 10, dropout=0.5))
    w_bar_prev = flat(module)
    w_hat = w_bar_prev + 0.3 * torch.randn_like(w_bar_prev)
    mcsgd = MCSGD(**mcsgd_args)
    trainer = type("TrainerStandIn", (), {"datamodule": dm, "log_dir": str(tmp_path), "default_root_dir": tmp_path})
    mcsgd.setup(trainer, module, "fit")
    for task in range(3):
        mcsgd.memory.add_task(dm, task)
    return mcsgd, dm, module, w_bar_prev, w_hat


def research_full_batch_line_gradient(net, start, w, batches, num_segments=5):
    """Literal emulation of 177f216's ``get_line_loss`` on a whole loader (CL-LinearModeConnectivity,
    core/mode_connectivity.py): at each point alpha in np.arange(0, 1.01, 1/K) the weights are
    overwritten with load_state_dict, the loss is ``get_clf_loss`` (sum over the batches of the
    batch-mean cross-entropy, divided by the number of examples, network in eval mode),
    ``.backward()`` runs without zeroing ``.grad``, and the running ``.grad`` sums are summed."""
    import copy

    import numpy as np
    import torch.nn.functional as F

    model = copy.deepcopy(net).eval()
    names = [name for name, _ in model.named_parameters()]
    accum = None
    for alpha in np.arange(0.0, 1.01, 1.0 / num_segments):
        point = start + (w - start) * alpha
        chunks = point.split([p.numel() for p in model.parameters()])
        model.load_state_dict({n: c.view_as(p) for n, c, p in zip(names, chunks, model.parameters())})
        loss, count = 0, 0
        for x, y, _ in batches:
            count += len(y)
            loss += F.cross_entropy(model(x), y)
        (loss / count).backward()
        grads = torch.cat([p.grad.view(-1) for p in model.parameters()])
        accum = grads if accum is None else accum + grads
    return accum


@pytest.mark.parametrize("momentum", [0.8, 0.0])
def test_full_batch_epoch_is_one_sgd_step_on_the_summed_line_gradients(tmp_path, momentum):
    # subset of 100 in batches of 32: 32, 32, 32, 4 (an uneven last batch, as 177f216's 200 in 64s)
    lr = 0.05
    mcsgd, dm, module, w_bar_prev, w_hat = consolidation_case(
        tmp_path, steps="full_batch", alpha0=0.5, lr=lr, momentum=momentum, batch_size=32, subset_size=100)
    memory, subset = mcsgd._memory_batches(dm, 2), mcsgd._subset_batches(dm, 2)
    assert [len(b[1]) for b in memory] == [10, 10, 10] and [len(b[1]) for b in subset] == [32, 32, 32, 4]
    w0 = w_bar_prev + 0.5 * (w_hat - w_bar_prev)
    grad = (research_full_batch_line_gradient(module.net, w_bar_prev, w0, memory)
            + research_full_batch_line_gradient(module.net, w_hat, w0, subset))
    w_bar, _ = mcsgd.consolidate(dm, module, 2, w_bar_prev, w_hat)
    # one step of a fresh SGD: the momentum buffer starts as the gradient itself
    step, expected = w_bar - w0, -lr * grad
    assert ((step - expected).norm() / expected.norm()).item() < 1e-5  # float32 rounding only


def test_full_batch_epochs_are_steps_of_one_optimizer(tmp_path):
    # 177f216 creates the SGD once per task and takes one step per lmc epoch: momentum carries over
    lr, momentum = 0.05, 0.8
    mcsgd, dm, module, w_bar_prev, w_hat = consolidation_case(
        tmp_path, steps="full_batch", alpha0=0.5, lr=lr, momentum=momentum, batch_size=32, subset_size=100, epochs=2)
    memory, subset = mcsgd._memory_batches(dm, 2), mcsgd._subset_batches(dm, 2)

    def line_gradient(w):
        return (research_full_batch_line_gradient(module.net, w_bar_prev, w, memory)
                + research_full_batch_line_gradient(module.net, w_hat, w, subset))

    w0 = w_bar_prev + 0.5 * (w_hat - w_bar_prev)
    g0 = line_gradient(w0)
    w1 = w0 - lr * g0
    w2 = w1 - lr * (momentum * g0 + line_gradient(w1))
    w_bar, _ = mcsgd.consolidate(dm, module, 2, w_bar_prev, w_hat)
    assert ((w_bar - w2).norm() / (w2 - w0).norm()).item() < 1e-5


def test_minibatch_and_full_batch_differ(tmp_path):
    args = {"alpha0": 0.5, "lr": 0.05, "batch_size": 32, "subset_size": 100}
    results = {steps: consolidation_case(tmp_path, steps=steps, **args) for steps in ("minibatch", "full_batch")}
    w_bars = {steps: mcsgd.consolidate(dm, module, 2, w_prev, w_hat)[0]
              for steps, (mcsgd, dm, module, w_prev, w_hat) in results.items()}
    assert not torch.allclose(w_bars["minibatch"], w_bars["full_batch"])


def test_bad_steps_are_refused():
    with pytest.raises(ValueError, match="steps must be one of"):
        MCSGD(steps="fullbatch")


@pytest.mark.parametrize("per_class", [1, 7])
def test_class_balanced_subset_on_split_cifar100(cifar_root, per_class):
    dm = ContinualDataModule(source="cifar100", root=str(cifar_root), benchmark="split", num_tasks=3,
                             classes_per_task=5, seed=0)
    dm.setup()
    mcsgd = MCSGD(subset_size=None, subset_per_class=per_class, batch_size=4, memory_per_task=None, memory_per_class=1)
    for task in range(3):
        dataset = dm.task_dataset(task, "train")
        index = mcsgd._subset_index(dm, task)
        assert len(index.unique()) == len(index) == 5 * per_class  # no duplicates
        labels = dataset.base.targets[dataset.base_index][index]
        assert labels.bincount(minlength=100).tolist() == [per_class if 5 * task <= c < 5 * task + 5 else 0
                                                           for c in range(100)]
        batches = mcsgd._subset_batches(dm, task)
        assert torch.equal(torch.cat([y for _, y, _ in batches]), labels)
    if per_class == 7:  # shuffled: batches mix the classes
        assert len(mcsgd._subset_batches(dm, 0)[0][1].unique()) > 1


def test_a_subset_larger_than_a_class_is_refused_before_training(cifar_root, tmp_path):
    args = ["fit", "--config", str(CONFIGS / "mcsgd" / "split_cifar100.yaml"), "--data.root", str(cifar_root),
            "--data.num_tasks", "3", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:  # the fake data has 20 examples per class, the config takes 100
        main(args)
    assert str(exit_info.value.code) == ("error: MC-SGD's subset of the current task takes 100 examples per class, "
                                         "but class 0 of task 1 has 20; lower `subset_per_class`")
    assert not list(tmp_path.rglob("*.ckpt"))


def test_subset_needs_exactly_one_size():
    with pytest.raises(ValueError, match="set exactly one of `subset_size` or `subset_per_class`"):
        MCSGD(subset_per_class=100)


@pytest.mark.parametrize("config, steps, subset", [
    ("rotated_mnist", "full_batch", (200, None, True)),          # 177f216
    ("rotated_fashion_mnist", "full_batch", (200, None, True)),
    ("permuted_mnist", "minibatch", (2000, None, True)),         # 73355dd
    ("permuted_fashion_mnist", "minibatch", (2000, None, True)),
    ("split_cifar100", "minibatch", (None, 100, False)),         # f1669fe
])
def test_shipped_configs_follow_their_commits(config, steps, subset):
    import yaml

    init_args = yaml.safe_load((CONFIGS / "mcsgd" / f"{config}.yaml").read_text())["trainer"]["callbacks"][0]["init_args"]
    mcsgd = MCSGD(**init_args)
    assert mcsgd.steps == steps and mcsgd.epochs == 1
    assert (mcsgd.subset.per_task, mcsgd.subset.per_class, mcsgd.subset.per_class is None and mcsgd.subset.replacement) == subset


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
    # full-batch: one step per task needs a larger consolidation lr; measured on seed 0 (average accuracy):
    # lr 0.005 52.2, 0.05 57.7, 0.5 18.9; naive 44.2, minibatch MC-SGD 61.7
    full_batch = ["--trainer.callbacks.init_args.steps", "full_batch", "--trainer.callbacks.init_args.lr", "0.05"]
    for run, method, extra in (("naive", "naive", []), ("mcsgd", "mcsgd", []), ("mcsgd_full_batch", "mcsgd", full_batch)):
        out = tmp_path_factory.mktemp(run)
        cli_main(["fit", "--config", str(CONFIGS / method / "permuted_digits.yaml"),
                  "--trainer.logger.init_args.save_dir", str(out), "--trainer.enable_progress_bar", "false",
                  "--accuracy_matrix.print_table", "false", *extra])
        runs[run] = out / "lightning_logs" / "version_0"
    return runs


@pytest.mark.parametrize("run", ["mcsgd", "mcsgd_full_batch"])
def test_mcsgd_beats_naive_sgd_on_the_digits_demo(demo_runs, run):
    naive = json.loads((demo_runs["naive"] / "accuracy_matrix.json").read_text())
    mcsgd = json.loads((demo_runs[run] / "accuracy_matrix.json").read_text())
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
