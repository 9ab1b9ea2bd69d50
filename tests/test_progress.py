"""Long work is never silent: off a terminal, periodic plain lines with the stage, percent and ETA."""

from __future__ import annotations

import subprocess
import sys

from secateur import progress, settings


def test_modes(monkeypatch):
    monkeypatch.setenv("SECATEUR_PROGRESS", "0")
    assert settings.progress_mode() == "off"
    monkeypatch.setenv("SECATEUR_PROGRESS", "1")
    assert settings.progress_mode() == "bar"
    monkeypatch.delenv("SECATEUR_PROGRESS")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert settings.progress_mode() == "lines"


def test_a_loop_off_a_terminal_prints_lines_with_percent_and_eta_then_done(monkeypatch, capsys):
    monkeypatch.delenv("SECATEUR_PROGRESS", raising=False)
    monkeypatch.setenv("SECATEUR_PROGRESS_EVERY", "0")  # every step, for the test
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert list(progress.track(range(4), "calibrating block")) == [0, 1, 2, 3]
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("calibrating block: 25% (1/4) elapsed 0m00s, ETA 0m0")
    assert lines[-1].startswith("calibrating block: 100% (4/4)") and lines[-1].endswith("— done")
    with progress.Bar(10, "training", completed=2) as bar:
        bar.update(5, loss=0.41)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("training: 50% (5/10)") and "loss 0.41" in lines[0] and lines[-1].endswith("— done")


def test_short_loops_stay_silent_and_zero_turns_it_off(monkeypatch, capsys):
    monkeypatch.delenv("SECATEUR_PROGRESS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    list(progress.track(range(100), "quick"))  # well under 30 s: nothing to say
    monkeypatch.setenv("SECATEUR_PROGRESS", "0")
    monkeypatch.setenv("SECATEUR_PROGRESS_EVERY", "0")
    list(progress.track(range(3), "off"))
    assert capsys.readouterr().err == ""


def test_a_real_command_into_a_log_reports_progress(tmp_path):
    """The demo printed nothing for its whole run into a log: a loop run with stderr to a file says how far it is."""
    code = ("import time; from secateur.progress import track\n"
            "for _ in track(range(3), 'scoring'): time.sleep(0.05)\n")
    env = {**__import__("os").environ, "SECATEUR_PROGRESS_EVERY": "0.01"}
    env.pop("SECATEUR_PROGRESS", None)
    with open(tmp_path / "log", "w") as log:
        subprocess.run([sys.executable, "-c", code], stderr=log, env=env, check=True)
    text = (tmp_path / "log").read_text()
    assert "scoring: 33% (1/3)" in text and "ETA" in text and "— done" in text
