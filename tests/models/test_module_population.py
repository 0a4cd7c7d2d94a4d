"""A population trains each member as its own run: member k of N equals the population of one with
member k's seed and settings, bitwise on CPU; a member that diverges is stopped, the others go on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from sequence_runs import fit_permuted_digits

from cl_lightning.callbacks.guards import FiniteGuard
from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.errors import ConfigError, TrainingDivergedError
from cl_lightning.evaluation.accuracy_matrix import AccuracyMatrix
from cl_lightning.models.module import ContinualModule
from cl_lightning.models.nets import MLP

SEEDS = [5, 0, 7]
SETTINGS = {"lr": [0.1, 0.05, 0.2], "lr_decay": [1.0, 0.8, 0.9], "dropout": [0.2, 0.0, 0.5]}


def same_matrix(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def member(settings: dict, k: int) -> dict:
    return {name: [values[k]] for name, values in settings.items()}


@pytest.mark.slow
@pytest.mark.parametrize("joint", [False, True], ids=["naive", "multitask"])
def test_member_k_is_the_population_of_one_with_its_seed_and_settings(tmp_path: Path, joint: bool) -> None:
    matrices, population = fit_permuted_digits(tmp_path / "population", num_tasks=3, joint=joint, seeds=SEEDS, **SETTINGS)
    weights = population.population.flat()
    assert matrices.shape == (3, 3, 3) and torch.isfinite(weights).all()
    for k, seed in enumerate(SEEDS):
        solo_matrix, solo = fit_permuted_digits(tmp_path / f"seed_{seed}", num_tasks=3, joint=joint, seeds=[seed],
                                                **member(SETTINGS, k))
        assert torch.equal(weights[k], solo.population.flat()[0]), k  # bitwise
        assert same_matrix(matrices[k], solo_matrix[0]), k


@pytest.mark.slow
def test_a_member_depends_on_nothing_of_the_others(tmp_path: Path) -> None:
    _, a = fit_permuted_digits(tmp_path / "a", num_tasks=2, seeds=SEEDS, **SETTINGS)
    changed = {**SETTINGS, "lr": [0.1, 0.05, 0.3], "dropout": [0.2, 0.0, 0.1]}
    _, b = fit_permuted_digits(tmp_path / "b", num_tasks=2, seeds=[5, 0, 8], **changed)
    assert torch.equal(a.population.flat()[:2], b.population.flat()[:2])
    assert not torch.equal(a.population.flat()[2], b.population.flat()[2])


@pytest.mark.slow
def test_model_dropout_is_the_networks_own_rate(tmp_path: Path) -> None:
    """``model.dropout`` (a per-member setting, so sweeps can pack it) trains exactly as the same rate
    given to the network: the Stable SGD grids search it this way."""
    matrix, by_setting = fit_permuted_digits(tmp_path / "setting", num_tasks=2, seeds=[3], dropout=[0.5])
    own_matrix, by_network = fit_permuted_digits(tmp_path / "network", num_tasks=2, seeds=[3], dropout=0.5)
    assert torch.equal(by_setting.population.flat(), by_network.population.flat())
    assert same_matrix(matrix, own_matrix)


@pytest.mark.parametrize(("net", "dropout", "message"), [
    (MLP(64, [32], 10, dropout=0.25), [0.2, 1.0], r"model.dropout must be finite and >= 0 and < 1"),
    (MLP(64, [32], 10, dropout=0.25), -0.1, r"model.dropout must be finite and >= 0 and < 1"),
    (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), 0.5, "has no dropout layer"),
])
def test_a_dropout_rate_that_cannot_apply_is_refused(net: torch.nn.Module, dropout, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ContinualModule(net, dropout=dropout, seeds=[0, 1])


def fit_with_guard(tmp_path: Path, seeds: list[int], lr: list[float], **trainer_args) -> tuple[torch.Tensor, ContinualModule]:
    dm = ContinualDataModule(source="digits", benchmark="permuted", num_tasks=3, batch_size=16, seeds=seeds)
    module = ContinualModule(MLP(64, [100, 100], 10), lr=lr, momentum=0.8, seeds=seeds)
    matrix = AccuracyMatrix(print_table=False)
    trainer = Trainer(**dm.trainer_settings(), callbacks=[FiniteGuard(check_every_n_batches=10), matrix], logger=False,
                      default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, **trainer_args)
    trainer.fit(module, dm)
    return matrix.matrix, module


@pytest.mark.slow
def test_a_diverging_member_is_stopped_and_the_others_train_on(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"Member 1 \(seed 0\): the (training loss|weights) (is|are) not finite"):
        matrices, population = fit_with_guard(tmp_path / "population", [5, 0, 7], lr=[0.1, 1e6, 0.05])
    assert population.failed.tolist() == [False, True, False]
    assert torch.isnan(matrices[1]).all()  # it diverged in task 1: no row of it is a result
    # its folder says why, as a failed plain run's does; the others' folders are not marked
    assert (tmp_path / "population" / "seed_0" / "FAILED").read_text().startswith("error: the ")
    assert not (tmp_path / "population" / "seed_5" / "FAILED").exists()
    for k, (seed, lr) in enumerate([(5, 0.1), (7, 0.05)]):
        solo_matrix, solo = fit_with_guard(tmp_path / f"seed_{seed}", [seed], lr=[lr])
        assert torch.equal(population.population.flat()[2 * k], solo.population.flat()[0])
        assert same_matrix(matrices[2 * k], solo_matrix[0])
    with pytest.raises(TrainingDivergedError, match="training loss is not finite|weights are not finite"):
        fit_with_guard(tmp_path / "alone", [0], lr=[1e6])


@pytest.mark.slow
def test_gradient_clipping_is_per_member(tmp_path: Path) -> None:
    clip = {"gradient_clip_val": 0.05}
    _, population = fit_with_guard(tmp_path / "population", [5, 0], lr=[0.1, 0.2], **clip)
    for k, (seed, lr) in enumerate([(5, 0.1), (0, 0.2)]):
        _, solo = fit_with_guard(tmp_path / f"seed_{seed}", [seed], lr=[lr], **clip)
        torch.testing.assert_close(population.population.flat()[k], solo.population.flat()[0], rtol=0, atol=1e-6)


def test_member_net_is_a_plain_network_with_the_members_weights(tmp_path: Path) -> None:
    _, population = fit_permuted_digits(tmp_path, num_tasks=1, seeds=[5, 0], dropout=[0.2, 0.5])
    population.eval()
    x = torch.rand(2, 7, 64)
    for k in range(2):
        net = population.member_net(k).eval()
        assert isinstance(net, MLP) and net.layers[2].p == [0.2, 0.5][k]
        torch.testing.assert_close(net(x[k]), population(x)[k], rtol=0, atol=1e-6)
