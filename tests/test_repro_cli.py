"""The ``bgnorm`` command line, end to end: the smoke preset as CI runs it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import bgnorm
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
    assert main(["reproduce", "--task", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown task(s) nope; valid tasks: batch-size" in capsys.readouterr().err
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
    # 7 norms x 4 batch sizes, the per-example norms run once, 2 seeds
    assert "32 cells" in captured.err
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


# --------------------------------------------------------------------------------------------
# Environment problems: one message before any cell starts, exit status 2
# --------------------------------------------------------------------------------------------

TINY = ["reproduce", "--task", "batch-size", "--preset", "smoke", "--norms", "bn",
        "--batch-sizes", "8", "--no-progress", "--jobs", "1"]


def _one_message(err):
    assert "Traceback" not in err and "FAILED" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bgnorm: "), err
    return lines[0]


@pytest.mark.parametrize("layout", ["missing", "malformed"])
def test_bad_dataset_directory_is_one_message_before_any_cell(tmp_path, capsys, layout):
    # Before: every cell failed with its own traceback (exit status 1).
    root = tmp_path / "cifar"
    if layout == "malformed":
        (root / "cifar-10-batches-py").mkdir(parents=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            (root / "cifar-10-batches-py" / name).write_bytes(b"\x80\x04 not a pickle")
    out = tmp_path / "run"
    assert main([*TINY, "--dataset", "cifar10", "--data-root", str(root), "--out",
                 str(out)]) == 2
    line = _one_message(capsys.readouterr().err)
    assert "cannot read their data" in line
    assert ("does not exist" if layout == "missing" else "data_batch_1 is not a CIFAR-10") in line
    assert not (out / "results.jsonl").exists() and not (out / "cells").exists()


def test_fashion_mnist_not_installed_is_one_message(tmp_path, capsys, monkeypatch):
    from bgnorm.repro import data

    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "not-installed")
    out = tmp_path / "run"
    assert main([*TINY, "--dataset", "fashion-mnist", "--out", str(out)]) == 2
    line = _one_message(capsys.readouterr().err)
    assert "Fashion-MNIST is not installed" in line
    assert "apt-get install dataset-fashion-mnist" in line and "--data-root FOLDER" in line
    assert main([*TINY, "--dataset", "fashion-mnist", "--data-root", str(tmp_path),
                 "--out", str(out)]) == 2
    assert "train-images-idx3-ubyte(.gz)" in _one_message(capsys.readouterr().err)
    assert not (out / "results.jsonl").exists() and not (out / "cells").exists()


def test_missing_repro_extra_is_one_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert main([*TINY, "--out", str(tmp_path)]) == 2
    line = _one_message(capsys.readouterr().err)
    assert "scikit-learn, tqdm are not installed" in line
    assert "pip install 'bgnorm[repro]'" in line


def test_unavailable_device_is_one_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*TINY, "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in _one_message(capsys.readouterr().err)
    assert main([*TINY, "--device", "gpu", "--out", str(tmp_path)]) == 2
    assert "not a device name torch knows" in _one_message(capsys.readouterr().err)


def test_batch_size_zero_is_refused(tmp_path, capsys):
    # Before: a ZeroDivisionError traceback while planning the cells.
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--batch-sizes", "8,0", "--out", str(tmp_path), "--list"])
    assert exc.value.code == 2
    assert "argument --batch-sizes: every value must be >= 1" in capsys.readouterr().err


def test_ctrl_c_prints_the_resume_hint_and_exits_130(tmp_path, capsys, monkeypatch):
    import bgnorm.repro.runner as runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_execute", interrupted)
    try:
        status = main([*TINY, "--out", str(tmp_path)])
    except KeyboardInterrupt:  # before: the hint, then a KeyboardInterrupt traceback
        pytest.fail("KeyboardInterrupt escaped bgnorm's main()")
    assert status == 130
    err = capsys.readouterr().err
    assert "run the same command again to resume" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# Every option is applied by a selected task or refused (exit status 2)
# --------------------------------------------------------------------------------------------

LIST = ["reproduce", "--preset", "smoke", "--list"]


def test_presets_docstring_examples():
    import doctest

    import bgnorm.repro.presets as P

    result = doctest.testmod(P, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_full_preset_plans_every_classification_cell(tmp_path, capsys):
    from bgnorm.repro.presets import PAPER_BATCH_SIZES, PAPER_G_SWEEP, classify_preset
    from bgnorm.repro.runner import plan_cells

    full = classify_preset("full")
    assert (full["seeds"], full["batch_sizes"], full["g_sweep"]) == (
        [0, 1, 2], PAPER_BATCH_SIZES, PAPER_G_SWEEP)
    assert full["schedule"] == "cosine"
    plan = [c for _, c in plan_cells(["batch-size", "g-sweep", "groups"], "full", {})]
    count = {t: sum(c["task"] == t for c in plan) for t in ("batch-size", "g-sweep", "groups")}
    # per seed: BN, GBGN, BGN at 7 sizes + IN, LN, GN, PN twice (64 examples per step for
    # b <= 64, 128 for the one worker of 128); 10 G x {128, 2}; GN at 7 group counts and 7
    # widths + BN, none
    assert count == {"batch-size": 3 * (3 * 7 + 4 * 2), "g-sweep": 3 * 10 * 2,
                     "groups": 3 * (7 + 7 + 2)}
    assert {(c["epochs"], c["schedule"]) for c in plan} == {(full["epochs"], "cosine")}
    # the quick preset's 3x cells (--epochs 3x) are full's cells: same ids, so the quick 3x
    # check and the full run share one store
    quick = classify_preset("quick")
    assert full["epochs"] == 3 * quick["epochs"]
    full_ids = {cid for cid, _ in plan_cells(["batch-size", "g-sweep", "groups"], "full", {})}
    quick_3x = plan_cells(["batch-size", "g-sweep"], "quick", {"epochs": full["epochs"]})
    # (full sweeps G at batch 128 and 2, quick at 64 and 2)
    shared = [cid for cid, c in quick_3x if c["norm"] in ("bn", "bgn", "gbgn")
              and (c["task"] == "batch-size" or c["batch_size"] == 2)]
    assert len(shared) == 2 * (3 * 4 + 4) and set(shared) <= full_ids
    # the CLI accepts it; `--task all` selects the tasks that have it, the others refuse it
    assert main(["reproduce", "--preset", "full", "--task", "batch-size,g-sweep,groups",
                 "--list", "--out", str(tmp_path)]) == 0
    assert main(["reproduce", "--preset", "full", "--task", "all", "--list", "--out",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "groups " in out and "adversarial" not in out
    assert main(["reproduce", "--preset", "full", "--task", "nas", "--list", "--out",
                 str(tmp_path)]) == 2
    assert "task 'nas' has no preset 'full'" in capsys.readouterr().err


def test_unknown_set_key_lists_the_valid_keys(tmp_path, capsys):
    # Before: --set epochz=3 (a typo) was silently ignored and the sweep ran 2 epochs.
    assert main([*LIST, "--out", str(tmp_path), "--set", "epochz=3"]) == 2
    err = capsys.readouterr().err
    assert "--set epochz: unknown key for the batch-size task; valid keys: " in err
    assert " epochs, " in err and "total_batch" in err
    assert main([*LIST, "--task", "adversarial", "--out", str(tmp_path), "--set",
                 "epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "--set epochs: unknown key for the adversarial task" in err and " steps, " in err


@pytest.mark.parametrize("setting,message", [
    ("epochs=0", "--set epochs=0: must be >= 1"),
    ("epochs=2.5", "--set epochs=2.5: expected an integer"),
    ("norms=bn", "--set norms=bn: expected a JSON list"),
    ("batch_sizes=[8,0]", "--set batch_sizes=[8, 0]: must be >= 1"),
    ("hflip=1", "--set hflip=1: expected true/false"),
    ("model_kwargs=3", "--set model_kwargs=3: expected a JSON object"),
    ("amp=bf15", "--set amp=bf15: expected one of null, \"none\", \"fp32\", \"bf16\""),
    ("schedule=linear", "--set schedule=linear: expected one of \"step\", \"cosine\""),
])
def test_set_values_are_checked(tmp_path, capsys, setting, message):
    assert main([*LIST, "--out", str(tmp_path), "--set", setting]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("setting", ["warmup_epochs=0.5", "base_lr=1", "milestones=[30,60,90]",
                                     "image_size=null", "amp=\"bf16\"", "total_batch=32",
                                     "schedule=cosine", "schedule=step"])
def test_set_values_of_the_presets_kinds_pass(tmp_path, capsys, setting):
    assert main([*LIST, "--out", str(tmp_path), "--set", setting]) == 0, \
        capsys.readouterr().err


@pytest.mark.parametrize("task,option", [
    ("batch-size", "--groups=4"),  # before: silently ignored (the G sweep is g-sweep's)
    ("groups", "--batch-sizes=8"),
    ("g-sweep", "--norms=bn"),
    ("adversarial", "--epochs=3"),  # before: task_preset dropped these for Tables 3-7
    ("few-shot", "--model=resnet18"),
    ("nas", "--amp=bf16"),
    ("nas", "--batch-sizes=8"),
    ("domain-adaptation", "--dataset=digits"),
    ("adversarial", "--loader-workers=2"),
])
def test_options_no_selected_task_applies_are_refused(tmp_path, capsys, task, option):
    assert main([*LIST, "--task", task, "--out", str(tmp_path), option]) == 2
    err = capsys.readouterr().err
    flag = option.split("=")[0]
    assert f"bgnorm: {flag} is not used by the {task} task (tasks that use it: " in err
    assert "--set KEY=VALUE" in err


def test_option_applied_by_one_of_the_tasks_is_a_note(tmp_path, capsys):
    assert main([*LIST, "--task", "batch-size,g-sweep", "--groups", "4", "--out",
                 str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "bgnorm: note: --groups applies to g-sweep; batch-size does not use it" in captured.err
    assert "G=4" in captured.out


@pytest.mark.parametrize("option", ["--groups=0", "--groups=4,-2", "--jobs=0", "--threads=0",
                                    "--seeds=,", "--batch-sizes=,", "--norms=,"])
def test_counts_below_one_and_empty_lists_are_refused(tmp_path, capsys, option):
    # Before: --groups 0 became the paper's G, --jobs 0 and --threads 0 were accepted.
    with pytest.raises(SystemExit) as exc:
        main([*LIST, "--task", "g-sweep", "--out", str(tmp_path), option])
    assert exc.value.code == 2
    assert f"argument {option.split('=')[0]}: " in capsys.readouterr().err


@pytest.mark.parametrize("spec", [",", " , ", ""])
def test_task_list_naming_no_task_is_refused(tmp_path, capsys, spec):
    # Before: --task , ran nothing and exited 0.
    assert main(["reproduce", "--preset", "smoke", "--task", spec, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "names no task; valid tasks: batch-size, g-sweep" in err


def test_unused_data_root_sync_norm_jobs_and_unknown_model_are_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main([*TINY, "--out", out, "--data-root", str(tmp_path)]) == 2
    assert "--data-root is not used: every cell to run trains on bundled digits" in \
        _one_message(capsys.readouterr().err)
    assert main([*TINY, "--out", out, "--sync-norm"]) == 2
    assert "--sync-norm synchronizes statistics across the processes" in \
        _one_message(capsys.readouterr().err)
    assert main([*TINY, "--out", out, "--distributed"]) == 2  # TINY has --jobs 1
    assert "--jobs: a distributed run trains one cell at a time" in \
        _one_message(capsys.readouterr().err)
    assert main([*TINY, "--out", out, "--model", "resnet19", "--list"]) == 2
    assert "unknown model 'resnet19'; valid models: " in _one_message(capsys.readouterr().err)


def test_tasks_settings_lists_options_and_keys(capsys):
    assert main(["tasks", "--settings"]) == 0
    out = capsys.readouterr().out
    block = out.split("adversarial")[1].split("few-shot")[0]
    assert "options: --dataset, --data-root, --image-size, --seeds, --norms" in block
    assert "--epochs" not in block and " steps," in block


# --------------------------------------------------------------------------------------------
# Help texts and guides: nothing a pip-installed user lacks
# --------------------------------------------------------------------------------------------

HELP_COMMANDS = [[], ["reproduce"], ["report"], ["tasks"], ["docs"]]


def _help(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def _guides_named(text):
    return set(re.findall(r"`?bgnorm docs ([a-z][\w-]*)", text))


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "bgnorm")
def test_help_names_no_file_missing_from_the_installed_package(capsys, command):
    # Before: `bgnorm --help` pointed at docs/reproduction.md, a file of the source tree only.
    text = _help(capsys, command)
    files = [f for f in re.findall(r"[\w./-]+\.(?:md|rst|txt|html|pdf)\b", text)
             if not f.startswith("DIR/")]  # DIR/report.md: what the run writes
    assert files == [] and "http" not in text and "docs/" not in text
    installed = Path(bgnorm.__file__).parent / "docs"
    for name in _guides_named(text):
        assert (installed / f"{name}.md").is_file(), name


def test_help_is_a_self_contained_summary(capsys):
    text = _help(capsys, [])
    for needed in ("smoke", "quick", "full", "paper", "DIR/report.md", "DIR/results*.jsonl",
                   "bgnorm docs reproduction", "bgnorm tasks --settings"):
        assert needed in text
    from bgnorm.repro.tasks import TASKS

    assert all(name in text for name in TASKS)  # the tasks come from the registry


def test_docs_command_lists_and_prints_the_installed_guides(capsys):
    assert main(["docs"]) == 0
    out = capsys.readouterr().out
    folder = Path(bgnorm.__file__).parent / "docs"
    assert str(folder.resolve()) in out or str(folder) in out
    for guide in ("reproduction", "tasks", "distributed", "errors"):
        assert re.search(rf"^  {guide} +\S", out, re.M), guide
    assert main(["docs", "reproduction"]) == 0
    assert capsys.readouterr().out == (folder / "reproduction.md").read_text(encoding="utf-8")
    assert main(["docs", "nope"]) == 2
    assert "no guide 'nope'; guides: " in capsys.readouterr().err


def test_the_wheel_ships_every_guide_the_help_names(tmp_path, capsys):
    # What a pip-installed user gets: build the wheel from a copy of the project.
    pytest.importorskip("setuptools")
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "project"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(root / "src", src / "src", symlinks=True, ignore=ignore)
    shutil.copytree(root / "docs", src / "docs", ignore=ignore)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps",
                            "--no-build-isolation", "--no-index", "-q", "-w", str(tmp_path)],
                           cwd=src, capture_output=True, text=True, timeout=300)
    if build.returncode != 0 and "No module named pip" in build.stderr:
        pytest.skip("pip is not installed")
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("bgnorm-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("bgnorm/docs/")}
    assert {f"bgnorm/docs/{p.name}" for p in (root / "docs").glob("*.md")} <= shipped
    named = set().union(*(_guides_named(_help(capsys, c)) for c in HELP_COMMANDS))
    assert named and {f"bgnorm/docs/{n}.md" for n in named} <= shipped
