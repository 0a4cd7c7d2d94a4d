"""DER++ (``cl_lightning/methods/derpp.py``): it remembers, its step follows the authors' loss, and its
memory keeps the logits of the step that saw each example. The population, resume, checkpoint and DDP
properties are the method contract's (``test_contract.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything
from sequence_runs import fit_permuted_digits

from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.methods.derpp import DERPP, LABEL_STREAM, LOGIT_STREAM
from cl_lightning.metrics.continual import average_accuracy
from cl_lightning.models.module import ContinualModule
from cl_lightning.models.nets import MLP

pytestmark = pytest.mark.slow  # whole training runs


def test_derpp_remembers_more_than_naive_sgd_on_the_same_tasks(tmp_path):
    def final_accuracy(callbacks) -> list[float]:
        matrix, _ = fit_permuted_digits(tmp_path / str(len(callbacks)), callbacks, num_tasks=4, seeds=[0, 1])
        return [average_accuracy(matrix[k], 3) for k in range(2)]

    naive = final_accuracy([])
    derpp = final_accuracy([DERPP(alpha=1.0, beta=1.0, memory_size=50, memory_batch_size=16)])
    assert all(d > n + 20 for d, n in zip(derpp, naive)), (derpp, naive)


class LossProbe(Callback):
    """Placed before DER++: at optimizer step ``step``, each member's gradient of the DER++ loss computed
    on its own, ``CE(current) + alpha MSE(f(x'), z') + beta CE(f(x''), y'')``, with the draws DER++ is
    about to make (they are counter-based: the probe makes the same ones) and mammoth's ``F.mse_loss``."""

    def __init__(self, derpp: DERPP, step: int) -> None:
        self.derpp, self.step, self.batch, self.expected = derpp, step, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step != self.step:
            return
        (x1, _, _), stored = self.derpp.draw(trainer, pl_module, "logit")
        labels, _ = self.derpp.draw(trainer, pl_module, "label")
        alpha, beta = (torch.tensor(v, dtype=torch.float32) for v in ([1.0, 0.3], [0.5, 2.0]))
        with torch.enable_grad():
            outputs = pl_module(x1, stream=LOGIT_STREAM)
            mse = torch.stack([F.mse_loss(outputs[k], stored[k]) for k in range(len(outputs))])
            loss = pl_module.member_losses(self.batch) + alpha * mse + beta * pl_module.member_losses(labels, LABEL_STREAM)
            grads = torch.autograd.grad(loss.sum(), list(pl_module.parameters()))
        self.expected = torch.cat([g.flatten(1) for g in grads], dim=1)


class StepRecord(Callback):
    """Placed after DER++: the gradient the optimizer steps with at ``step``, and the weights before
    each of the first two steps."""

    def __init__(self, step: int) -> None:
        self.step, self.grad, self.weights = step, None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step < 2:
            self.weights.append(copy.deepcopy(pl_module.population.state_dict()))

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            self.grad = torch.cat([p.grad.flatten(1) for p in pl_module.parameters()], dim=1).clone()


def test_a_step_follows_the_derpp_loss_and_the_memory_keeps_each_steps_logits(tmp_path):
    step = 120  # in task 2 (90 batches per task): the memory holds examples of both tasks
    derpp = DERPP(alpha=[1.0, 0.3], beta=[0.5, 2.0], memory_size=3000, memory_batch_size=8)  # keeps every example
    probe, record = LossProbe(derpp, step), StepRecord(step)
    seed_everything(0)
    dm = ContinualDataModule(source="digits", benchmark="permuted", num_tasks=2, batch_size=16, seeds=[0, 1])
    module = ContinualModule(MLP(64, [32], 10, dropout=0.0), lr=0.1, seeds=[0, 1])  # no dropout: recomputable
    trainer = Trainer(**dm.trainer_settings(), callbacks=[probe, derpp, record], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    module.eval()
    torch.testing.assert_close(record.grad, probe.expected, rtol=1e-5, atol=1e-6)
    # The reservoir is not full, so example n of the stream sits in slot n: steps 0 and 1 filled slots [0, 32),
    # each with the logits of the weights before its own step.
    for i, weights in enumerate(record.weights):
        slots = torch.arange(16 * i, 16 * (i + 1)).expand(2, -1)
        x, _, _ = derpp.buffer.batch(trainer.train_dataloader.dataset, slots)
        module.population.load_state_dict(weights)
        with torch.no_grad():
            expected = module.population(x)
        assert torch.equal(derpp.buffer.values["logits"][:, 16 * i: 16 * (i + 1)], expected)
