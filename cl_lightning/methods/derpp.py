"""DER++: Dark Experience Replay++ (Buzzega, Boschini, Porrello, Abati, Calderara, "Dark Experience
for General Continual Learning: a Strong, Simple Baseline", NeurIPS 2020), as a callback.

A reservoir memory keeps, for examples of the stream, the example, its label and the network's
logits when it was seen. Every training step adds two replay terms to the loss of the current batch:

    loss = CE(f(x), y) + alpha * MSE(f(x'), z') + beta * CE(f(x''), y'')

where ``(x', z')`` and ``(x'', y'')`` are two independent draws of ``memory_batch_size`` examples from
the memory (example with its stored logits; example with its label). Following the authors' code,
aimagelab/mammoth at e75a491c69fd729edeb01431afb753d9157d9a81:

- ``models/derpp.py`` lines 32-60 (``observe``): the current batch's forward and loss, then, once
  the buffer is not empty, ``alpha * F.mse_loss`` of a forward of one draw against its stored
  logits and ``beta`` times the cross-entropy of a forward of a second draw, one backward and one
  step; after the step the current batch enters the buffer with ``outputs.data``, the logits of the
  step's own forward (before the update);
- ``utils/buffer.py``: reservoir sampling (``ReservoirSampling.__call__``, lines 114-133) and
  ``get_data`` (lines 495-529): ``min(minibatch_size, examples held)`` examples drawn uniformly
  without replacement, each call on its own;
- ``F.mse_loss`` is the mean over the draw's examples and all output logits.

Here, as ER (:mod:`cl_lightning.methods.er`), the memory holds base indices and task ids, from
which the replayed images and labels are rebuilt through the training set's own path, plus the
logits (``[N, memory_size, C]``); every random choice of member k is a hash of its seed's keys
(``derpp_reservoir``, ``derpp_logit_draw``, ``derpp_label_draw``) and the stream position, so a
member replays what its solo run replays, on every process and after a resume.

The stored logits are the network's outputs before the class mask of split benchmarks (the mask
gives other tasks' classes -1e11, which no MSE should chase); the MSE runs over all of them, as
mammoth's over the full output. The label term's cross-entropy is the module's training loss
(class-masked on split benchmarks, like the current batch's).

How it plugs into Lightning: Lightning backpropagates the current batch's loss; ``on_after_backward``
backpropagates the two replay terms into the same ``.grad`` (divided by the accumulation steps and
scaled for fp16 as Lightning does the training loss), so the optimizer steps on the gradient of the
whole DER++ loss; ``on_train_batch_end`` inserts the batch with the logits the module's
``training_step`` returned. The replay forwards run in training mode with dropout masks of their own
(streams 1 and 2 of the step). Under DDP the memory and its draws are the same on every process
(inserted batches are gathered from all processes), so every process adds the same replay gradient
to the averaged current one.

``alpha`` and ``beta`` may differ between members (one value, or one per member).
"""

from __future__ import annotations

from typing import Any

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveInt
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from cl_lightning.data.members import Batch
from cl_lightning.methods.base import Method
from cl_lightning.methods.reservoir import ReservoirBuffer, replay_sizes, step_examples
from cl_lightning.models.member_random import member_keys
from cl_lightning.models.member_settings import PerMember
from cl_lightning.models.module import total

#: Dropout streams of the two replay forwards (the step's own forward is stream 0).
LOGIT_STREAM, LABEL_STREAM = 1, 2


