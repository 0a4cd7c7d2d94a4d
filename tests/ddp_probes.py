"""Callbacks that check multi-process runs from inside the child processes, and the strategy those runs use.

They live in a plain module on ``pythonpath`` (not in a test file) so that ``ddp_spawn`` children
can unpickle them by module name.
"""

import json

import torch
from lightning.pytorch import Callback
from typing_extensions import override

from cl_lightning.evaluation.evaluate import task_accuracies
from cl_lightning.methods.base import TaskAwareCallback
from cl_lightning.methods.mcsgd import MCSGD
from cl_lightning.metrics.task_accuracy import accuracy_key


def two_process_strategy() -> str:
    """DDP on two CPU processes, forked from the test's process (``ddp_fork``: no second import of torch and
    Lightning, seconds each); ``ddp_spawn`` where a test before initialised CUDA in this process, which a fork
    cannot inherit. Both run the same DDP strategy and collectives; only how the processes start differs."""
    return "ddp_spawn" if torch.cuda.is_initialized() else "ddp_fork"


class StateAgreement(TaskAwareCallback):
    """Placed after a method: at each task end, does every process hold the same :meth:`state`?

    The children write one JSON line per task to ``out`` (True/False per tensor, the task, the world
    size and :meth:`facts`): their callback state does not come back to the test.
    """

    def __init__(self, method: Callback, out: str) -> None:
        self.method, self.out = method, out

    def state(self, trainer, pl_module) -> dict[str, torch.Tensor]:
        """The tensors that must agree across processes."""
        raise NotImplementedError

    def facts(self, trainer, pl_module) -> dict:
        """Plain values of rank 0 to check besides the agreement."""
        return {}

    @override
    def on_task_end(self, trainer, pl_module, task):
        gathered = {name: trainer.strategy.all_gather(value) for name, value in self.state(trainer, pl_module).items()}
        if trainer.is_global_zero:
            record = {name: bool(torch.equal(v[0], v[1])) for name, v in gathered.items()}
            record |= {"task": task, "world_size": trainer.world_size, **self.facts(trainer, pl_module)}
            with open(self.out, "a") as f:
                f.write(json.dumps(record) + "\n")


class RankAgreement(StateAgreement):
    """MC-SGD: the kept weights, w_hat and the memory; and whether the kept weights are w_bar."""

    @override
    def state(self, trainer, pl_module):
        mcsgd: MCSGD = self.method
        return {"kept": pl_module.population.flat(), "w_hat": mcsgd.w_hat,
                "memory": torch.cat([mcsgd.memory.indices[t] for t in mcsgd.memory.tasks]).double()}

    @override
    def facts(self, trainer, pl_module):
        return {"kept_is_w_bar": bool(torch.equal(pl_module.population.flat(), self.method.w_bar))}


class MemoryAgreement(StateAgreement):
    """ER: the reservoir's examples (base indices and task ids) and the weights; how much it saw and holds."""

    @override
    def state(self, trainer, pl_module):
        index, task_ids = self.method.buffer.examples()
        return {"index": index, "task_ids": task_ids, "weights": pl_module.population.flat()}

    @override
    def facts(self, trainer, pl_module):
        return {"seen": self.method.buffer.seen, "held": len(self.method.buffer)}


class FisherAgreement(StateAgreement):
    """EWC (A-GEM variant): the weights, running Fisher, penalty Fisher and anchor; the Fisher's range."""

    @override
    def state(self, trainer, pl_module):
        ewc = self.method
        return {"weights": pl_module.population.flat(),
                "running_fisher": ewc.running.fisher, "fisher": ewc.fisher_sum, "anchor": ewc.fisher_anchor}

    @override
    def facts(self, trainer, pl_module):
        fisher = self.method.fisher_sum
        return {"steps": len(trainer.train_dataloader), "fisher_max": fisher.max().item(),
                "fisher_min": fisher.min().item()}


class EvalAgreement(Callback):
    """After each task's evaluation, compares the logged per-task accuracies (reduced over the
    processes) with a one-process evaluation of the same weights on the whole evaluation set."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_validation_end(self, trainer, pl_module):
        dm = trainer.datamodule
        tasks = list(range(dm.current_task + 1))
        single = task_accuracies(pl_module, dm, tasks, dm.eval_split)[0]  # a population of one
        # logged values are float32 tensors
        logged = [float(trainer.callback_metrics[accuracy_key("val", t)]) for t in tasks]
        if trainer.is_global_zero:
            with open(self.out, "a") as f:
                f.write(json.dumps({"single": single.float().tolist(), "logged": logged,
                                    "sizes": [len(dm.task_set(t, dm.eval_split)) for t in tasks]}) + "\n")


def state_tensors(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """A method's state (``Method.method_state``) as ``{dotted name: tensor}``: its tensors, and its
    numbers as 0-d tensors, NaN written as -1 (NaN != NaN); None and strings are left out."""
    tensors = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            tensors |= state_tensors(value, f"{name}.")
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            tensors[name] = torch.tensor(value, dtype=torch.float64)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            tensors[name] = torch.tensor(float(value), dtype=torch.float64)
        elif isinstance(value, torch.Tensor):
            tensors[name] = value.detach().nan_to_num(-1) if value.is_floating_point() else value.detach()
    return tensors


class MethodStateAgreement(StateAgreement):
    """Any method: every tensor and number of its checkpointed state, and the weights."""

    @override
    def state(self, trainer, pl_module):
        tensors = state_tensors(self.method.method_state())
        return {"weights": pl_module.population.flat(), **{name: t.to(pl_module.device) for name, t in tensors.items()}}
