"""``cl-lightning report`` on a folder of synthetic accuracy matrices with hand-computed results."""

import csv
import io
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from cl_lightning.analysis.report import main, write_report
from cl_lightning.cli.lightning_cli import cli_main
from cl_lightning.cli.lightning_cli import main as cl_lightning
from cl_lightning.rundir import FAILED_MARKER, MatrixFileError, read_matrix, write_matrix

nan = math.nan
CONFIGS = Path(__file__).parents[2] / "configs"


def put_run(root: Path, name: str, rows: list[list[float]], num_tasks: int = 2) -> Path:
    """A run folder whose accuracy matrix is written by the real writer; ``rows`` may be fewer than T."""
    folder = root / name
    matrix = torch.full((num_tasks, num_tasks), nan, dtype=torch.float64)
    matrix[: len(rows)] = torch.tensor(rows, dtype=torch.float64)
    write_matrix(folder, "accuracy_matrix", matrix, len(rows) - 1, "test")
    return folder


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    """2 benchmarks x 2 methods x 3 seeds with holes of every kind (see each line)."""
    # naive / permuted_digits: A = 70, 80, 60 (mean 70, sample std 10); F = .30, .24, .30 (mean .28, std .034641)
    put_run(tmp_path, "permuted_digits/naive/seed_0", [[90, nan], [60, 80]])
    put_run(tmp_path, "permuted_digits/naive/seed_1", [[94, nan], [70, 90]])
    put_run(tmp_path, "permuted_digits/naive/seed_2", [[80, nan], [50, 70]])
    # their wall times: seed 0 resumed once (10.0 + 5.5 s), seed 1 20.5 s, seed 2 no log -> mean 18.0 s
    (tmp_path / "permuted_digits/naive/seed_0/run.log").write_text(
        "$ cl-lightning fit\n\nwall time of the whole command: 10.0 s (exit code 137)\n--- resumed ---\n"
        "$ cl-lightning fit --ckpt_path last.ckpt\n\nwall time of the whole command: 5.5 s (exit code 0)\n")
    (tmp_path / "permuted_digits/naive/seed_1/run.log").write_text("...\nwall time of the whole command: 20.5 s (exit code 0)\n")
    # mcsgd / permuted_digits: A = 86.5, 89 (std 2.5/sqrt 2 = 1.7678); F = .05, .04 (std .0070711); seed 2 missing
    put_run(tmp_path, "permuted_digits/mcsgd/seed_0", [[90, nan], [85, 88]])
    put_run(tmp_path, "permuted_digits/mcsgd/seed_1", [[92, nan], [88, 90]])
    # naive / rotated_digits: seed 0 finished (A 62.5, F .5); seed 1 failed; seed 2 interrupted after task 1
    put_run(tmp_path, "rotated_digits/naive/seed_0", [[100, nan], [50, 75]])
    failed = tmp_path / "rotated_digits/naive/seed_1"
    failed.mkdir(parents=True)
    (failed / FAILED_MARKER).write_text("exit code 1: RuntimeError: boom\n")
    put_run(tmp_path, "rotated_digits/naive/seed_2", [[97, nan]])
    # mcsgd / rotated_digits: seed 0 has a damaged matrix file, seeds 1 and 2 are missing
    damaged = tmp_path / "rotated_digits/mcsgd/seed_0"
    damaged.mkdir(parents=True)
    (damaged / "accuracy_matrix.json").write_text('{"num_tasks": 2, "matrix": [[90')
    # a run outside the layout: ignored, and said so
    put_run(tmp_path, "lightning_logs/version_0", [[50, nan], [50, 50]])
    return tmp_path


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_cells_are_mean_and_sample_std_over_seeds(grid):
    write_report(grid, draw=False)
    markdown = (grid / "report.md").read_text()
    assert "| method | permuted_digits | rotated_digits |" in markdown
    # 95 % t intervals: naive 70 ± t(.975, 2) 4.302653 * 10 / sqrt 3 = 70 ± 24.841; mcsgd (2 seeds, t(.975, 1) 12.706205)
    # 87.75 ± 15.883, not clipped at 100: an interval that wide says the two seeds pin nothing down
    assert "| naive | 70.00 ± 10.00 [45.16, 94.84] / 0.280 ± 0.035 [0.194, 0.366] | 62.50 [n=1] / 0.500 [n=1] (1/3 seeds) |" \
        in markdown
    assert "| mcsgd | 87.75 ± 1.77 [71.87, 103.63] / 0.045 ± 0.007 [-0.019, 0.109] (2/3 seeds) | — |" in markdown
    cells = {(r["benchmark"], r["method"]): r for r in read_csv(grid / "report.csv")}
    naive = cells["permuted_digits", "naive"]
    assert (naive["seeds_finished"], naive["seeds_expected"], naive["num_tasks"]) == ("3", "3", "2")
    assert float(naive["average_accuracy_mean"]) == pytest.approx(70)
    assert float(naive["average_accuracy_std"]) == pytest.approx(10)
    assert float(naive["forgetting_mean"]) == pytest.approx(0.28)
    assert float(naive["forgetting_std"]) == pytest.approx(math.sqrt(0.0012), rel=1e-5)
    # learning accuracy (mean diagonal) 85, 92, 75 -> 84; BWT a[2][1] - a[1][1]: -30, -24, -30 -> -28
    assert float(naive["learning_accuracy_mean"]) == pytest.approx(84)
    assert float(naive["backward_transfer_mean"]) == pytest.approx(-28)
    mcsgd = cells["permuted_digits", "mcsgd"]
    assert float(mcsgd["average_accuracy_std"]) == pytest.approx(2.5 / math.sqrt(2), rel=1e-5)
    one_seed = cells["rotated_digits", "naive"]
    assert one_seed["seeds_finished"] == "1" and one_seed["average_accuracy_std"] == ""
    assert one_seed["average_accuracy_ci95_low"] == one_seed["average_accuracy_ci95_high"] == ""  # n = 1: no interval
    assert cells["rotated_digits", "mcsgd"]["seeds_finished"] == "0"
    assert naive["wall_time_s_mean"] == "18.0" and mcsgd["wall_time_s_mean"] == ""
    assert "| naive | 18 | — |" in markdown
    runs = {(r["benchmark"], r["method"], r["seed"]): r for r in read_csv(grid / "report_runs.csv")}
    assert [runs["permuted_digits", "naive", seed]["wall_time_s"] for seed in "012"] == ["15.5", "20.5", ""]


