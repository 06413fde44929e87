"""``covidlib run --parallel``: independent notebooks side by side, same results as in order.

The scheduling tests run tiny kernel notebooks (no TensorFlow): jobs really overlap, a failing
job stops the run in the one line a sequential failure gives, and no kernel outlives the run.
The slow test runs the tiny pipeline twice, in order and with ``--parallel 2``, and compares
what it wrote.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import nbformat
import pytest

from covidlib import cli, runner


def _notebook(path: Path, *sources: str) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('DIR = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, *(nbformat.v4.new_code_cell(s) for s in sources)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def _wait_for(path: Path, timeout: float = 90.0) -> bool:
    t0 = time.monotonic()
    while not path.exists() and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
    return path.exists()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited already


def _children() -> set[int]:
    return {int(pid) for task in Path(f"/proc/{os.getpid()}/task").iterdir()
            for pid in (task / "children").read_text().split()}


CPU_SLOTS = [runner.Slot("CPU a", {}), runner.Slot("CPU b", {})]
# Each waits for the other's mark: they finish only when they run at the same time.
MEET = ("import pathlib, os\nd = pathlib.Path(DIR)\n(d / '{me}').write_text(str(os.getpid()))\n"
        "import time\nt0 = time.monotonic()\n"
        "while not (d / '{other}').exists():\n"
        "    assert time.monotonic() - t0 < 120, 'ran alone'\n    time.sleep(0.1)")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_jobs_run_side_by_side_with_one_line_each(tmp_path, capsys):
    steps = [(2, ("02_a", _notebook(tmp_path / "a.ipynb", MEET.format(me="a", other="b")),
                  {"DIR": str(tmp_path)})),
             (3, ("03_b", _notebook(tmp_path / "b.ipynb", MEET.format(me="b", other="a")),
                  {"DIR": str(tmp_path)}))]
    (tmp_path / "out").mkdir()
    before = _children()
    runner.run_side_by_side(steps, 4, CPU_SLOTS, tmp_path / "out")
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines[:2]) == ["[2/4] 02_a started on CPU a", "[3/4] 03_b started on CPU b"]
    assert sorted(re.sub(r"\d+:\d\d$", "m:ss", x) for x in lines[2:]) == [
        "[2/4] 02_a done in m:ss", "[3/4] 03_b done in m:ss"]
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "02_a.ipynb", "02_a.stderr.log", "03_b.ipynb", "03_b.stderr.log"}
    assert _children() <= before


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_a_failing_job_stops_the_others_in_one_line(tmp_path, capsys):
    slow = _notebook(tmp_path / "slow.ipynb", "import os, pathlib, time\n"
                     "pathlib.Path(DIR, 'pid').write_text(str(os.getpid()))\ntime.sleep(300)\n"
                     "pathlib.Path(DIR, 'slow_done').write_text('ran to its end')")
    bad = _notebook(tmp_path / "bad.ipynb", "import pathlib, time\n"
                    "while not pathlib.Path(DIR, 'pid').exists():\n    time.sleep(0.1)",
                    "raise ValueError('boom')")
    queued = _notebook(tmp_path / "queued.ipynb", "pathlib.Path(DIR, 'queued').write_text('ran')")
    params = {"DIR": str(tmp_path)}
    steps = [(2, ("02_slow", slow, params)), (3, ("03_train_bad", bad, params)),
             (4, ("03_train_queued", queued, params))]
    out = tmp_path / "out"
    out.mkdir()
    before = _children()
    with pytest.raises(runner.NotebookError) as info:
        runner.run_side_by_side(steps, 5, CPU_SLOTS, out)
    assert not (tmp_path / "slow_done").exists()  # the slow job was stopped, not run to its end
    assert str(info.value) == ("[3/5] 03_train_bad: cell 4 failed with ValueError: boom "
                               f"(executed notebook: {out / '03_train_bad.ipynb'})")
    with pytest.raises(runner.NotebookError) as in_order:  # the same line as a sequential run's
        runner._execute("[3/5] 03_train_bad", bad, out / "03_train_bad.ipynb", params,
                        progress=False, kernel_name=None, verbose=False, console=None)
    assert str(in_order.value) == str(info.value)
    assert "[2/5] 02_slow stopped" in capsys.readouterr().out
    kernel = int((tmp_path / "pid").read_text())
    t1 = time.monotonic()
    while _alive(kernel) and time.monotonic() - t1 < 10:
        time.sleep(0.2)
    assert not _alive(kernel), "the stopped job's kernel is still running"
    assert _children() <= before and not (tmp_path / "queued").exists()


def test_cli_refuses_a_bad_parallel_in_one_line(tmp_path, capsys, isolated_dirs):
    code = cli.main(["run", "--parallel", "0", "-p", "RUN_DIR", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err == "covidlib run: error: --parallel 0: expected an integer >= 1\n"
    assert not (tmp_path / "run").exists()


def test_without_threads_a_cpu_runs_in_order_exactly_as_before(tmp_path, monkeypatch, capsys,
                                                                isolated_dirs):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "detect_gpus", lambda: [])
    calls: list = []
    monkeypatch.setattr(runner, "_execute", lambda *a, **kw: calls.append((a, kw)))
    runner.run({"RUN_DIR": "run"}, progress=False)
    in_order, calls[:] = list(calls), []
    runner.run({"RUN_DIR": "run"}, progress=False, parallel=2)
    assert calls == in_order and len(calls) == 7
    assert all(kw["extra_env"] == {} for _, kw in calls)  # the libraries' own thread counts
    assert "one notebook at a time, each on all" in capsys.readouterr().out


def test_gpus_and_slots(monkeypatch):
    smi = ("GPU 0: NVIDIA H100 (UUID: GPU-aaa)\nGPU 1: NVIDIA A100 (UUID: GPU-bbb)\n"
           "  MIG 1g.10gb     Device  0: (UUID: MIG-ccc)\n"
           "  MIG 1g.10gb     Device  1: (UUID: MIG-ddd)\n")
    assert runner.parse_gpu_list(smi) == ["0", "MIG-ccc", "MIG-ddd"]
    for visible, ids in [("1,3", ["1", "3"]), ("", []), ("-1", []), ("0,-1,2", ["0"]),
                         ("GPU-aaa", ["GPU-aaa"])]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert runner.detect_gpus() == ids
    slots = runner.job_slots(4, None, gpus=["1", "3"])
    assert [(s.name, s.env, s.cpus) for s in slots] == [
        ("GPU 1", {"CUDA_VISIBLE_DEVICES": "1"}, None), ("GPU 3", {"CUDA_VISIBLE_DEVICES": "3"}, None)]
    # CPU: a job keeps the threads a sequential run gives it; cores / threads jobs at once.
    monkeypatch.setattr(runner, "_cores", lambda: [0, 1, 2, 3])
    assert [s.cpus for s in runner.job_slots(2, None, gpus=[])] == [None]
    two = runner.job_slots(4, 2, gpus=[])
    assert [s.cpus for s in two] == [(0, 1), (2, 3)]
    assert two[0].env == {"TF_NUM_INTRAOP_THREADS": "2", "TF_NUM_INTEROP_THREADS": "2",
                          "OMP_NUM_THREADS": "2"}


def test_schedule_and_shared_enhancement():
    default = runner.default_parameters("train")["ENHANCEMENT"]
    steps = runner.plan({"BACKBONES": ["SmallCNN", "MobileNetV2"],
                         "ABLATION_PIPELINES": ["none", "crop+clahe", default]})
    before, side, after = runner._split(steps)
    assert [s[0] for _, s in before] == ["01_download_data"]
    assert [i for i, _ in side] == [2, 3, 4, 5]  # 02, two CT and one X-ray training
    assert [s[0] for _, s in after] == ["04_two_phase_evaluation_voting"]
    # The default (CT) is enhanced by 02 and both CT trainings; crop+clahe by 02 alone.
    assert runner.shared_enhancements([s for _, s in side]) == [(default, "ct")]


# ----------------------------------------------------------------------------------------------
# The tiny pipeline, in order and side by side
# ----------------------------------------------------------------------------------------------

PIPELINE = {
    "SYNTHETIC_PATIENTS": 3, "IMG_SIZE": 32, "EPOCHS": 1, "BATCH_SIZE": 16,
    # Two trainings side by side (no ablation, no X-ray) keep the test within the suite's budget;
    # they share one enhancement folder, so the shared-folder path is exercised too.
    "BACKBONES": ["SmallCNN", "MobileNetV2"], "XRAY_DATASET": None, "RUN_ABLATION": False,
    "N_BOOT": 20, "GRADCAM_IMAGES": 0,
}


def _pipeline(tmp_path: Path, name: str, *flags: str) -> tuple[Path, str]:
    run_dir = tmp_path / name
    args = [x for k, v in {**PIPELINE, "RUN_DIR": str(run_dir)}.items()
            for x in ("-p", k, json.dumps(v) if not isinstance(v, str) else v)]
    code = cli.main(["run", "--quiet", "--threads", "1", *flags, *args])
    return run_dir, code


def _same_text(a: Path, b: Path, run_a: Path, run_b: Path) -> None:
    assert a.read_text().replace(str(run_a), "RUN") == b.read_text().replace(str(run_b), "RUN"), a.name


@pytest.mark.slow
@pytest.mark.skipif(len(runner._cores()) < 2, reason="two jobs of one thread need two cores")
def test_parallel_run_equals_the_sequential_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COVIDLIB_DATA", str(tmp_path / "data"))  # one synthetic data set for both
    monkeypatch.setenv("COVIDLIB_REPORTS", str(tmp_path / "reports"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the CPU path, on any machine
    seq, code = _pipeline(tmp_path, "sequential")
    assert code == 0, capsys.readouterr()
    capsys.readouterr()
    par, code = _pipeline(tmp_path, "parallel", "--parallel", "2")
    console = capsys.readouterr().out
    assert code == 0, console
    assert re.search(r"side by side: 2 notebooks \(02/03\), up to 2 at a time on CPU \d+, CPU \d+, "
                     r"1 thread each", console), console
    default = runner.default_parameters("train")["ENHANCEMENT"]
    assert f"shared enhancement {default} (ct) done" in console
    started = [line for line in console.splitlines() if " started on CPU " in line]
    assert len(started) == 2
    ev = [json.loads((d / "evaluation.json").read_text().replace(str(d), "RUN")) for d in (seq, par)]
    assert set(ev[0]["models"]) == {"SmallCNN", "MobileNetV2"} and ev[0]["ensemble"]
    for key in ("models", "ensemble", "two_phase"):  # the metrics blocks, exactly
        assert ev[0][key] == ev[1][key], key
    assert ev[0] == ev[1]  # and everything else (it holds no timings)
    for rel in ("models/SmallCNN/predictions_test.csv", "models/MobileNetV2/predictions_test.csv",
                "models/MobileNetV2/predictions_val.csv", "predictions_test_vote.csv"):
        _same_text(seq / rel, par / rel, seq, par)
