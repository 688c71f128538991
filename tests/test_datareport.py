"""The data report reaches the pipeline's MLflow run, and its chart holds many classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from bit_core.config import DataConfig
from bit_core.plots import plot_class_counts
from tasks import tracking
from tasks.prepare import prepare


def _report(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    for c, name in enumerate(["cat", "dog"]):
        (raw / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (6, 5), (i * 40, c * 90, 0)).save(raw / name / f"{i}.png")
    report = tmp_path / "reports" / "data"
    prepare(DataConfig(val_fraction=0.2, test_fraction=0.2), raw, tmp_path / "prepared", report)
    (report / ".gitignore").write_text("/classes.png\n")  # as DVC writes it
    return report


def test_the_finetune_run_carries_the_data_report(tmp_path, tracking_store, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("RANK", raising=False)
    report, finetuned = _report(tmp_path), tmp_path / "finetuned"
    finetuned.mkdir()
    run_id = tracking.start_run("data-report-test")
    tracking.write_run_file(finetuned, run_id)
    import mlflow

    mlflow.end_run()

    monkeypatch.setenv("RANK", "1")  # a second training process logs nothing
    tracking.log_data_report(finetuned, report)
    client = MlflowClient()
    assert client.list_artifacts(run_id) == [] and client.get_run(run_id).data.metrics == {}

    monkeypatch.setenv("RANK", "0")
    tracking.log_data_report(finetuned, report)

    run = client.get_run(run_id)
    assert run.data.metrics["data.images_train"] == 6 and run.data.metrics["data.classes"] == 2
    assert run.data.metrics["data.test_in_train"] == 0
    assert sorted(a.path for a in client.list_artifacts(run_id, "data")) == [
        f"data/{name}" for name in ("classes.csv", "classes.png", "duplicates.csv",
                                    "metrics.json", "report.md", "sizes.csv", "unreadable.csv")]
    assert run.info.status == "FINISHED"


def test_many_classes_are_drawn_sorted_and_unnamed(tmp_path):
    rng = np.random.default_rng(0)
    counts = {"train": rng.integers(700, 1300, 120), "val": rng.integers(10, 30, 120),
              "test": np.full(120, 50)}
    path = plot_class_counts([f"n{i:08d}" for i in range(120)], counts, tmp_path / "c.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (880, 440)


def test_duplicates_are_exact_even_when_size_and_head_match(tmp_path):
    """BMP rows are stored bottom-up: a different top row changes only the file's last bytes,
    so these two images share their size and first 16 KiB but are not duplicates."""
    raw = tmp_path / "raw"
    for name in ("cat", "dog"):
        (raw / name).mkdir(parents=True)
    image = Image.new("RGB", (100, 100), (10, 20, 30))
    image.save(raw / "cat" / "a.bmp")
    image.save(raw / "dog" / "copy.bmp")
    image.putpixel((0, 0), (255, 0, 0))
    image.save(raw / "cat" / "b.bmp")
    image.putpixel((0, 0), (0, 255, 0))
    image.save(raw / "dog" / "c.bmp")
    assert (raw / "cat/a.bmp").read_bytes()[:16384] == (raw / "cat/b.bmp").read_bytes()[:16384]
    report = tmp_path / "report"

    prepare(DataConfig(val_fraction=0.0, test_fraction=0.5), raw, tmp_path / "out", report)

    rows = (report / "duplicates.csv").read_text().splitlines()[1:]
    assert sorted(row.split(",")[2] for row in rows) == ["cat/a.bmp", "dog/copy.bmp"]
