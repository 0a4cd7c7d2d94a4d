"""Checkpoints through ``cl-lightning``: step checkpoints add to the after-task ones, ``last.ckpt`` is
always the latest state, a finished run is not resumed, and a failed write or an unwritable output
folder is one error line that loses nothing."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sequence_runs import fit_permuted_digits
from user_errors import user_error

from cl_lightning.cli.lightning_cli import cli_main, main

CONFIGS = Path(__file__).parents[2] / "configs"
NAIVE = str(CONFIGS / "naive" / "permuted_digits.yaml")


def args(out: Path, *extra: str, tasks: int = 3) -> list[str]:
    return ["fit", "--config", NAIVE, "--data.num_tasks", str(tasks), "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--accuracy_matrix.print_table", "false", *extra]


@pytest.mark.slow
def test_step_checkpoints_add_to_the_after_task_ones_and_last_is_the_final_model(tmp_path, capsys):
    # every_n_epochs together with every_n_train_steps: Lightning's ModelCheckpoint refuses this
    cli = cli_main(args(tmp_path, "--checkpoint.every_n_train_steps", "50", "--checkpoint.every_n_epochs", "1",
                        "--checkpoint.save_top_k", "-1"))
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    # 90 steps per task: steps 50..250, plus the checkpoint after each task (steps 90, 180, 270)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["epoch=0-step=50.ckpt", "epoch=0-step=90.ckpt", "epoch=1-step=100.ckpt", "epoch=1-step=150.ckpt",
         "epoch=1-step=180.ckpt", "epoch=2-step=200.ckpt", "epoch=2-step=250.ckpt", "epoch=2-step=270.ckpt",
         "last.ckpt"])
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["global_step"] == 270
    assert (~last["callbacks"]["AccuracyMatrix"]["matrix"].isnan()).any(dim=1).all()
    for name, value in cli.model.state_dict().items():
        assert torch.equal(last["state_dict"][name], value), name

    # Resuming the finished run trains nothing, creates no run folder and says where the results are.
    capsys.readouterr()
    run = tmp_path / "lightning_logs" / "version_0"
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(folder / "last.ckpt")])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == (
        f"nothing to resume: checkpoint {folder / 'last.ckpt'} holds a finished run (all 3 tasks trained and evaluated). "
        f"Its results: {run / 'accuracy_matrix.csv'}. To evaluate its model: cl-lightning test --config "
        f"{run / 'config.yaml'} --ckpt_path {folder / 'last.ckpt'}")
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]


@pytest.mark.slow
def test_a_checkpoint_written_before_a_tasks_evaluation_is_refused(tmp_path):
    # Lightning's own ModelCheckpoint, as older cl-lightning runs used it: it saves on step 90, the
    # first task's last step, before the task's evaluation.
    stock = ModelCheckpoint(dirpath=tmp_path / "old", every_n_train_steps=90, save_top_k=-1)
    fit_permuted_digits(tmp_path, [stock], num_tasks=2)
    old = tmp_path / "old" / "epoch=0-step=90.ckpt"
    message = user_error(args(tmp_path / "out", "--ckpt_path", str(old)))
    assert message == (
        f"error: checkpoint {old} was written on the last training step of epoch 0, before that epoch's evaluation "
        "(a step checkpoint of an older cl-lightning): resuming it, Lightning would skip that evaluation and leave "
        "task 1's accuracy-matrix row empty. Resume from the checkpoint written after that task or an earlier one. "
        f"Checkpoints in {tmp_path / 'old'}, oldest first: epoch=1-step=180.ckpt.")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_failed_checkpoint_write_keeps_the_previous_checkpoints(tmp_path, monkeypatch):
    save = torch.save

    def disk_full_after_task_1(obj, f, *a, **kw):
        """Writes half of task 2's checkpoint, then fails as a full disk does."""
        if isinstance(f, io.BufferedWriter) and isinstance(obj, dict) and obj.get("global_step") == 180:
            buffer = io.BytesIO()
            save(obj, buffer, *a, **kw)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", disk_full_after_task_1)
    message = user_error(args(tmp_path, tasks=2))
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert message.startswith(f"error: could not write checkpoint {folder / 'epoch=1-step=180.ckpt'} ([Errno 28] "
                              "No space left on device); the checkpoints written before it are kept.")
    assert "--ckpt_path <run>/checkpoints/last.ckpt" in message
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=90.ckpt", "last.ckpt"]  # no partial file
    for name in ("epoch=0-step=90.ckpt", "last.ckpt"):
        assert torch.load(folder / name, weights_only=True)["global_step"] == 90


@pytest.mark.parametrize("where", ["under_a_file", "read_only"])
def test_an_unwritable_output_folder_is_refused_before_training(tmp_path, where):
    if where == "under_a_file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "runs"
        reason = f"output folder {out / 'lightning_logs'} cannot be created: {tmp_path / 'file'} is a file, not a folder"
    else:
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o555)
        out, reason = read_only / "runs", f"output folder {read_only / 'runs' / 'lightning_logs'} is not writable (in {read_only})"
        if os.geteuid() == 0 and Path("/sys/fs").is_dir():  # root writes through mode bits, not into sysfs
            out, reason = Path("/sys/fs/cl_runs"), "output folder /sys/fs/cl_runs/lightning_logs is not writable (in /sys/fs)"
    message = user_error(args(out))
    assert message.startswith(f"error: {reason}")
    assert message.endswith("choose another folder with --trainer.logger.init_args.save_dir or make it writable.")
    message = user_error(args(tmp_path / "ok", "--checkpoint.dirpath", str(out / "checkpoints")))
    assert "choose another folder with --checkpoint.dirpath" in message and not (tmp_path / "ok").exists()
