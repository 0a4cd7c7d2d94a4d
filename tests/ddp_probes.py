"""Callbacks that check multi-process runs from inside the child processes.

They live in a plain module on ``pythonpath`` (not in a test file) so that ``ddp_spawn`` children
can unpickle them by module name.
"""

import json

import torch
from torch.nn.utils import parameters_to_vector

from cl_lightning.methods.base import TaskAwareCallback
from cl_lightning.methods.mcsgd import MCSGD


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
