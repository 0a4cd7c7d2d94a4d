"""Bad input through ``cl-lightning`` (``main``): each mistake ends with a message naming the
problem and the fix, without a traceback, and leaves the results already on disk intact."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from user_errors import user_error

from cl_lightning.cli.lightning_cli import main

CONFIGS = Path(__file__).parents[2] / "configs"
NAIVE = str(CONFIGS / "naive" / "permuted_digits.yaml")
MCSGD = str(CONFIGS / "mcsgd" / "permuted_digits.yaml")


def args(config: str, out: Path, *extra: str) -> list[str]:
    return ["fit", "--config", config, "--data.num_tasks", "2", "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--accuracy_matrix.print_table", "false", *extra]


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A finished 2-task naive run (its save_dir) and the digests of its files."""
    out = tmp_path_factory.mktemp("finished")
    main(args(NAIVE, out))
    return out, digests(out / "lightning_logs" / "version_0")


@pytest.fixture
def out(finished):
    """Bad commands write into the finished run's save_dir; afterwards its files must be unchanged,
    and no other run folder (an empty ``version_1`` with an events file) may appear: the inputs are
    checked before anything is created."""
    save_dir, before = finished
    yield save_dir
    assert digests(save_dir / "lightning_logs" / "version_0") == before
    assert sorted(p.name for p in (save_dir / "lightning_logs").iterdir()) == ["version_0"]


