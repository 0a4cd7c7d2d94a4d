"""The command line end to end, in-process, on tiny MNIST IDX files."""

import json
from pathlib import Path

import pytest
from cli_runs import tiny_run_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cl_lightning.cli.lightning_cli import cli_main, main

CONFIGS = Path(__file__).parents[2] / "configs"


@pytest.fixture(scope="module")
def naive_run(mnist_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("naive")
    cli_main(["fit", *tiny_run_args("naive/permuted_mnist.yaml", mnist_root, out)])
    return out / "lightning_logs" / "version_0"


@pytest.mark.slow
def test_fit_writes_three_by_three_matrix(naive_run):
    record = json.loads((naive_run / "accuracy_matrix.json").read_text())
    assert record["num_tasks"] == 3 and record["tasks_completed"] == 3 and record["split"] == "test"
    matrix = record["matrix"]
    assert [sum(v is not None for v in row) for row in matrix] == [1, 2, 3]  # lower triangle
    assert all(0 <= v <= 100 for row in matrix for v in row if v is not None)
    assert matrix[0][0] > 50  # task 1 was learnt (fake data are learnable)
    assert len((naive_run / "accuracy_matrix.csv").read_text().splitlines()) == 4
    assert (naive_run / "config.yaml").exists() and (naive_run / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_tensorboard_has_per_task_tags(naive_run):
    events = EventAccumulator(str(naive_run), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"val/acc/task_01", "val/acc/task_03", "cl/average_accuracy", "cl/forgetting", "matrix/task_02",
            "train/loss", "hp/average_accuracy"} <= scalars
    assert [e.step for e in events.Scalars("cl/average_accuracy")] == [1, 2, 3]
    assert "cl/accuracy_matrix" in events.Tags()["images"]


@pytest.mark.slow
def test_test_command_evaluates_checkpoint_on_all_tasks(naive_run, mnist_root, tmp_path, capsys):
    cli_main(["test", *tiny_run_args("naive/permuted_mnist.yaml", mnist_root, tmp_path),
              "--ckpt_path", str(naive_run / "checkpoints" / "last.ckpt")])
    # into the run it evaluates (the checkpoint's), not a new folder; its training files stay
    result = json.loads((naive_run / "test_accuracy.json").read_text())
    assert not (tmp_path / "lightning_logs").exists()
    fit_matrix = json.loads((naive_run / "accuracy_matrix.json").read_text())["matrix"]
    # the checkpoint is the model kept after task 3: its test accuracies are row 3 of the matrix
    assert result["accuracy"] == pytest.approx(fit_matrix[2], abs=1e-6)
    assert "average accuracy" in capsys.readouterr().out


def test_help_lists_data_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--data.num_tasks" in out and "--accuracy_matrix.print_table" in out


def test_print_config_resolves_links(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / "naive/permuted_mnist.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "num_tasks: 20" in out and "class_path: cl_lightning.models.nets.MLP" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data.num_taks", "3"], "num_taks"),
        (["--data.num_tasks", "-2"], "num_tasks"),
        (["--data.benchmark", "shuffled"], "benchmark"),
    ],
)
def test_bad_options_fail_with_readable_message(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / "naive/permuted_mnist.yaml"), *args])
    assert exit_info.value.code != 0
    assert expected in capsys.readouterr().err


DIGITS = str(CONFIGS / "naive" / "permuted_digits.yaml")


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [
        (["fit", "--config", DIGITS, "--data.num_task", "3", "--print_config"], "--data.num_task"),
        (["test", "--config", DIGITS, "--trainer.enable_progress", "false", "--print_config"], "--trainer.enable_progress"),
        (["grid", "--methods", "naive", "--benchmarks", "permuted_digits", "--seeds", "0", "--configs", str(CONFIGS),
          "--dry"], "--dry"),
        (["sweep", "--config", DIGITS, "--grid", str(CONFIGS / "grids" / "demo_digits.yaml"), "--dry"], "--dry"),
        (["report", ".", "--base", "naive"], "--base"),
        (["path", "--config", DIGITS, "--solutions", "1", "2", "--point", "3"], "--point"),
    ],
    ids=["fit", "test", "grid", "sweep", "report", "path"],
)
def test_an_abbreviated_option_is_refused_not_taken_for_the_full_one(argv, prefix, capsys, tmp_path, monkeypatch):
    """argparse's prefix matching would take ``--data.num_task`` for ``--data.num_tasks`` (a typo
    in a long command silently setting another option): every command refuses it by name."""
    monkeypatch.chdir(tmp_path)  # should the option be taken, nothing lands in the repository
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"error: unrecognized arguments: {prefix}" in capsys.readouterr().err


@pytest.mark.slow
def test_default_root_dir_moves_the_run_unless_the_logger_has_its_own_save_dir(tmp_path, monkeypatch):
    """``--trainer.default_root_dir`` moves every output (the logger's run folder with its matrix,
    config and checkpoints), as in plain Lightning; a logger ``save_dir`` given beside it wins."""
    monkeypatch.chdir(tmp_path)
    quick = ["--config", DIGITS, "--data.num_tasks", "2", "--data.train_examples_per_task", "64",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    cli_main(["fit", *quick, "--trainer.default_root_dir", str(tmp_path / "root")])
    run = tmp_path / "root" / "lightning_logs" / "version_0"
    assert (run / "accuracy_matrix.json").exists() and (run / "checkpoints" / "last.ckpt").exists()
    assert f"save_dir: {tmp_path / 'root'}" in (run / "config.yaml").read_text()  # the resume command finds it
    cli_main(["test", *quick, "--trainer.default_root_dir", str(tmp_path / "root"),
              "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
    assert (tmp_path / "logs" / "lightning_logs" / "version_0" / "test_accuracy.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "root"]  # nothing in the working directory


@pytest.mark.slow
@pytest.mark.parametrize("method", ["naive", "mcsgd"])
def test_split_cifar100_runs_end_to_end(method, cifar_root, tmp_path):
    """Task-masked logits, the ResNet as each config sets it (batch or running BatchNorm statistics),
    per-class memory and class-balanced subset (MC-SGD; the fake data have 20 images per class) on real pickles."""
    subset = ["--trainer.callbacks.init_args.subset_per_class", "10"] if method == "mcsgd" else []
    cli_main(["fit", *tiny_run_args(f"{method}/split_cifar100.yaml", cifar_root, tmp_path),
              "--model.net.init_args.width", "4", "--data.eval_batch_size", "50", *subset])
    run = tmp_path / "lightning_logs" / "version_0"
    record = json.loads((run / "accuracy_matrix.json").read_text())
    assert record["tasks_completed"] == 3
    assert all(0 <= v <= 100 for row in record["matrix"] for v in row if v is not None)
    if method == "mcsgd":
        assert (run / "w_hat_accuracy_matrix.json").exists()


def test_num_threads_sets_torch_threads_and_refuses_zero(capsys, tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit):
            cli_main(["fit", "--config", str(CONFIGS / "naive/permuted_digits.yaml"), "--num_threads", "0"])
        assert "num_threads" in capsys.readouterr().err
        cli_main(["test", "--config", str(CONFIGS / "naive/permuted_digits.yaml"), "--num_threads", "2",
                  "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
