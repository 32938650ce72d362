import io
import logging
import sys

import torch

from fastvit_ssl.monitor import Monitor
from fastvit_ssl.progress import Progress, format_seconds


def test_lines_show_count_rate_eta_and_note_then_a_final_line(capsys):
    progress = Progress("features", 4, every_s=0.0)
    progress.update(2, note="loss 1.5")
    progress.every_s = 1e9  # from now on only the end prints
    progress.update(1)
    progress.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("features: 2/4 images | ") and " images/s | ETA " in lines[0]
    assert lines[0].endswith(" | loss 1.5")
    assert lines[1].startswith("features: 4/4 images | ") and lines[1].endswith("ETA 0m00s")


def test_short_work_stays_quiet_and_track_counts_items(capsys):
    progress = Progress("decoding", 3, unit="files")
    assert list(progress.track(iter("abc"))) == ["a", "b", "c"] and progress.done == 3
    assert capsys.readouterr().err == ""


def test_format_seconds():
    assert (format_seconds(59.9), format_seconds(61), format_seconds(3 * 3600 + 125)) == ("0m59s", "1m01s", "3h02m")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_training_shows_a_bar_on_a_terminal_and_clears_it_for_each_log_line(tmp_path, monkeypatch, caplog):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monitor = Monitor(tmp_path, total_steps=20, images_per_step=8, log_every=10)
    row = {"loss": torch.tensor(2.0), "lr": 0.1, "momentum": 0.99, "grad_norm": torch.tensor(1.0)}
    with caplog.at_level(logging.INFO):
        for step in range(1, 21):
            monitor.train_step(step, step / 10, row)
            monitor.bar.last = 0.0  # as if 0.2 s had passed: draw at every step
    out = terminal.getvalue()
    assert "\r[" in out and "step 9/20" in out and "ETA" in out and "img/s" in out
    assert out.count("\r\x1b[K") == 2  # cleared before each of the two log lines
    assert "step 10/20" in caplog.text and "step 10/20" not in out  # the log line is not drawn over


def test_no_bar_off_a_terminal(tmp_path):
    assert Monitor(tmp_path, total_steps=20, images_per_step=8, log_every=10).bar is None