def argument_error(argv: list[str], capsys) -> str:
    """What LightningCLI prints for an argument it refuses (exit status 2)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------- names and sizes
def test_unknown_dataset_lists_the_choices(out, capsys):
    err = argument_error(args(NAIVE, out, "--data.source", "imagenet"), capsys)
    assert 'Parser key "data.source"' in err and "imagenet" in err and "'mnist', 'fashion_mnist', 'cifar100', 'digits'" in err


def test_unknown_method_name_is_refused_and_short_names_work(out, capsys):
    err = argument_error(args(NAIVE, out, "--trainer.callbacks+=MCSDG"), capsys)
    assert "error: trainer.callbacks: unknown class 'MCSDG' (did you mean MCSGD?)" in err
    with pytest.raises(SystemExit) as info:
        main(args(NAIVE, out, "--trainer.callbacks+=MCSGD", "--print_config"))
    assert info.value.code == 0 and re.search(r"class_path: cl_lightning\.methods\.(mcsgd\.)?MCSGD", capsys.readouterr().out)


@pytest.mark.parametrize("tasks", ["0", "-3"])
def test_zero_or_negative_tasks(out, capsys, tasks):
    err = argument_error(args(NAIVE, out, "--data.num_tasks", tasks), capsys)
    assert 'Parser key "data.num_tasks"' in err and "v>0" in err


def test_more_split_tasks_than_classes_fails_before_reading_data(out, tmp_path):
    message = user_error(args(str(CONFIGS / "naive" / "split_cifar100.yaml"), out, "--data.num_tasks", "21",
                              "--data.root", str(tmp_path / "no_data")))
    assert message == ("error: split benchmark: 21 tasks x 5 classes per task needs 105 classes but the dataset has 100; "
                       "lower `data.num_tasks` or `data.classes_per_task`.")


def test_more_examples_per_task_than_the_dataset_has(out):
    message = user_error(args(NAIVE, out, "--data.train_examples_per_task", "5000"))
    assert message == ("error: data.train_examples_per_task is 5000 but task 1 has only 1438 training examples "
                       "for seed 0 (permuted); set it to at most 1438, or to null to use all of them.")


def test_memory_size_zero(out, capsys):
    err = argument_error(args(MCSGD, out, "--trainer.callbacks.memory_per_task", "0"), capsys)
    assert "error: --trainer.callbacks.init_args.memory_per_task 0 refused: MCSGD's memory_per_task takes PositiveInt (v>0)" in err
    err = argument_error(args(NAIVE, out, "--trainer.callbacks+=ER", "--trainer.callbacks.memory_size", "0"), capsys)
    assert "error: --trainer.callbacks.init_args.memory_size 0 refused: ER's memory_size takes PositiveInt (v>0)" in err
    message = user_error(args(MCSGD, out, "--trainer.callbacks.memory_per_task", "null"))
    assert "the episodic memory needs a size: set exactly one of `memory_per_task` or `memory_per_class`" in message


# --------------------------------------------------------------------------- data files
def test_missing_data_folder_without_download(out, tmp_path):
    message = user_error(args(str(CONFIGS / "naive" / "permuted_mnist.yaml"), out, "--data.root", str(tmp_path)))
    assert message.startswith(f"error: MNIST not found: looked in {tmp_path}/MNIST/raw")
    assert "--data.download true" in message


def test_truncated_dataset_file(out, mnist_root, tmp_path):
    shutil.copytree(mnist_root, tmp_path, dirs_exist_ok=True)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    message = user_error(args(str(CONFIGS / "naive" / "permuted_mnist.yaml"), out, "--data.root", str(tmp_path)))
    assert f"MNIST file {images} is damaged" in message and "(truncated)" in message


# --------------------------------------------------------------------------- checkpoints
def test_missing_or_truncated_checkpoint(out, tmp_path):
    last = out / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    message = user_error(args(NAIVE, out, "--ckpt_path", str(tmp_path / "nothere.ckpt")))
    assert message == f"error: checkpoint {tmp_path / 'nothere.ckpt'} not found."
    broken = tmp_path / "last.ckpt"
    broken.write_bytes(last.read_bytes()[:20000])
    (tmp_path / "epoch=0-step=90.ckpt").write_bytes(last.read_bytes())
    message = user_error(args(NAIVE, out, "--ckpt_path", str(broken)))
    assert message.startswith(f"error: checkpoint {broken} cannot be read (")
    assert "it is truncated (the run may have been killed while writing it) or not a checkpoint." in message
    assert message.endswith(f"Checkpoints in {tmp_path}, oldest first: epoch=0-step=90.ckpt.")


def test_checkpoint_of_another_run(out):
    run = out / "lightning_logs" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    hint = f"Resume with the run's own config: cl-lightning fit --config {run / 'config.yaml'} --ckpt_path {last}"
    message = user_error(args(MCSGD, out, "--ckpt_path", str(last)))
    assert message == (f"error: checkpoint {last} was written by a run with method callbacks none (naive SGD) but this "
                       f"config has ['MCSGD']: the method's state (memory, anchors, ...) would be lost or missing. {hint}")
    message = user_error(args(NAIVE, out, "--data.num_tasks", "3", "--ckpt_path", str(last)))
    assert message == (f"error: checkpoint {last} was written by a run with other data settings (num_tasks: checkpoint 2, "
                       f"config 3): resuming would continue a different task sequence. {hint}")


def test_other_network_settings_are_replaced_by_the_checkpoints_with_a_warning(out):
    run = out / "lightning_logs" / "version_0"
    # the run is complete, so this resume only checks the checkpoint and stops ("nothing to resume")
    with pytest.warns(UserWarning, match=r"hidden_sizes: checkpoint \[256, 256\], config \[32\]\); the run uses the checkpoint's"):
        with pytest.raises(SystemExit) as info:
            main(["fit", "--config", str(run / "config.yaml"), "--model.net.init_args.hidden_sizes", "[32]",
                  "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert info.value.code == 0


@pytest.mark.slow
def test_checkpoint_of_another_seed_creates_no_run_folder(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args(NAIVE, tmp_path, "--trainer.callbacks+=sequence_runs.CrashAtTaskStart", "--trainer.callbacks.task", "1"))
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    message = user_error(args(NAIVE, tmp_path, "--seed_everything", "1", "--ckpt_path", str(last)))
    assert message.startswith("error: the checkpoint was written by a run with seeds [0] but this run has seeds [1]")
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]


# --------------------------------------------------------------------------- during training
def _rows(run: Path) -> int:
    return json.loads((run / "accuracy_matrix.json").read_text())["tasks_completed"]


def _last_checkpoint_epoch(run: Path) -> int:
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    return checkpoint["epoch"]


@pytest.mark.slow
def test_nan_loss_stops_with_task_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # task 2 trains with lr 0.1 * 1e9: the loss overflows within a few steps
    message = user_error(args(NAIVE, tmp_path, "--model.lr_decay", "1e9"))
    run = tmp_path / "lightning_logs" / "version_0"
    assert message.startswith("error: the training loss is not finite (nan) at task 2, epoch 1, batch ")
    assert f"Training stopped; the last good checkpoint ({run / 'checkpoints' / 'last.ckpt'}) and the accuracy" in message
    assert _rows(run) == 1 and _last_checkpoint_epoch(run) == 0


@pytest.mark.slow
def test_diverged_consolidation_stops_before_its_results_are_saved(tmp_path):
    message = user_error(args(MCSGD, tmp_path, "--trainer.callbacks.lr", "1e30"))
    run = tmp_path / "lightning_logs" / "version_0"
    assert message.startswith("error: the weights are not finite at task 2, epoch 1 (global step 180), although every "
                              "training loss was finite")
    assert "MC-SGD's consolidation: lower its lr" in message
    assert _rows(run) == 1 and _last_checkpoint_epoch(run) == 0


@pytest.mark.slow
def test_full_disk_when_writing_the_matrix_keeps_the_previous_files(tmp_path, monkeypatch):
    write_text = Path.write_text

    def disk_full_after_task_1(self, data, *a, **kw):
        if self.name == "accuracy_matrix.json.tmp" and (self.parent / "accuracy_matrix.json").exists():
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_text(self, data, *a, **kw)

    monkeypatch.setattr(Path, "write_text", disk_full_after_task_1)
    message = user_error(args(NAIVE, tmp_path))
    run = tmp_path / "lightning_logs" / "version_0"
    assert message.startswith(f"error: could not write {run / 'accuracy_matrix.csv'}, {run / 'accuracy_matrix.json'} "
                              "([Errno 28] No space left on device")
    assert "the previous version of the results is kept" in message and "--ckpt_path <run>/checkpoints/last.ckpt" in message
    # the CSV was written to its temporary file before the JSON failed, yet both still hold task 1 only
    assert len((run / "accuracy_matrix.csv").read_text().splitlines()) == 2 and _rows(run) == 1
    assert not list(run.glob("*.tmp")) and _last_checkpoint_epoch(run) == 0