def test_missing_failed_incomplete_and_unreadable_runs_are_listed_not_dropped(grid, capsys):
    main([str(grid), "--no-plots"])
    printed = capsys.readouterr().out
    markdown = (grid / "report.md").read_text()
    expected = {
        "permuted_digits/mcsgd/seed_2": "missing",
        "rotated_digits/naive/seed_1": "failed",
        "rotated_digits/naive/seed_2": "incomplete",
        "rotated_digits/mcsgd/seed_0": "failed",
        "rotated_digits/mcsgd/seed_1": "missing",
        "rotated_digits/mcsgd/seed_2": "missing",
    }
    for text in (printed, markdown):
        for name, status in expected.items():
            assert f"- {name} **{status}**" in text
        assert "exit code 1: RuntimeError: boom" in text and "1 of 2 tasks done" in text
        assert "cannot read the accuracy matrix" in text
        assert f"{grid / 'lightning_logs' / 'version_0'} ignored" in text
    assert "6 of 12 runs finished (2 methods x 2 benchmarks x 3 seeds)" in markdown
    assert "rerun `cl-lightning grid` to go on" in markdown  # a grid's run is taken up by the grid
    runs = {f"{r['benchmark']}/{r['method']}/seed_{r['seed']}": r for r in read_csv(grid / "report_runs.csv")}
    assert len(runs) == 12
    assert {name: runs[name]["status"] for name in expected} == expected
    assert runs["rotated_digits/naive/seed_2"]["tasks_completed"] == "1"
    assert float(runs["rotated_digits/naive/seed_2"]["average_accuracy"]) == pytest.approx(97)


