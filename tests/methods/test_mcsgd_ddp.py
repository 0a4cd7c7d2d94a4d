"""MC-SGD under a 2-process strategy on CPU: after every consolidation both processes must hold
bitwise-identical weights and the same episodic memory, and the logged accuracies must be those
of a one-process evaluation of the same weights; a population's members likewise."""

import json

import pytest
from ddp_probes import EvalAgreement, RankAgreement, two_process_strategy
from lightning.pytorch import Trainer, seed_everything

from cl_lightning.callbacks.guards import FiniteGuard
from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.evaluation.accuracy_matrix import AccuracyMatrix
from cl_lightning.methods.mcsgd import MCSGD
from cl_lightning.models.module import ContinualModule
from cl_lightning.models.nets import MLP


@pytest.mark.slow
@pytest.mark.parametrize("seeds, alpha0", [([0], 0.25), ([0, 5], [0.25, 0.1])])
def test_processes_agree_after_each_consolidation_and_metrics_are_exact(tmp_path, seeds, alpha0):
    seed_everything(0)
    # 359 test examples per task in batches of 100: shares of 180 and 179 examples, so a padded
    # DistributedSampler would count one example twice.
    dm = ContinualDataModule(source="digits", benchmark="permuted", num_tasks=3, batch_size=16, eval_batch_size=100,
                             seeds=seeds)
    module = ContinualModule(MLP(64, [32], 10, dropout=0.25), lr=0.1, seeds=seeds)
    mcsgd = MCSGD(alpha0=alpha0, lr=0.005, batch_size=16, subset_size=64)
    out, evaluations = tmp_path / "agreement.jsonl", tmp_path / "evaluations.jsonl"
    # the logged accuracies of a population go to its members' loggers: compared for a population of one
    probes = [EvalAgreement(str(evaluations))] if len(seeds) == 1 else []
    trainer = Trainer(
        **dm.trainer_settings(), accelerator="cpu", devices=2, strategy=two_process_strategy(),
        callbacks=[mcsgd, RankAgreement(mcsgd, str(out)), *probes, AccuracyMatrix(print_table=False),
                   FiniteGuard(check_every_n_batches=7)],  # its checks are collectives: they must not hang
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, dm)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task"] for r in records] == [0, 1, 2]
    for r in records:
        assert r == {"task": r["task"], "kept": True, "w_hat": True, "memory": True, "world_size": 2,
                     "kept_is_w_bar": True}
    if probes:
        checks = [json.loads(line) for line in evaluations.read_text().splitlines()]
        assert [len(c["logged"]) for c in checks] == [1, 2, 3]
        for c in checks:
            assert all(size % 200 != 0 for size in c["sizes"])
            assert c["logged"] == c["single"]
