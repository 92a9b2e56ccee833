"""Metrics go to CSV (and TensorBoard when installed) and read back; plots are real PNGs of that data."""

import os

import pytest

from theseus_general.errors import TheseusError
from theseus_general.metrics import MetricsLogger, read_metrics, tensorboard_available
from theseus_general.plots import plot_accuracy_vs_speedup, plot_comparison, plot_curriculum

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def log_run(directory, steps, start=0):
    with MetricsLogger(str(directory), tensorboard=False) as log:
        for step in range(start, steps):
            log.log(step, loss=1.0 / (step + 1), replacement_rate=min(1.0, 0.3 + 0.1 * step),
                    dev_accuracy=0.5 + step / 100 if step % 5 == 4 else None)


def test_csv_round_trip_and_resume_appends(tmp_path):
    log_run(tmp_path, 6)
    log_run(tmp_path, 10, start=4)  # a resumed run repeats steps 4 and 5, then goes on
    series = read_metrics(str(tmp_path))
    assert [s for s, _ in series["loss"]] == list(range(10))
    assert series["loss"][3] == (3, 0.25)
    assert series["replacement_rate"][-1] == (9, 1.0)
    assert series["dev_accuracy"] == [(4, 0.54), (9, 0.59)]  # None values were not written
    with open(tmp_path / "metrics.csv") as f:
        assert f.readline().strip() == "step,name,value" and "step,name,value" not in f.read()


def test_read_metrics_errors_name_the_file(tmp_path):
    with pytest.raises(TheseusError, match="No metrics file"):
        read_metrics(str(tmp_path / "nowhere"))
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(TheseusError, match="not a metrics file"):
        read_metrics(str(tmp_path / "other.csv"))


@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard not installed")
def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(str(tmp_path)) as log:
        for step in range(3):
            log.log(step, loss=2.0 - step, replacement_rate=0.5)
        tb_dir = log.tensorboard_dir
    events = EventAccumulator(tb_dir)
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(0, 2.0), (1, 1.0), (2, 0.0)]


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(str(tmp_path / "rank1"), enabled=False)
    log.log(0, loss=1.0)
    log.close()
    assert not os.path.exists(tmp_path / "rank1")


def read_png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    log_run(tmp_path, 30)
    width, height = read_png_size(plot_curriculum(str(tmp_path), str(tmp_path / "curriculum.png")))
    assert (width, height) == (7 * 120, int(3.6 * 120))
    rows = [{"name": "predecessor", "accuracy": 0.83, "speedup": 1.0},
            {"name": "Theseus", "accuracy": 0.82, "speedup": 1.98},
            {"name": "fine-tune only", "accuracy": 0.81, "speedup": None}]
    assert read_png_size(plot_comparison(rows, str(tmp_path / "cmp.png")))[0] == 8 * 120
    points = [{"task": t, "method": m, "speedup": s, "accuracy": a, "accuracy_std": 0.01}
              for t in ("text 6->3", "vit 8->4") for m, s, a in (("theseus", 2.0, 0.8), ("kd", 2.0, 0.79))]
    # 3.8 inches per panel, at least 9 (room for the title and a legend of three columns)
    assert read_png_size(plot_accuracy_vs_speedup(points, str(tmp_path / "avs.png")))[0] == int(9 * 120)
    assert read_png_size(plot_accuracy_vs_speedup(points * 2 + [dict(p, task="resnet") for p in points],
                                                  str(tmp_path / "avs3.png")))[0] == round(3 * 3.8 * 120)


def test_plot_curriculum_names_missing_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    with MetricsLogger(str(tmp_path), tensorboard=False) as log:
        log.log(0, loss=1.0)
    with pytest.raises(TheseusError, match=r"needs the metrics \['replacement_rate'\]"):
        plot_curriculum(str(tmp_path), str(tmp_path / "x.png"))