class DERPP(Method):
    """Dark Experience Replay++: replay stored logits (MSE) and labels (cross-entropy), per member.

    Args:
        alpha: Weight of the MSE between the network's logits on a memory draw and the logits stored
            with it (mammoth's best: 1.0 for Permuted and Rotated MNIST with 200 examples, 0.1 for
            Split CIFAR-100 with 500).
        beta: Weight of the cross-entropy on a second memory draw (mammoth's best: 1.0 Permuted MNIST,
            0.5 Rotated MNIST, 0.5 Split CIFAR-100).
        memory_size: Examples each member's memory keeps over all tasks (mammoth's ``buffer_size``).
        memory_batch_size: Examples of each of the two draws per step (mammoth's ``minibatch_size``:
            128 on MNIST).
    """

    def __init__(
        self,
        alpha: PerMember[NonNegativeFloat] = 0.5,
        beta: PerMember[NonNegativeFloat] = 0.5,
        memory_size: PositiveInt = 200,
        memory_batch_size: PositiveInt = 64,
    ) -> None:
        super().__init__(alpha=alpha, beta=beta)
        self.memory_size, self.memory_batch_size = replay_sizes("DERPP", memory_size, memory_batch_size)
        self.buffer: ReservoirBuffer | None = None
        #: ``[N]`` each member's keys of the two draws of a step.
        self.draw_keys: dict[str, Tensor] = {}

    @override
    def setup_population(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.buffer is None:  # created once; a checkpoint's contents are loaded into it afterwards
            seeds = trainer.datamodule.seeds
            self.buffer = ReservoirBuffer(self.memory_size, seeds, key="derpp_reservoir")
            self.draw_keys = {name: member_keys(seeds, f"derpp_{name}_draw") for name in ("logit", "label")}

    # ------------------------------------------------------------------ training
    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Add the gradient of ``alpha * MSE(logits) + beta * CE(labels)`` on two memory draws, per member."""
        if len(self.buffer) == 0:
            return
        logit_batch, stored = self.draw(trainer, pl_module, "logit")
        label_batch, _ = self.draw(trainer, pl_module, "label")
        with torch.inference_mode(False), torch.enable_grad():
            with trainer.precision_plugin.forward_context():
                logits = pl_module(logit_batch[0], stream=LOGIT_STREAM)
                logit_loss = (logits - stored.to(logits.dtype)).square().flatten(1).mean(dim=1)
                label_loss = pl_module.member_losses(label_batch, stream=LABEL_STREAM)
            alpha = self.on_device("alpha", logit_loss, lambda n: self.settings(n)["alpha"])
            beta = self.on_device("beta", label_loss, lambda n: self.settings(n)["beta"])
            if self.is_logging_step(trainer):
                self.log_members(trainer, pl_module, {"derpp/logit_loss": logit_loss, "derpp/label_loss": label_loss},
                                 trainer.global_step)
            # As Lightning does the training loss: divided by the accumulation steps, scaled for fp16. A member
            # the guard stopped adds nothing (its loss may be NaN).
            loss = total(alpha * logit_loss + beta * label_loss, pl_module.failed) / trainer.accumulate_grad_batches
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            if scaler is not None:
                loss = scaler.scale(loss)
            loss.backward()

    def draw(self, trainer: Trainer, pl_module: LightningModule, name: str) -> tuple[Batch, Tensor]:
        """One draw of this step from every member's memory: the ``(x, y, task)`` batch ``[N, M, ...]`` and
        the logits stored with its examples ``[N, M, C]``."""
        keys = self.draw_keys[name] = self.draw_keys[name].to(pl_module.device)  # once: a no-op when there
        slots = self.buffer.to(pl_module.device).sample(self.memory_batch_size, keys)
        stored = self.buffer.values["logits"]
        rows = torch.arange(len(slots), device=slots.device).unsqueeze(1)
        return self.buffer.batch(trainer.train_dataloader.dataset, slots), stored[rows, slots]

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Batch, batch_idx: int
    ) -> None:
        """The batch enters the memory with the logits of the step's own forward (before its update)."""
        index, task, logits = step_examples(trainer, batch, batch_idx, outputs["logits"])
        self.buffer.to(pl_module.device).add(index, task, logits=logits)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # ------------------------------------------------------------------ checkpoint
    @override
    def method_state(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict() if self.buffer is not None else None}

    @override
    def load_method_state(self, state: dict[str, Any]) -> None:
        if state["buffer"] is not None:
            self.buffer.load_state_dict(state["buffer"])
