"""The ``bgnorm`` command line, end to end: the smoke preset as CI runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bgnorm.cli import main

TASKS = "batch-size,g-sweep,groups"


def _bgnorm(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bgnorm.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_smoke_preset_end_to_end(tmp_path):
    out = tmp_path / "smoke"
    run = _bgnorm("reproduce", "--task", TASKS, "--preset", "smoke", "--out", str(out))
    assert run.returncode == 0, run.stderr
    report = (out / "report.md").read_text()
    assert run.stdout.strip().endswith(report.strip()[-200:])  # summary printed at the end
    for heading in ("## Accuracy vs batch size", "## BGN's G at the largest",
                    "## GN's group division"):
        assert heading in report
    for png in ("batch-size.png", "g-sweep.png", "groups.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert report.count("### Claims checked") == 3
    lines = (out / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == len({r["cell_id"] for r in records})
    n_cells = len(records)
    listed = _bgnorm("reproduce", "--task", TASKS, "--preset", "smoke", "--out", str(out),
                     "--list")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == n_cells
    assert all(r["status"] in ("ok", "diverged") for r in records)
    assert {r["task"] for r in records} == set(TASKS.split(","))

    # Re-running the same command skips every finished cell and changes nothing.
    again = _bgnorm("reproduce", "--task", TASKS, "--preset", "smoke", "--out", str(out),
                    "--no-report")
    assert again.returncode == 0, again.stderr
    assert f"{n_cells} already recorded" in again.stderr
    assert (out / "results.jsonl").read_text().splitlines() == lines

    # `bgnorm report DIR` re-renders the same report from the store.
    (out / "report.md").unlink()
    rep = _bgnorm("report", str(out), "--quiet")
    assert rep.returncode == 0, rep.stderr
    assert (out / "report.md").read_text() == report


def test_cli_errors(tmp_path, capsys):
    assert main(["reproduce", "--task", "batch-size", "--preset", "huge", "--out",
                 str(tmp_path)]) == 2
    assert "unknown preset" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown task"):
        main(["reproduce", "--task", "nope", "--out", str(tmp_path)])
    assert main(["reproduce", "--preset", "paper", "--out", str(tmp_path), "--list"]) == 2
    assert "--data-root" in capsys.readouterr().err  # the paper preset needs your data
    assert main(["report", str(tmp_path / "empty")]) == 2
    with pytest.raises(SystemExit):
        main(["reproduce", "--out", str(tmp_path), "--shard", "3/2"])
    with pytest.raises(SystemExit):
        main(["reproduce", "--out", str(tmp_path), "--norms", "bn,nope"])


def test_list_and_tasks(capsys, tmp_path):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "batch-size" in out and "g-sweep" in out and "groups" in out
    assert main(["reproduce", "--task", "batch-size", "--preset", "quick", "--out",
                 str(tmp_path), "--list"]) == 0
    captured = capsys.readouterr()
    assert "25 cells" in captured.err  # 7 norms x 7 batch sizes, per-example norms run once
    assert main(["reproduce", "--task", "g-sweep", "--preset", "paper", "--data-root",
                 str(tmp_path), "--out", str(tmp_path), "--shard", "1/4", "--list"]) == 0
    assert "5 cells" in capsys.readouterr().err  # 20 cells in 4 shards


@pytest.mark.parametrize("option", ["--epochs=0", "--epochs=-1", "--image-size=0",
                                    "--loader-workers=-1", "--seeds=0,-1", "--seeds=x",
                                    "--checkpoint-every=nan", "--checkpoint-every=-5",
                                    "--dist-timeout=0"])
def test_numeric_options_are_validated(tmp_path, capsys, option):
    # --epochs 0 trained nothing and the report judged claims on the untrained cells.
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--preset", "smoke", "--out", str(tmp_path), "--list", option])
    assert exc.value.code == 2
    assert f"argument {option.split('=')[0]}: " in capsys.readouterr().err
