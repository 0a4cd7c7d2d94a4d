"""``cl-lightning path`` on a real 3-task MC-SGD run that saved its solutions (offline digits)."""

import csv
import io
import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cl_lightning.analysis.linear_path import (
    EndpointError,
    build,
    endpoint_names,
    interpolate,
    load_endpoint,
    main,
    make_parser,
)
from cl_lightning.cli.lightning_cli import cli_main
from cl_lightning.cli.lightning_cli import main as cl_lightning

CONFIGS = Path(__file__).parents[2] / "configs"
README = Path(__file__).parents[2] / "README.md"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """MC-SGD, 3 permuted-digits tasks of 300 examples, a checkpoint after every task, solutions saved."""
    root = tmp_path_factory.mktemp("runs")
    cli_main(["fit", "--config", str(CONFIGS / "mcsgd" / "permuted_digits.yaml"), "--data.num_tasks", "3",
              "--data.train_examples_per_task", "300", "--trainer.callbacks.init_args.save_solutions", "true",
              "--checkpoint.save_top_k", "-1", "--trainer.logger.init_args.save_dir", str(root),
              "--trainer.logger.init_args.name", "permuted_digits/mcsgd", "--trainer.logger.init_args.version", "seed_0",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--accuracy_matrix.print_table", "false"])
    return root / "permuted_digits" / "mcsgd" / "seed_0"


def matrix(run: Path, stem: str = "accuracy_matrix") -> list[list[float]]:
    return json.loads((run / f"{stem}.json").read_text())["matrix"]


def setup(run: Path, *overrides: str):
    return build(make_parser(), ["--config", str(run / "config.yaml"), "--start", "a", "--end", "b", *overrides])


@pytest.mark.slow
def test_save_solutions_writes_w_hat_and_w_bar_of_every_task(run):
    _, module, _ = setup(run)
    names = sorted(p.name for p in (run / "solutions").iterdir())
    assert names == [f"{kind}_{t:02d}.pt" for kind in ("w_bar", "w_hat") for t in (1, 2, 3)]
    solution = {name.removesuffix(".pt"): torch.load(run / "solutions" / name) for name in names}
    assert torch.equal(solution["w_bar_01"], solution["w_hat_01"])  # no consolidation after task 1
    assert not torch.equal(solution["w_bar_03"], solution["w_hat_03"])
    # the model kept after the last task (last.ckpt) is w_bar_3
    assert torch.equal(load_endpoint(run / "checkpoints" / "last.ckpt", module), solution["w_bar_03"])


@pytest.mark.slow
def test_interpolation_at_alpha_0_and_1_gives_the_endpoints_metrics(run):
    _, module, dm = setup(run)
    after_task_1 = next((run / "checkpoints").glob("epoch=0-*.ckpt"))
    start, end = load_endpoint(after_task_1, module), load_endpoint(run / "checkpoints" / "last.ckpt", module)
    result = interpolate(module, dm, start, end, [0, 1, 2], points=5)
    assert result.alphas.tolist() == [0, 0.25, 0.5, 0.75, 1]
    # accuracies measured by Lightning's validation loop during fit (float32): the matrix rows of w_bar_1 and
    # w_bar_3; one test example is 100/359 = 0.28 points, so 1e-4 means the same examples right
    a = matrix(run)
    assert result.accuracy[0, 0].item() == pytest.approx(a[0][0], abs=1e-4)
    assert result.accuracy[-1].tolist() == pytest.approx(a[2], abs=1e-4)
    # losses: plain cross-entropy of each endpoint over each task's whole test set
    for row, vector in ((0, start), (-1, end)):
        module.population.load_flat(vector.unsqueeze(0))
        module.eval()
        for task in range(3):
            dataset = dm.task_set(task, "test")
            x, y, t = dataset.batch(0, len(dataset))
            with torch.no_grad():
                expected = F.cross_entropy(module(x, t)[0], y[0]).item()
            assert result.loss[row, task].item() == pytest.approx(expected, rel=1e-5)
    assert not torch.equal(result.loss[2], result.loss[0])  # the midpoint is another model


def read_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.mark.slow
def test_section_5_picture_from_the_saved_solutions(run, capsys):
    main(["--config", str(run / "config.yaml"), "--solutions", "1", "2", "--points", "5"])
    rows = read_rows(run / "linear_path" / "solutions_01_02.csv")
    paths = {"w_hat_1 -> w_hat_2": [r for r in rows if r["path"] == "w_hat_1 -> w_hat_2"],
             "w_hat_1 -> w_bar_2": [r for r in rows if r["path"] == "w_hat_1 -> w_bar_2"]}
    assert [len(p) for p in paths.values()] == [5, 5] and {r["task"] for r in rows} == {"1"}
    continual, mcsgd = paths.values()
    assert continual[0]["loss"] == mcsgd[0]["loss"] and continual[0]["alpha"] == "0"  # both start at w_hat_1
    # at α = 1: task-1 accuracy of w_hat_2 (MC-SGD's w_hat matrix) and of w_bar_2 (the accuracy matrix)
    assert float(continual[-1]["accuracy"]) == pytest.approx(matrix(run, "w_hat_accuracy_matrix")[1][0], abs=1e-4)
    assert float(mcsgd[-1]["accuracy"]) == pytest.approx(matrix(run)[1][0], abs=1e-4)
    assert (run / "linear_path" / "solutions_01_02.png").read_bytes()[:4] == b"\x89PNG"
    assert "w_hat_1 -> w_bar_2, task 1: loss" in capsys.readouterr().out


@pytest.mark.slow
def test_a_checkpoint_of_another_network_is_refused_with_the_fix(run, tmp_path):
    ckpt = str(run / "checkpoints" / "last.ckpt")
    # through the console entry point: one `error:` line, no traceback
    with pytest.raises(SystemExit,
                       match="(?s)^error: the checkpoint .* does not fit the network of the config.*pass the config.yaml of the run"):
        cl_lightning(["path", "--config", str(run / "config.yaml"), "--model.net.init_args.hidden_sizes", "[32]",
              "--start", ckpt, "--end", ckpt, "--points", "2"])
    torch.save(torch.zeros(10), tmp_path / "short.pt")
    with pytest.raises(EndpointError, match=r"shape \(10,\), but the network of the config has \d+ parameters"):
        main(["--config", str(run / "config.yaml"), "--start", str(tmp_path / "short.pt"), "--end", ckpt, "--points", "2"])


def test_solutions_of_a_run_that_did_not_save_them_are_asked_for(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text((CONFIGS / "naive" / "permuted_digits.yaml").read_text())
    with pytest.raises(SystemExit):
        main(["--config", str(tmp_path / "config.yaml"), "--solutions", "1", "2"])
    assert "save_solutions true" in capsys.readouterr().err


@pytest.mark.slow
def test_endpoint_vector_matches_the_checkpoint_module(run):
    _, module, _ = setup(run)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    module.population.load_state_dict({k.removeprefix("population."): v for k, v in state.items()
                                       if k.startswith("population.")})
    assert torch.equal(module.population.flat()[0], load_endpoint(run / "checkpoints" / "last.ckpt", module))


@pytest.mark.slow
def test_two_last_checkpoints_are_named_from_their_runs_and_never_overwritten_silently(run, tmp_path, capsys):
    other = run.parent / "seed_1"  # a second run of the same network: its folder, config and last.ckpt
    (other / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "config.yaml", other / "config.yaml")
    shutil.copy(next((run / "checkpoints").glob("epoch=0-*.ckpt")), other / "checkpoints" / "last.ckpt")
    call = ["--config", str(run / "config.yaml"), "--start", str(run / "checkpoints" / "last.ckpt"),
            "--end", str(other / "checkpoints" / "last.ckpt"), "--tasks", "1", "--points", "2", "--out", str(tmp_path)]
    main(call)
    written = tmp_path / "path_seed_0-last_to_seed_1-last.csv"
    assert {r["path"] for r in read_rows(written)} == {"seed_0/last -> seed_1/last"}
    before = written.read_bytes()
    with pytest.raises(SystemExit):
        main(call)
    assert f"{written}, {written.with_suffix('.png')} already exist (an earlier `path` call): pass --overwrite" in (
        capsys.readouterr().err)
    assert written.read_bytes() == before
    main([*call, "--overwrite", "true"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [written.name, written.with_suffix(".png").name]


def test_endpoints_of_one_run_are_named_by_the_run_folder():
    checkpoints = Path("runs/version_3/checkpoints")
    assert endpoint_names(checkpoints / "epoch=0-step=90.ckpt", checkpoints / "last.ckpt") == (
        "version_3/epoch=0-step=90", "version_3/last")
    assert endpoint_names(Path("runs/version_3/checkpoints/last.ckpt"), Path("runs/version_4/solutions/w_bar_02.pt")) == (
        "version_3/last", "version_4/w_bar_02")


def readme_commands(section: str) -> list[list[str]]:
    """The ``cl-lightning`` commands of the first bash block after the README heading ``section``, as argv lists."""
    block = README.read_text().split(section, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.startswith("cl-lightning ")]


@pytest.mark.slow
def test_the_readmes_path_command_reads_the_run_its_fit_command_writes(tmp_path, monkeypatch, capsys):
    """The README's paper section: `path --solutions` after its commands (before, it named a grid run, which saves no
    solutions: `missing .../solutions/w_hat_01.pt`). Its fit runs as written but on 2 digits tasks."""
    commands = readme_commands("## Reproducing the paper's table")
    fit = next(command for command in commands if command[1] == "fit")
    path = next(command for command in commands if command[1] == "path")
    config = fit.index("--config") + 1
    fit[config] = str(CONFIGS / "mcsgd" / "permuted_digits.yaml")  # was configs/mcsgd/rotated_mnist.yaml
    monkeypatch.chdir(tmp_path)
    cli_main([*fit[1:], "--data.num_tasks", "2", "--data.train_examples_per_task", "200",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    main(path[2:])
    assert "w_hat_1 -> w_bar_2, task 1: loss" in capsys.readouterr().out
