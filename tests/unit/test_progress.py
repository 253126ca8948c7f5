"""Progress off a terminal: a line at most every `every_s` seconds and always at the end, never a bar."""

from __future__ import annotations

from retro.training.progress import Progress


def test_lines_are_rate_limited_and_the_last_one_is_always_printed(capsys):
    progress = Progress(5, every_s=3600.0)
    for step in range(5):
        progress.update(loss=f"{step:.1f}")
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["retro.train: step 5/5 loss 4.0"]  # the first 4 fell inside the interval


def test_amounts_labels_and_units(capsys):
    progress = Progress(1000, prog="retro.select_layers", label="calibration", unit="tokens", every_s=0.0)
    progress.update(256)
    progress.update(744)
    assert capsys.readouterr().err.splitlines() == [
        "retro.select_layers: calibration 256/1000 tokens",
        "retro.select_layers: calibration 1000/1000 tokens",
    ]


def test_disabled_ranks_print_nothing(capsys):
    progress = Progress(2, enabled=False, every_s=0.0)
    progress.update()
    progress.update()
    assert capsys.readouterr().err == ""
