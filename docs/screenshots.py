"""Screenshots of TensorBoard's Images and HParams tabs for the docs (docs/images/, or --out).

Runs two short MC-SGD fits on the offline 8x8 digits (alpha0 0.1 and 0.25; two separate runs, so
the HParams tab orders their columns by name, and ``method/alpha0`` is the second) into a temporary folder, serves it with
``tensorboard --logdir`` on a free localhost port and photographs each tab with headless Chromium;
also saves the last heatmap itself at its own size:

    PYTHONPATH=. python docs/screenshots.py [--chromium /usr/bin/chromium] [--tasks 6] [--out FOLDER]

``--out`` writes the PNGs elsewhere, to compare them with the tracked ones before replacing those.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
#: TensorBoard's tabs as URL fragments: the heatmap alone, then the HParams table.
TABS = {
    "tensorboard_images.png": "#images",
    "tensorboard_hparams.png": "#hparams",
}


#: The runs photographed: MC-SGD's alpha0 on the digits.
ALPHA0 = (0.1, 0.25)


def fit(folder: Path, tasks: int, alpha0: float) -> Path:
    """A short MC-SGD run on the digits, logged to ``folder/lightning_logs/alpha0_<alpha0>``; returns that folder."""
    subprocess.run(
        [sys.executable, "-m", "cl_lightning", "fit", "--config", str(ROOT / "configs" / "mcsgd" / "permuted_digits.yaml"),
         "--data.num_tasks", str(tasks), "--trainer.callbacks.alpha0", str(alpha0),
         "--trainer.logger.init_args.save_dir", str(folder), "--trainer.logger.init_args.version", f"alpha0_{alpha0}",
         "--trainer.enable_progress_bar", "false", "--accuracy_matrix.print_table", "false"],
        check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return folder / "lightning_logs" / f"alpha0_{alpha0}"


def save_last_heatmap(run: Path, path: Path) -> None:
    """The last ``cl/accuracy_matrix`` image of a run's events, as the PNG TensorBoard was given."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    path.write_bytes(events.Images("cl/accuracy_matrix")[-1].encoded_image_string)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(logdir: Path, port: int) -> subprocess.Popen:
    """``tensorboard --logdir`` on ``port``, once it answers."""
    tensorboard = Path(sys.executable).with_name("tensorboard")
    server = subprocess.Popen([str(tensorboard), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError("tensorboard did not answer within 60 s")


def screenshot(chromium: str, url: str, path: Path, size: str = "1400,1000") -> None:
    """One headless Chromium screenshot; the virtual-time budget lets TensorBoard's app load its data."""
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size}", "--virtual-time-budget=20000", f"--screenshot={path}", url],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--tasks", type=int, default=6, help="tasks of the digits run")
    parser.add_argument("--out", type=Path, default=IMAGES,
                        help="folder for the PNGs (default: docs/images, the README's own, which this replaces)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        runs = [fit(Path(folder), args.tasks, alpha0) for alpha0 in ALPHA0]
        save_last_heatmap(runs[-1], args.out / "accuracy_matrix_heatmap.png")
        port = free_port()
        server = serve(Path(folder), port)
        try:
            for name, fragment in TABS.items():
                screenshot(args.chromium, f"http://127.0.0.1:{port}/{fragment}", args.out / name)
                print(f"written: {args.out / name}")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
