"""Grid files, run-folder labels, the shipped grids and the sweep's input errors: fast, no Ray trial runs."""

import sys
from pathlib import Path

import pytest
import yaml
from processes import command_lines

from cl_lightning.cli.lightning_cli import main as cl_main
from cl_lightning.sweep.grid_file import GridFileError, check_keys, load_grid, override_args, setting_label, short_names

CONFIGS = Path(__file__).parents[2] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def test_grid_expands_the_product_in_file_order_with_cli_overrides(tmp_path):
    grid = load_grid(write(tmp_path, "params:\n  model.lr: [0.1, 0.01]\n  trainer.callbacks.init_args.lr: [0.005]\n"
                                     "  data.shuffle: [true, false]\nseeds: [0, 1]\n"))
    settings = grid.settings()
    assert len(settings) == 4 and grid.final_seeds == [0, 1] and grid.val_fraction == 0.1
    assert settings[1] == (("model.lr", 0.1), ("trainer.callbacks.init_args.lr", 0.005), ("data.shuffle", False))
    assert override_args(settings[1]) == ["--model.lr", "0.1", "--trainer.callbacks.init_args.lr", "0.005",
                                          "--data.shuffle", "false"]
    names = short_names(list(grid.params))
    assert names == {"model.lr": "model.lr", "trainer.callbacks.init_args.lr": "init_args.lr", "data.shuffle": "shuffle"}
    assert setting_label(settings[1], names) == "model.lr=0.1,init_args.lr=0.005,shuffle=false"


def test_samples_draw_an_equal_budget_from_the_product_the_same_on_every_read(tmp_path):
    text = "params:\n  model.lr: [0.25, 0.1, 0.01, 0.001]\n  data.batch_size: [10, 64]\n  model.dropout: [0.0, 0.25, 0.5]\n"
    full = load_grid(write(tmp_path, text + "seeds: [0]\n")).settings()
    drawn = load_grid(write(tmp_path, text + "samples: 16\nsample_seed: 3\nseeds: [0, 1]\n"))
    assert drawn.size == len(full) == 24 and len(drawn.settings()) == len(set(drawn.settings())) == 16
    assert drawn.settings() == [s for s in full if s in drawn.settings()]  # a subset, in product order
    assert drawn.settings() == load_grid(drawn.path).settings()  # the file decides the draw: reruns resume it
    other = load_grid(write(tmp_path, text + "samples: 16\nsample_seed: 4\nseeds: [0]\n")).settings()
    assert other != drawn.settings()
    assert load_grid(write(tmp_path, text + "samples: 30\nseeds: [0]\n")).settings() == full  # at most all of it


@pytest.mark.parametrize("text, message", [
    ("params: {model.lr: [0.1]}\nseeds: [0]\nsamples: 0\n", "samples must be an integer of at least 1"),
    ("params: {model.lr: [0.1]}\nseeds: [0]\nsample_seed: -1\n", "sample_seed must be an integer of at least 0"),
    ("params: {model.lr: [0.1]}\nseeds: [0]\nseed: 3\n", "unknown key(s) 'seed'"),
    ("params: {model.lr: []}\nseeds: [0]\n", "params.model.lr must be a non-empty list"),
    ("params: {model.lr: 0.1}\nseeds: [0]\n", "params.model.lr must be a non-empty list"),
    ("params: {}\nseeds: [0]\n", "'params' must map dotted keys to lists"),
    ("params: {model.lr: [0.1]}\n", "'seeds' must be a non-empty list of integers"),
    ("params: {model.lr: [0.1]}\nseeds: [0, 0]\n", "lists a seed twice"),
    ("params: {model.lr: [0.1]}\nseeds: [0]\nval_fraction: 0\n", "val_fraction must be a number in (0, 1)"),
    ("params: {data.val_fraction: [0.2]}\nseeds: [0]\n", "is set by the sweep itself"),
    ("params: [model.lr]\nseeds: [0]\n", "'params' must map"),
    ("params: {model.lr: [0.1\n", "is not valid YAML"),
])
def test_bad_grid_files_are_named_with_the_fix(tmp_path, text, message):
    with pytest.raises(GridFileError) as err:
        load_grid(write(tmp_path, text))
    assert message in str(err.value)


