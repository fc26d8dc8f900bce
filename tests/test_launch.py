"""The stage launcher (``rlhf_tasks.pipeline.launch``): what every Airflow task calls.

``run_stage`` always runs ``python -m rlhf_tasks <stage>``; to control the child, the
tests swap ``launch_argv`` for a small ``python -c`` script. Signal handlers are only
installed in the main thread of the parent, so the SIGTERM tests run ``run_stage`` in a
subprocess of their own and signal that process, as Airflow signals a task.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlhf_tasks.pipeline import launch
from rlhf_tasks.pipeline.launch import StageFailed, launch_argv, run_stage
from tests.conftest import REPO, load_dag_module

REAL_LAUNCH_ARGV = launch.launch_argv


def use_child(monkeypatch, script: str, *extra: str) -> list[tuple]:
    """Make ``run_stage`` start ``python -c script extra...``; returns the recorded
    ``launch_argv`` calls so tests can check what the real command line would be."""
    calls: list[tuple] = []

    def fake_launch_argv(stage, args, *rest, **kw):
        calls.append((stage, list(args), rest, kw))
        return [sys.executable, "-c", textwrap.dedent(script), *extra]

    monkeypatch.setattr(launch, "launch_argv", fake_launch_argv)
    return calls


# --- the command line ---------------------------------------------------------------


def test_single_process_runs_python_module():
    """One GPU (or CPU) on one node: plain, unbuffered ``python -m rlhf_tasks``
    with the same interpreter as the caller (the worker's venv)."""
    argv = launch_argv("sft", ["--output", "/runs/x"])
    assert argv == [sys.executable, "-u", "-m", "rlhf_tasks", "sft", "--output", "/runs/x"]


def test_several_gpus_use_the_deepspeed_launcher():
    """More than one process: the ``deepspeed`` launcher in module mode, with the
    hostfile and node count only for several nodes."""
    argv = launch_argv("ppo", ["--output", "/r"], num_gpus=4, master_port=29511)
    assert argv == ["deepspeed", "--num_gpus", "4", "--master_port", "29511", "--no_local_rank", "--module",
                    "rlhf_tasks", "ppo", "--output", "/r"]
    argv = launch_argv("sft", [], num_gpus=8, num_nodes=2, hostfile="/etc/hostfile")
    assert argv[:7] == ["deepspeed", "--hostfile", "/etc/hostfile", "--num_nodes", "2", "--num_gpus", "8"]
    assert argv[-3:] == ["--module", "rlhf_tasks", "sft"]


def test_run_stage_passes_only_the_run_directory(monkeypatch, tmp_path):
    """``run_stage`` gives the stage ``--output DIR``: the settings travel in the run's
    config.yaml, not on the command line; with no config.yaml yet it is one process."""
    calls = use_child(monkeypatch, 'print("RLHF_RESULT {}")')
    run_stage("rm", tmp_path, echo=lambda _line: None)
    (stage, args, rest, _kw), = calls
    assert stage == "rm"
    assert args == ["--output", str(tmp_path)]
    assert rest[:3] == (1, 1, None)  # num_gpus, num_nodes, hostfile


# --- resources from the run's resolved config -------------------------------------------


def planned_argv(monkeypatch, stage: str, run_dir: Path, visible: str | None = None) -> list[str]:
    """The real command line ``run_stage`` would start for ``stage`` on ``run_dir``
    (computed by the real ``launch_argv``; a stub child runs instead)."""
    real = REAL_LAUNCH_ARGV
    seen: list[list[str]] = []

    def record(*a, **k):
        seen.append(real(*a, **k))
        return [sys.executable, "-c", 'print("RLHF_RESULT {}")']

    monkeypatch.setattr(launch, "launch_argv", record)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    run_stage(stage, run_dir, echo=lambda _line: None)
    return seen[-1]


def resolved_run(tmp_path: Path, *overrides: str, preset: str = "opt-1.3b") -> Path:
    """A run directory whose config.yaml is what ``prepare`` writes for these overrides."""
    from rlhf_tasks.config import PipelineConfig

    run = tmp_path / "run"
    PipelineConfig.load(preset, list(overrides)).save(run / "config.yaml")
    return run


def test_one_gpu_run_is_plain_python(monkeypatch, tmp_path):
    run = resolved_run(tmp_path)
    assert planned_argv(monkeypatch, "sft", run) == [sys.executable, "-u", "-m", "rlhf_tasks", "sft",
                                                     "--output", str(run)]


def test_num_gpus_override_reaches_the_launcher(monkeypatch, tmp_path):
    """``overrides: ["resources.num_gpus=4"]`` (or the form's field of that name) starts 4
    processes, not just a higher price; on a port of their own (two stages side by side on
    one worker would both take DeepSpeed's default 29500)."""
    run = resolved_run(tmp_path, "resources.num_gpus=4")
    argv = planned_argv(monkeypatch, "ppo", run)
    assert argv[:3] == ["deepspeed", "--num_gpus", "4"] and argv[3] == "--master_port" and int(argv[4]) > 0
    assert argv[5:] == ["--no_local_rank", "--module", "rlhf_tasks", "ppo", "--output", str(run)]


def form_run(monkeypatch, tmp_path: Path, preset: str, field: str, value) -> Path:
    """A run directory whose config the DAG's trigger form made from ``field=value``."""
    from rlhf_tasks.config import PipelineConfig

    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    module = load_dag_module("dag_for_form")
    run = tmp_path / "run"
    PipelineConfig.load(preset, module.form_values({field: value, "overrides": []})).save(run / "config.yaml")
    return run


def test_form_num_gpus_is_the_config_field(monkeypatch, tmp_path):
    run = form_run(monkeypatch, tmp_path, "opt-1.3b", "resources.num_gpus", 2)
    assert planned_argv(monkeypatch, "sft", run)[:3] == ["deepspeed", "--num_gpus", "2"]


def test_worker_visible_devices_are_kept(monkeypatch, tmp_path):
    """A GPU worker that claimed GPUs 2,3 (CUDA_VISIBLE_DEVICES) starts its ranks on
    those, not on GPUs 0,1; asking for more than it sees is refused."""
    run = resolved_run(tmp_path, "resources.num_gpus=2")
    argv = planned_argv(monkeypatch, "rm", run, visible="2,3")
    assert argv[:3] == ["deepspeed", "--include", "localhost:2,3"]
    run4 = resolved_run(tmp_path / "b", "resources.num_gpus=4")
    with pytest.raises(launch.ResourceError, match="resources.num_gpus=4 but this worker sees 2 GPU"):
        planned_argv(monkeypatch, "rm", run4, visible="2,3")


def test_hostfile_and_nodes_reach_the_launcher(monkeypatch, tmp_path):
    """docs/production.md's multi-node recipe: 2 nodes x 8 GPUs from the hostfile."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# the cluster\ngpu-node-1 slots=8\ngpu-node-2 slots=8\n\n")
    run = resolved_run(tmp_path, "resources.num_gpus=8", "resources.num_nodes=2", f"resources.hostfile={hostfile}")
    argv = planned_argv(monkeypatch, "sft", run, visible="0")  # the hostfile wins over local devices
    assert argv == ["deepspeed", "--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "8",
                    "--no_local_rank", "--module", "rlhf_tasks", "sft", "--output", str(run)]


@pytest.mark.parametrize("stage", ["prepare", "register"])
def test_single_process_stages_ignore_the_gpu_count(monkeypatch, tmp_path, stage):
    run = resolved_run(tmp_path, "resources.num_gpus=4")
    assert planned_argv(monkeypatch, stage, run)[:4] == [sys.executable, "-u", "-m", "rlhf_tasks"]


def test_cpu_run_is_one_process_whatever_it_prices(monkeypatch, tmp_path):
    run = resolved_run(tmp_path, "resources.num_gpus=4", preset="tiny-cpu")
    assert planned_argv(monkeypatch, "sft", run)[:4] == [sys.executable, "-u", "-m", "rlhf_tasks"]


@pytest.mark.parametrize("hostfile_text, nodes, gpus, message", [
    (None, 2, 8, "no such file"),
    ("gpu-node-1 slots=8\n", 2, 8, "resources.num_nodes=2 but"),
    ("gpu-node-1 slots=8\ngpu-node-2 slots=4\n", 2, 8, "fewer slots: {'gpu-node-2': 4}"),
    ("gpu-node-1 8\n", 1, 8, "is not 'hostname slots=N'"),
    ("a slots=8\na slots=8\n", 2, 8, "listed twice"),
    ("# nothing\n", 1, 1, "no 'hostname slots=N' line"),
])
def test_bad_hostfile_is_refused_with_the_file_named(monkeypatch, tmp_path, hostfile_text, nodes, gpus, message):
    hostfile = tmp_path / "hostfile"
    if hostfile_text is not None:
        hostfile.write_text(hostfile_text)
    run = resolved_run(tmp_path, f"resources.num_gpus={gpus}", f"resources.num_nodes={nodes}", f"resources.hostfile={hostfile}")
    with pytest.raises(launch.ResourceError) as e:
        planned_argv(monkeypatch, "ppo", run)
    assert message in str(e.value) and str(hostfile) in str(e.value)


# --- streaming and the result line ------------------------------------------------------


def test_every_line_is_echoed_and_the_result_line_is_parsed(monkeypatch, tmp_path):
    """Each child line (stdout and stderr alike) reaches ``echo`` in order, as the task
    log needs; the ``RLHF_RESULT`` line is returned parsed and is not echoed."""
    use_child(monkeypatch, """
        import sys
        print("loading model")
        print("warning on stderr", file=sys.stderr, flush=True)
        print("step 1 loss 2.5")
        print('RLHF_RESULT {"stage": "sft", "metrics": {"perplexity": 3.5}, "final_dir": "/x/final"}')
        print("closing")
    """)
    lines: list[str] = []
    result = run_stage("sft", tmp_path, echo=lines.append)
    assert result == {"stage": "sft", "metrics": {"perplexity": 3.5}, "final_dir": "/x/final"}
    assert lines[0].startswith("$ ")  # the command line comes first
    assert lines[1:] == ["loading model", "warning on stderr", "step 1 loss 2.5", "closing"]
    assert not any("RLHF_RESULT" in line for line in lines[1:])


def test_lines_stream_while_the_child_runs(monkeypatch, tmp_path):
    """Output is forwarded as it is printed, not when the child ends: the first line
    must reach ``echo`` before the child has finished sleeping."""
    use_child(monkeypatch, """
        import time
        print("first", flush=True)
        time.sleep(1.5)
        print("RLHF_RESULT {}")
    """)
    seen: list[tuple[float, str]] = []
    t0 = time.monotonic()
    run_stage("sft", tmp_path, echo=lambda line: seen.append((time.monotonic() - t0, line)))
    first = next(t for t, line in seen if line == "first")
    assert first < time.monotonic() - t0 - 1.0


def test_child_env_gets_extra_variables_and_unbuffered_output(monkeypatch, tmp_path):
    """``env`` adds to the parent's environment (Airflow context for MLflow tags) and
    the child always runs unbuffered so its log streams live."""
    monkeypatch.setenv("FROM_PARENT", "kept")
    use_child(monkeypatch, """
        import json, os
        keys = ("FROM_PARENT", "AIRFLOW_CTX_TASK_ID", "PYTHONUNBUFFERED")
        print("RLHF_RESULT " + json.dumps({k: os.environ.get(k) for k in keys}))
    """)
    result = run_stage("sft", tmp_path, env={"AIRFLOW_CTX_TASK_ID": "sft"}, echo=lambda _line: None)
    assert result == {"FROM_PARENT": "kept", "AIRFLOW_CTX_TASK_ID": "sft", "PYTHONUNBUFFERED": "1"}


def test_signal_handlers_are_restored_afterwards(monkeypatch, tmp_path):
    """The forwarding handlers live only while the stage runs."""
    use_child(monkeypatch, 'print("RLHF_RESULT {}")')
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    run_stage("sft", tmp_path, echo=lambda _line: None)
    assert {s: signal.getsignal(s) for s in before} == before


# --- failures -------------------------------------------------------------------------


def test_non_zero_exit_raises_with_the_last_lines(monkeypatch, tmp_path):
    """A crashing stage raises ``StageFailed`` whose message names the stage and exit
    code and carries the last lines (the traceback), not the early ones: that message is
    what Airflow shows as the task's error."""
    use_child(monkeypatch, """
        import sys
        for i in range(40):
            print(f"progress {i}")
        print("Traceback (most recent call last):")
        print("RuntimeError: CUDA out of memory", flush=True)
        sys.exit(3)
    """)
    lines: list[str] = []
    with pytest.raises(StageFailed) as err:
        run_stage("ppo", tmp_path, echo=lines.append)
    msg = str(err.value)
    assert "'ppo'" in msg and "code 3" in msg
    assert "RuntimeError: CUDA out of memory" in msg and "progress 39" in msg
    assert "progress 0\n" not in msg  # only the tail
    assert "progress 0" in lines  # ...while the log got everything


def test_result_line_before_a_crash_does_not_count(monkeypatch, tmp_path):
    """Exit status wins: a result printed before a non-zero exit is not a success."""
    use_child(monkeypatch, """
        import sys
        print('RLHF_RESULT {"stage": "sft"}', flush=True)
        sys.exit(1)
    """)
    with pytest.raises(StageFailed, match="code 1"):
        run_stage("sft", tmp_path, echo=lambda _line: None)


def test_exit_zero_without_result_line_fails(monkeypatch, tmp_path):
    """A child that ends cleanly but never printed ``RLHF_RESULT`` (e.g. killed a
    rank's output, or a wrong entry point) is a failure, not an empty success."""
    use_child(monkeypatch, 'print("all done, honest")')
    with pytest.raises(StageFailed) as err:
        run_stage("evaluate", tmp_path, echo=lambda _line: None)
    assert "code 0" in str(err.value) and "all done, honest" in str(err.value)


# --- signal forwarding -----------------------------------------------------------------

# The child: handles the signal by writing a file, and starts a grandchild in the same
# process group that does the same, so the test sees that the *group* got the signal.
CHILD = """
import os, signal, subprocess, sys, time
out, signum = sys.argv[1], int(sys.argv[2])
def stop(s, _f):
    open(os.path.join(out, f"child-{s}"), "w").write(str(os.getpid()))
    print(f"child got signal {s}, checkpoint saved", flush=True)
    sys.exit(128 + s)
signal.signal(signum, stop)
grandchild = subprocess.Popen([sys.executable, "-c", '''
import os, signal, sys, time
out, signum = sys.argv[1], int(sys.argv[2])
def stop(s, _f):
    open(os.path.join(out, f"grandchild-{s}"), "w").write(str(os.getpid()))
    sys.exit(0)
signal.signal(signum, stop)
open(os.path.join(out, "grandchild-ready"), "w").close()
time.sleep(30)
''', out, str(signum)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while not os.path.exists(os.path.join(out, "grandchild-ready")):
    time.sleep(0.02)
print("ready", os.getpgrp(), flush=True)
time.sleep(30)
"""

# The parent: what an Airflow task process does, with the child swapped in.
PARENT = """
import sys
from rlhf_tasks.pipeline import launch
out, signum = sys.argv[1], sys.argv[2]
launch.launch_argv = lambda *a, **k: [sys.executable, "-c", {child!r}, out, signum]
try:
    launch.run_stage("ppo", out, echo=lambda line: print("LOG", line, flush=True))
except launch.StageFailed as e:
    print("STAGE_FAILED", str(e).replace(chr(10), " | "), flush=True)
    sys.exit(1)
print("UNEXPECTED_SUCCESS", flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_reaches_the_whole_child_process_group(tmp_path, signum):
    """Airflow stops a task by signalling its process. The launcher must pass the
    signal to the stage's whole process group (the DeepSpeed launcher and every rank),
    so the stage can checkpoint and exit; then the task fails with the child's last
    words instead of leaving orphans on the GPU."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(child=CHILD), str(tmp_path), str(int(signum))],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                              start_new_session=True)
    try:
        lines = []
        assert parent.stdout is not None
        for line in parent.stdout:  # wait until the child and grandchild handle the signal
            lines.append(line.rstrip("\n"))
            if line.startswith("LOG ready"):
                break
        else:
            pytest.fail("child never became ready:\n" + "\n".join(lines))
        child_pgid = int(lines[-1].split()[-1])
        assert child_pgid != os.getpgid(parent.pid)  # the child has a group of its own
        parent.send_signal(signum)
        rest, _ = parent.communicate(timeout=20)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
    lines += rest.splitlines()
    output = "\n".join(lines)

    assert parent.returncode == 1, output
    assert (tmp_path / f"child-{int(signum)}").is_file(), output
    deadline = time.monotonic() + 10
    while not (tmp_path / f"grandchild-{int(signum)}").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / f"grandchild-{int(signum)}").is_file(), "the grandchild was not signalled"
    # The parent logged why it stopped, and its error carries the child's last line.
    assert any(f"received signal {int(signum)}" in line for line in lines), output
    failed = next(line for line in lines if line.startswith("STAGE_FAILED"))
    assert f"code {128 + int(signum)}" in failed  # the exit status the child chose
    assert "checkpoint saved" in failed


def test_result_json_round_trips_non_ascii(monkeypatch, tmp_path):
    """The result payload is JSON: unicode sample text survives the pipe."""
    payload = {"sample": "Assistant: ça va → très bien", "reward": 1.25}
    use_child(monkeypatch, f"print('RLHF_RESULT ' + {json.dumps(payload)!r})")
    assert run_stage("evaluate", tmp_path, echo=lambda _line: None) == payload
