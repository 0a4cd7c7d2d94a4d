"""Callbacks that check multi-process runs from inside the child processes.

They live in a plain module on ``pythonpath`` (not in a test file) so that ``ddp_spawn`` children
can unpickle them by module name.
"""

import json

import torch
from lightning.pytorch import Callback
from torch.nn.utils import parameters_to_vector

from cl_lightning.evaluation.evaluate import task_accuracies
from cl_lightning.methods.base import TaskAwareCallback
from cl_lightning.methods.mcsgd import MCSGD
from cl_lightning.metrics.task_accuracy import accuracy_key


class RankAgreement(TaskAwareCallback):
    """Placed after MC-SGD: compares every process's kept weights, w_hat and memory at each task end.

    The children write what they saw to a file: their callback state does not come back.
    """

    def __init__(self, mcsgd: MCSGD, out: str) -> None:
        self.mcsgd, self.out = mcsgd, out

    def on_task_end(self, trainer, pl_module, task):
        local = {
            "kept": parameters_to_vector(pl_module.net.parameters()).detach(),
            "w_hat": self.mcsgd.w_hat,
            "memory": torch.cat([self.mcsgd.memory.indices[t] for t in self.mcsgd.memory.tasks]).double(),
        }
        gathered = {name: trainer.strategy.all_gather(value) for name, value in local.items()}
        if trainer.is_global_zero:
            record = {name: bool(torch.equal(v[0], v[1])) for name, v in gathered.items()}
            record["world_size"] = trainer.world_size
            record["kept_is_w_bar"] = bool(torch.equal(local["kept"], self.mcsgd.w_bar))
            with open(self.out, "a") as f:
                f.write(json.dumps({"task": task, **record}) + "\n")


class EvalAgreement(Callback):
    """After each task's evaluation, compares the logged per-task accuracies (reduced over the
    processes) with a one-process evaluation of the same weights on the whole evaluation set."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_validation_end(self, trainer, pl_module):
        dm = trainer.datamodule
        tasks = list(range(dm.current_task + 1))
        single = task_accuracies(pl_module, dm, tasks, dm.eval_split)
        # logged values are float32 tensors
        logged = [float(trainer.callback_metrics[accuracy_key("val", t)]) for t in tasks]
        if trainer.is_global_zero:
            with open(self.out, "a") as f:
                f.write(json.dumps({"single": single.float().tolist(), "logged": logged,
                                    "sizes": [len(dm.task_dataset(t, dm.eval_split)) for t in tasks]}) + "\n")