def test_keys_are_checked_against_the_resolved_config_through_the_callback_list(tmp_path):
    config = {"model": {"lr": 0.1}, "trainer": {"callbacks": [{"class_path": "X", "init_args": {"alpha0": 0.1}}]}}
    check_keys(load_grid(write(tmp_path, "params: {trainer.callbacks.init_args.alpha0: [0.1]}\nseeds: [0]\n")),
               config, Path("c.yaml"))
    with pytest.raises(GridFileError, match="params.model.lrr is not a setting of c.yaml; did you mean model.lr"):
        check_keys(load_grid(write(tmp_path, "params: {model.lrr: [0.1]}\nseeds: [0]\n")), config, Path("c.yaml"))


def test_command_line_errors(tmp_path, capsys):
    grid = write(tmp_path, "params: {model.lrr: [0.1]}\nseeds: [0]\n")
    with pytest.raises(SystemExit) as exit_info:
        cl_main(["sweep", "--config", str(tmp_path / "nope.yaml"), "--grid", str(grid)])
    assert str(exit_info.value.code).startswith("error: no base config") and "nope.yaml" in str(exit_info.value.code)
    with pytest.raises(SystemExit) as exit_info:  # checked before any Ray or trial starts
        cl_main(["sweep", "--config", str(CONFIGS / "naive" / "permuted_digits.yaml"), "--grid", str(grid)])
    assert "params.model.lrr is not a setting" in str(exit_info.value.code) and "did you mean model.lr" in str(exit_info.value.code)


