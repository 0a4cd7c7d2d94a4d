"""``cl-lightning report`` on a folder of synthetic accuracy matrices with hand-computed results."""

import csv
import io
import math
from pathlib import Path

import pytest
import torch

from cl_lightning.analysis.report import main, write_report
from cl_lightning.cli import main as cl_lightning
from cl_lightning.rundir import FAILED_MARKER, MatrixFileError, read_matrix, write_matrix

nan = math.nan


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
    assert cell in capsys.readouterr().out and cell in (tmp_path / "report.md").read_text()
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
