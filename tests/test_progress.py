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