def test_dry_run_prints_the_trials_commands(tmp_path, capsys):
    grid = write(tmp_path, "params: {model.lr: [0.1, 0.01]}\nseeds: [3]\n")
    sweep = ["sweep", "--config", str(CONFIGS / "naive" / "permuted_digits.yaml"), "--grid", str(grid),
             "--root", str(tmp_path / "runs"), "--dry_run"]
    cl_main([*sweep, "--solo", "--", "--data.num_tasks", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["permuted_digits/naive[lr=0.1]/seed_3", "permuted_digits/naive[lr=0.01]/seed_3"]
    assert "--data.num_tasks 2 --data.val_fraction 0.1 --model.lr 0.1 --seed_everything 3" in lines[0]
    assert f"save_dir {tmp_path / 'runs' / 'grid' / 'search'}" in lines[0]
    # by default the two learning rates (a per-member setting) are one population trial, each run in its folder
    cl_main([*sweep, "--", "--data.num_tasks", "2"])
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("permuted_digits/populations/naive[lr=0.1]+1_")
    assert "--model.lr [0.1, 0.01] --seeds [3,3]" in line and "naive[lr=0.01]/seed_3" in line.split("--member_dirs")[1]


def test_without_ray_the_message_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as when it is not installed
    grid = write(tmp_path, "params: {model.lr: [0.1]}\nseeds: [0]\n")
    with pytest.raises(SystemExit) as exit_info:
        cl_main(["sweep", "--config", str(CONFIGS / "naive" / "permuted_digits.yaml"), "--grid", str(grid),
                 "--root", str(tmp_path / "runs")])
    assert str(exit_info.value.code).startswith("error: `cl-lightning sweep` needs Ray Tune, which is not installed")
    assert "pip install 'cl_lightning[sweep]'" in str(exit_info.value.code)


def shipped_grids() -> list[tuple[Path, Path]]:
    """Every grid file of configs/grids with the config it is for (``<method>_<benchmark>.yaml``)."""
    methods = sorted((p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name not in ("grids", "protocol")), key=len,
                     reverse=True)
    pairs = [(CONFIGS / "grids" / "demo_digits.yaml", CONFIGS / "naive" / "permuted_digits.yaml")]
    for grid in sorted((CONFIGS / "grids").glob("*.yaml")):
        method = next((m for m in methods if grid.stem.startswith(m + "_")), None)
        if method is not None:
            pairs.append((grid, CONFIGS / method / f"{grid.stem[len(method) + 1:]}.yaml"))
    return pairs


def test_shipped_grid_files_parse_and_name_settings_of_their_configs():
    pairs = shipped_grids()
    methods = [p for p in CONFIGS.iterdir() if p.is_dir() and p.name not in ("grids", "protocol")]
    assert len(pairs) == 1 + 5 * len(methods)  # the demo + every method's grid for each of the 5 benchmarks
    for grid_path, config in pairs:
        grid = load_grid(grid_path)
        # the config file as written holds every key a grid varies (the resolved config holds more)
        check_keys(grid, yaml.safe_load(config.read_text()), config)
        assert len(grid.settings()) >= 2
    rot_fashion = load_grid(CONFIGS / "grids" / "mcsgd_rotated_fashion_mnist.yaml")
    assert list(rot_fashion.params) == ["trainer.callbacks.init_args.lr", "trainer.callbacks.init_args.alpha0"]
    assert rot_fashion.seeds == rot_fashion.final_seeds == [0, 1, 2]


@pytest.mark.slow  # resolves a config of every method (LightningCLI, in-process)
def test_the_protocol_gives_every_method_the_same_budget_on_keys_of_its_config(capsys):
    """configs/protocol/: every method on every benchmark, 16 settings (all of a smaller space) on 2 validation
    seeds, 10 test seeds; every key a setting of the method's resolved config (checked as the sweep checks it)."""
    protocol = sorted((CONFIGS / "protocol").glob("*.yaml"))
    methods = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name not in ("grids", "protocol"))
    benchmarks = {p.stem for p in (CONFIGS / "naive").glob("*.yaml")} - {"permuted_digits"}
    assert {p.stem for p in protocol} == {f"{m}_{b}" for m in methods for b in benchmarks}
    resolved = {}
    for method in methods:
        with pytest.raises(SystemExit):
            cl_main(["fit", "--config", str(CONFIGS / method / "permuted_mnist.yaml"), "--print_config"])
        resolved[method] = yaml.safe_load(capsys.readouterr().out)
    for path in protocol:
        grid = load_grid(path)
        method = next(m for m in sorted(methods, key=len, reverse=True) if path.stem.startswith(m + "_"))
        assert len(grid.settings()) == min(16, grid.size) and len(set(grid.settings())) == len(grid.settings())
        assert len(grid.seeds) >= 2 and grid.final_seeds == list(range(10)) and grid.val_fraction == 0.1
        check_keys(grid, resolved[method], path)


def test_the_rotated_fashion_mnist_grid_sets_the_mcsgd_callback(tmp_path, capsys):
    cl_main(["sweep", "--config", str(CONFIGS / "mcsgd" / "rotated_fashion_mnist.yaml"),
             "--grid", str(CONFIGS / "grids" / "mcsgd_rotated_fashion_mnist.yaml"), "--root", str(tmp_path), "--dry_run"])
    lines = capsys.readouterr().out.splitlines()
    # 4 consolidation lrs x 3 alpha0 x 3 seeds: both are MC-SGD's per-member settings, so 36 runs in
    # populations of at most 8 (--members_per_trial), in grid order, seeds innermost
    assert len(lines) == 5 and lines[0].startswith("rotated_fashion_mnist/populations/mcsgd[lr=0.15,alpha0=0.05]+7_")
    assert ("--trainer.callbacks.init_args.lr 0.15 --trainer.callbacks.init_args.alpha0 "
            "[0.05, 0.05, 0.05, 0.1, 0.1, 0.1, 0.25, 0.25]") in lines[0]
    assert "--seeds [0,1,2,0,1,2,0,1]" in lines[0] and "mcsgd[lr=0.15,alpha0=0.25]/seed_1" in lines[0]
    cl_main(["sweep", "--config", str(CONFIGS / "mcsgd" / "rotated_fashion_mnist.yaml"),
             "--grid", str(CONFIGS / "grids" / "mcsgd_rotated_fashion_mnist.yaml"), "--root", str(tmp_path), "--dry_run",
             "--members_per_trial", "12"])
    assert len(capsys.readouterr().out.splitlines()) == 3
    with pytest.raises(SystemExit) as exit_info:
        cl_main(["sweep", "--config", str(CONFIGS / "mcsgd" / "rotated_fashion_mnist.yaml"),
                 "--grid", str(CONFIGS / "grids" / "mcsgd_rotated_fashion_mnist.yaml"), "--root", str(tmp_path), "--dry_run",
                 "--members_per_trial", "0"])
    assert "--members_per_trial must be at least 1, got 0" in str(exit_info.value.code)
    cl_main(["sweep", "--config", str(CONFIGS / "mcsgd" / "rotated_fashion_mnist.yaml"),
             "--grid", str(CONFIGS / "grids" / "mcsgd_rotated_fashion_mnist.yaml"), "--root", str(tmp_path), "--dry_run",
             "--solo"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 36 and lines[0].startswith("rotated_fashion_mnist/mcsgd[lr=0.15,alpha0=0.05]/seed_0: cl-lightning")


def test_repeated_values_and_a_folder_of_another_sweep_are_refused(tmp_path):
    config = str(CONFIGS / "naive" / "permuted_digits.yaml")
    grid = write(tmp_path, "params: {model.lr: [0.1, 0.1]}\nseeds: [0]\n")
    with pytest.raises(SystemExit, match="would share the run folder naive\\[lr=0.1\\]: remove the repeated value"):
        cl_main(["sweep", "--config", config, "--grid", str(grid), "--root", str(tmp_path), "--dry_run"])
    grid.write_text("params: {model.lr: [0.1, 0.01]}\nseeds: [0]\n")
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "sweep.json").write_text('{"config": "/elsewhere/mcsgd/permuted_digits.yaml", "grid": "/g.yaml"}')
    with pytest.raises(SystemExit, match="holds the sweep of /elsewhere/mcsgd/permuted_digits.yaml with /g.yaml.*pass another --name"):
        cl_main(["sweep", "--config", config, "--grid", str(grid), "--root", str(tmp_path)])


def ray_running_here() -> bool:
    """Whether a Ray cluster runs on this machine (a sweep beside the tests): ``--address auto``
    connects to any, so the unreachable-cluster test cannot be made here."""
    return any("gcs_server" in text for text in command_lines().values())


@pytest.mark.xdist_group("ray")  # one Ray at a time on this machine (see tests/sweep/test_run.py)
@pytest.mark.slow
def test_an_unreachable_cluster_is_named(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    if ray_running_here():
        pytest.skip("a Ray cluster is running on this machine, and --address auto would connect to it")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    grid = write(tmp_path, "params: {model.lr: [0.1]}\nseeds: [0]\n")
    with pytest.raises(SystemExit, match="error: cannot reach the Ray cluster at --address auto: .*ray start --head"):
        cl_main(["sweep", "--config", str(CONFIGS / "naive" / "permuted_digits.yaml"), "--grid", str(grid),
                 "--root", str(tmp_path), "--address", "auto"])


def test_a_local_ray_that_does_not_start_is_an_error_with_the_way_out(tmp_path, monkeypatch):
    """On a loaded machine Ray's own processes can miss its start-up deadline (seen here with two
    trainings on 2 cores): the bare Exception Ray raises becomes one line saying what to do."""
    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def timed_out(**kwargs):
        raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(ray, "init", timed_out)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # whether or not this process joined a Ray before
    grid = write(tmp_path, "params: {model.lr: [0.1]}\nseeds: [0]\n")
    with pytest.raises(SystemExit, match="error: the local Ray did not start: The current node timed out.*--address auto"):
        cl_main(["sweep", "--config", str(CONFIGS / "naive" / "permuted_digits.yaml"), "--grid", str(grid),
                 "--root", str(tmp_path)])