def test_plots_are_written_and_linked(grid, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    _, files = write_report(grid, out)
    pngs = sorted(p.name for p in (out / "plots").iterdir())
    # 2 average-accuracy figures, 3 cells with finished runs, 7 runs with a readable matrix
    assert len(pngs) == 2 + 3 + 7
    assert {"average_accuracy_permuted_digits.png", "task_accuracy_permuted_digits_mcsgd.png",
            "heatmap_rotated_digits_naive_seed_2.png"} <= set(pngs)
    assert all((out / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    markdown = (out / "report.md").read_text()
    assert "![average_accuracy_permuted_digits](plots/average_accuracy_permuted_digits.png)" in markdown
    assert "- [heatmap_rotated_digits_naive_seed_2](plots/heatmap_rotated_digits_naive_seed_2.png)" in markdown
    assert not (grid / "report.md").exists()


def test_folder_without_runs_is_an_error_that_says_what_to_do(tmp_path, capsys):
    put_run(tmp_path, "lightning_logs/version_0", [[50, nan], [50, 50]])
    with pytest.raises(SystemExit) as exit_info:
        cl_lightning(["report", str(tmp_path)])  # the console entry point: one `error:` line
    message = str(exit_info.value.code)
    assert message.startswith("error: no run folders")
    assert "no run folders <benchmark>/<method>/seed_<n>/" in message and "version_0" in message


def test_damaged_matrix_file_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "accuracy_matrix.json"
    path.write_text('{"num_tasks": 2, "matrix": [[90, null, 3]]}')
    with pytest.raises(MatrixFileError, match=r"accuracy_matrix.json: row 1 must be a list of num_tasks=2 values; rerun"):
        read_matrix(path)


def put_final(root: Path, name: str, average_accuracy: float) -> Path:
    """A finished two-task run whose final average accuracy is ``average_accuracy`` (forgetting 0.6 - A/100)."""
    return put_run(root, name, [[60, nan], [average_accuracy, average_accuracy]])


def test_t_interval_of_the_mean_beside_the_std(tmp_path, capsys):
    # A = 40, 42, 44: mean 42, s 2, half-width t(.975, 2) 4.302653 * 2 / sqrt 3 = 4.9682;
    # F = .20, .18, .16: mean .18, s .02, half-width .049682
    for seed, accuracy in enumerate((40, 42, 44)):
        put_final(tmp_path, f"permuted_digits/naive/seed_{seed}", accuracy)
    main([str(tmp_path), "--no-plots"])
    cell = "| naive | 42.00 ± 2.00 [37.03, 46.97] / 0.180 ± 0.020 [0.130, 0.230] |"
    printed, markdown = capsys.readouterr().out, (tmp_path / "report.md").read_text()
    assert cell in printed and cell in markdown
    assert "Warning" not in printed + markdown  # three seeds: no warning
    [row] = read_csv(tmp_path / "report.csv")
    assert float(row["average_accuracy_ci95_low"]) == pytest.approx(42 - 4.9682, abs=1e-4)
    assert float(row["average_accuracy_ci95_high"]) == pytest.approx(42 + 4.9682, abs=1e-4)
    assert float(row["forgetting_ci95_high"]) == pytest.approx(0.18 + 0.0496827, abs=1e-6)
    assert float(row["average_accuracy_std"]) == pytest.approx(2)  # the old columns stay


def test_paired_comparison_with_mcsgd_over_common_seeds(tmp_path, capsys):
    """Differences method - mcsgd seed by seed, their 95 % t interval and whether it excludes 0."""
    mcsgd = (40, 42, 44)
    for seed, accuracy in enumerate(mcsgd):
        put_final(tmp_path, f"permuted_digits/mcsgd/seed_{seed}", accuracy)
    # naive: differences -10, -9, -11: mean -10, s 1, half-width 2.4841 -> [-12.48, -7.52], excludes 0
    for seed, accuracy in enumerate((30, 33, 33)):
        put_final(tmp_path, f"permuted_digits/naive/seed_{seed}", accuracy)
    # er: differences 1, 2, 1: mean 1.3333, s .57735, half-width 1.4342 -> [-0.10, 2.77], contains 0
    for seed, accuracy in enumerate((41, 44, 45)):
        put_final(tmp_path, f"permuted_digits/er/seed_{seed}", accuracy)
    put_final(tmp_path, "permuted_digits/agem/seed_1", 50)  # one common seed: a difference, no interval
    put_final(tmp_path, "permuted_digits/ewc/seed_3", 50)  # no seed in common with mcsgd
    put_final(tmp_path, "rotated_digits/naive/seed_0", 50)  # a benchmark without mcsgd runs
    main([str(tmp_path), "--no-plots"])
    printed, markdown = capsys.readouterr().out, (tmp_path / "report.md").read_text()
    for text in (printed, markdown):
        assert "| permuted_digits | naive | 3 | -10.00 | [-12.48, -7.52] | separated |" in text
        assert "| permuted_digits | er | 3 | +1.33 | [-0.10, 2.77] | not separated |" in text
        assert "| permuted_digits | agem | 1 | +8.00 | n=1 | not separated |" in text
        assert "| permuted_digits | ewc | 0 | — | — | no common seeds with mcsgd |" in text
        assert "rotated_digits: no finished mcsgd run, no paired comparison" in text
    rows = {r["method"]: r for r in read_csv(tmp_path / "report_paired.csv")}
    assert list(rows) == ["naive", "ewc", "agem", "er"] and {r["benchmark"] for r in rows.values()} == {"permuted_digits"}
    naive, er, agem = rows["naive"], rows["er"], rows["agem"]
    assert (naive["baseline"], naive["pairs"], naive["seeds"]) == ("mcsgd", "3", "0 1 2")
    assert float(naive["mean_difference"]) == pytest.approx(-10)
    assert float(naive["ci95_low"]) == pytest.approx(-10 - 2.4841, abs=1e-4)
    assert float(naive["ci95_high"]) == pytest.approx(-10 + 2.4841, abs=1e-4)
    assert naive["verdict"] == "separated"
    assert float(er["mean_difference"]) == pytest.approx(4 / 3, abs=1e-4)
    assert float(er["ci95_low"]) == pytest.approx(4 / 3 - 1.43421, abs=1e-4) and er["verdict"] == "not separated"
    assert (agem["pairs"], agem["seeds"], agem["ci95_low"], agem["verdict"]) == ("1", "1", "", "not separated")
    assert (rows["ewc"]["pairs"], rows["ewc"]["mean_difference"], rows["ewc"]["verdict"]) == (
        "0", "", "no common seeds with mcsgd")


def test_paired_comparison_without_mcsgd_says_so(grid, tmp_path_factory):
    """The fixture's rotated_digits has no finished mcsgd run; a report of naive only has no mcsgd at all."""
    write_report(grid, draw=False)
    assert "rotated_digits: no finished mcsgd run, no paired comparison" in (grid / "report.md").read_text()
    only_naive = tmp_path_factory.mktemp("naive")
    put_final(only_naive, "permuted_digits/naive/seed_0", 50)
    write_report(only_naive, draw=False)
    assert "permuted_digits: no finished mcsgd run, no paired comparison" in (only_naive / "report.md").read_text()
    assert read_csv(only_naive / "report_paired.csv") == []


def test_another_baseline_is_chosen_with_its_flag(grid, capsys):
    # mcsgd - naive on permuted_digits, seeds 0 and 1: 86.5 - 70, 89 - 80 = 16.5, 9: mean 12.75, s 5.3033,
    # half-width t(.975, 1) 12.706205 * 5.3033 / sqrt 2 = 47.65 -> contains 0
    main([str(grid), "--no-plots", "--baseline", "naive"])
    printed = capsys.readouterr().out
    assert "| permuted_digits | mcsgd | 2 | +12.75 | [-34.90, 60.40] | not separated |" in printed
    assert "| rotated_digits | mcsgd | 0 | — | — | no common seeds with naive |" in printed
    assert "## Paired comparison with naive (same seeds)" in (grid / "report.md").read_text()


def test_a_damaged_population_record_leaves_the_wall_time_unknown(tmp_path):
    member = put_run(tmp_path, "permuted_digits/naive/seed_0", [[90, nan], [60, 80]])
    (member / "population.json").write_text('{"population": ')
    report, _ = write_report(tmp_path, draw=False)
    assert report.runs[0].status == "finished" and report.runs[0].wall_time is None
    assert "Whole grid: no run logged a wall time." in (tmp_path / "report.md").read_text()


def test_cells_of_fewer_than_three_seeds_are_named_in_one_warning_line(grid, capsys):
    """The fixture's permuted_digits/mcsgd has 2 finished seeds (interval [71.87, 103.63]) and rotated_digits/naive 1."""
    main([str(grid), "--no-plots"])
    printed, markdown = capsys.readouterr().out, (grid / "report.md").read_text()
    warning = ("Warning: 2 cell(s) have fewer than 3 finished seeds: permuted_digits/mcsgd (2), rotated_digits/naive (1). "
               "Their 95 % intervals (2 seeds: ±9 std; 1 seed: none) cannot rank methods: train at least 3 seeds, e.g. "
               "--seeds [0,1,2].")
    for text in (printed, markdown):
        assert [line for line in text.splitlines() if "fewer than 3" in line] == [warning]
    assert markdown.index("| mcsgd | 87.75") < markdown.index(warning) < markdown.index("Wall time per run")


def put_config(folder: Path, seed: int, callback: str | None = "cl_lightning.methods.mcsgd.MCSGD", lr: float = 0.1,
               benchmark: str = "permuted", **top: object) -> None:
    """A run's config.yaml with the sections that name it (as LightningCLI writes them, shortened)."""
    callbacks = [{"class_path": callback, "init_args": {"alpha0": 0.25}}] if callback else []
    config = {"seed_everything": seed, "trainer": {"callbacks": callbacks}, "model": {"lr": lr, "population_member": 0},
              "data": {"source": "digits", "benchmark": benchmark, "num_tasks": 2, "seed": None}, "seeds": None, **top}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))


def put_population(run: Path, seeds: list[int], finals: list[float], lr: float = 0.1) -> None:
    """A population as `fit --seeds` writes it: the run folder's config.yaml, each member's matrix and
    config.yaml in ``<run>/seed_<n>/``."""
    put_config(run, seeds[0], lr=lr, seeds=seeds)
    for seed, final in zip(seeds, finals):
        put_final(run, f"seed_{seed}", final)
        put_config(run / f"seed_{seed}", seed, lr=lr)


def test_runs_outside_the_grid_layout_are_named_by_their_config(tmp_path, capsys):
    """A folder of fit runs: two populations of MC-SGD with other lrs, a plain naive run, and members that
    fit wrote beside their run folder before (lightning_logs/seed_<n>); none is named after its folders."""
    logs = tmp_path / "lightning_logs"
    put_population(logs / "version_0", [0, 1, 2], [40, 42, 44])
    put_population(logs / "version_1", [0, 1], [50, 52], lr=0.05)
    put_final(logs, "version_2", 30)
    put_config(logs / "version_2", 3, callback=None)
    put_final(logs, "seed_7", 60)  # the layout before: a member beside its population's version_N
    put_config(logs / "seed_7", 7, benchmark="rotated")
    put_final(logs, "version_3", 20)  # no config.yaml: nothing names it
    main([str(logs), "--no-plots"])
    printed, markdown = capsys.readouterr().out, (logs / "report.md").read_text()
    runs = {(r["benchmark"], r["method"], r["seed"]): r for r in read_csv(logs / "report_runs.csv")}
    finished = {key: Path(r["folder"]).relative_to(logs).as_posix() for key, r in runs.items() if r["status"] == "finished"}
    assert finished == {
        ("permuted_digits", "mcsgd[model.lr=0.1]", "0"): "version_0/seed_0",
        ("permuted_digits", "mcsgd[model.lr=0.1]", "1"): "version_0/seed_1",
        ("permuted_digits", "mcsgd[model.lr=0.1]", "2"): "version_0/seed_2",
        ("permuted_digits", "mcsgd[model.lr=0.05]", "0"): "version_1/seed_0",
        ("permuted_digits", "mcsgd[model.lr=0.05]", "1"): "version_1/seed_1",
        ("permuted_digits", "naive", "3"): "version_2",
        ("rotated_digits", "mcsgd", "7"): "seed_7",
    }
    for text in (printed, markdown):
        assert "| method | permuted_digits | rotated_digits |" in text
        assert "| mcsgd[model.lr=0.1] | 42.00 ± 2.00 [37.03, 46.97] / 0.180 ± 0.020 [0.130, 0.230] | — |" in text
        assert "lightning_logs |" not in text and "| version_0 |" not in text
        assert ("permuted_digits: no finished mcsgd run, no paired comparison (pass one of mcsgd[model.lr=0.05], "
                "mcsgd[model.lr=0.1] as --baseline)") in text
        assert f"{logs / 'version_3'} ignored: not a <benchmark>/<method>/seed_<n> run folder, and no config.yaml" in text
    # fit's runs span no grid: another population's seeds are not missing runs of this one
    assert not [key for key, run in runs.items() if run["status"] == "missing"]


def test_a_population_of_one_seed_is_named_by_the_seed_it_trained(tmp_path):
    put_final(tmp_path, "version_0", 50)
    put_config(tmp_path / "version_0", 0, seeds=[3])  # `--seeds [3]`: seed_everything said 0 before
    report, _ = write_report(tmp_path, draw=False)
    assert [run.name for run in report.runs] == ["permuted_digits/mcsgd/seed_3"]


def test_a_grid_folder_given_to_report_keeps_the_grid_names(tmp_path):
    """stable_sgd has no method callback (its config says naive); below the benchmark folder the layout still names it."""
    member = put_final(tmp_path, "permuted_digits/stable_sgd/seed_0", 50)
    put_config(member, 0, callback=None)
    report, _ = write_report(tmp_path / "permuted_digits", draw=False)
    assert [run.name for run in report.runs] == ["permuted_digits/stable_sgd/seed_0"]


def test_a_seed_found_twice_is_counted_once(tmp_path, capsys):
    put_population(tmp_path / "version_0", [0, 1], [40, 42])
    shutil.copytree(tmp_path / "version_0" / "seed_0", tmp_path / "backup" / "member")
    main([str(tmp_path), "--no-plots"])
    printed = capsys.readouterr().out
    assert "| mcsgd | 41.00 ± 1.41" in printed
    assert (f"{tmp_path / 'version_0' / 'seed_0'} ignored: permuted_digits/mcsgd/seed_0 again ({tmp_path / 'backup' / 'member'} "
            "is counted): a seed enters a cell once") in printed


def test_the_final_folders_of_several_sweeps_make_one_table(tmp_path, capsys):
    """The paper protocol's table: each sweep's final runs in a folder of their own, one report over all."""
    for seed, accuracy in enumerate((40, 42, 44)):
        put_final(tmp_path, f"mcsgd_permuted_digits/final/permuted_digits/mcsgd/seed_{seed}", accuracy)
    for seed, accuracy in enumerate((30, 33, 33)):
        put_final(tmp_path, f"naive_permuted_digits/final/permuted_digits/naive/seed_{seed}", accuracy)
    put_final(tmp_path, "naive_permuted_digits/search/permuted_digits/naive[lr=0.1]/seed_0", 99)  # not given
    with pytest.raises(SystemExit):
        main([str(tmp_path / "mcsgd_permuted_digits/final"), str(tmp_path / "naive_permuted_digits/final")])
    assert "2 folders make one report: say where it goes with --out" in capsys.readouterr().err
    # the same final folder twice: its runs count once
    finals = [str(tmp_path / name / "final") for name in ("mcsgd_permuted_digits", "naive_permuted_digits", "naive_permuted_digits")]
    main([*finals, "--out", str(tmp_path / "table"), "--no-plots"])
    printed = capsys.readouterr().out
    assert "| permuted_digits | naive | 3 | -10.00 | [-12.48, -7.52] | separated |" in printed
    assert "naive[lr=0.1]" not in printed and "again" in printed
    rows = {r["method"]: r for r in read_csv(tmp_path / "table" / "report.csv")}
    assert list(rows) == ["naive", "mcsgd"] and rows["naive"]["seeds_finished"] == "3"
    assert f"{tmp_path / 'mcsgd_permuted_digits' / 'final'}, {tmp_path / 'naive_permuted_digits' / 'final'}" in (
        tmp_path / "table" / "report.md").read_text()


@pytest.mark.slow
def test_report_of_a_population_that_fit_trained(tmp_path, monkeypatch, capsys):
    """The README's population, `fit --seeds [0,1,2]` (2 tasks), then `report lightning_logs`."""
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--config", str(CONFIGS / "mcsgd" / "permuted_digits.yaml"), "--seeds", "[0,1,2]", "--data.num_tasks", "2",
              "--data.train_examples_per_task", "200", "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false", "--accuracy_matrix.print_table", "false"])
    capsys.readouterr()
    main(["lightning_logs", "--no-plots"])
    printed = capsys.readouterr().out
    assert "| method | permuted_digits |" in printed and "| mcsgd | " in printed and "(" not in printed.split("| mcsgd |")[1][:60]
    assert "no finished mcsgd run" not in printed and "Warning" not in printed
    report, _ = write_report(tmp_path / "lightning_logs", draw=False)
    assert [(run.name, run.status) for run in report.runs] == [(f"permuted_digits/mcsgd/seed_{k}", "finished") for k in range(3)]
