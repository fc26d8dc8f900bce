"""Test-wide settings: offline, on CPU, storage in a temporary directory; the trained run
that the whole session shares."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Set before anything imports huggingface_hub / datasets / deepspeed.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RLHF_DEVICE="cpu",
                  DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false")
os.environ.pop("MLFLOW_TRACKING_URI", None)
# The tests' MLflow servers start no job runner: its consumer processes cost CPU the tests need.
os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
# Under pytest-xdist (`make test` runs two workers) each worker and every process it starts
# computes on one thread: two workers of two threads each on 2 cores would spin against each
# other (OpenMP's busy wait), far slower than one thread each.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

# Light (no torch): the helpers for tests that run stages, importable from here as well.
from rlhf_tasks.storage import RunDir  # noqa: E402
from tests.runs import fork_run, pipeline_through_airflow, result_of, run_cli, stage_result  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "dags" / "rlhf_pipeline.py"


def load_dag_module(name: str):
    """Import dags/rlhf_pipeline.py by path as a fresh module named ``name``, as Airflow's
    dag-processor does (AIRFLOW_HOME must already point somewhere writable)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Under `make test` two pytest-xdist workers share the tests, each worker a session of its
# own: the tests that share a session fixture which trains or starts servers run on one
# worker, so that it is made once per test run (the other tests go to whichever worker is
# free). xdist's own `loadgroup` cannot do it under pytest 9 (it renames test ids through an
# attribute pytest 9 no longer reads), so the grouping is this scheduler's, by file.
HEAVY_FIXTURES = {"pipeline_run": "trained-run", "topology": "topology", "fault_reference": "fault-reference",
                  "rank_runs": "ranks"}
GROUP_FILES = {
    "trained-run": ("tests/e2e/test_pipeline.py", "tests/test_training.py", "tests/test_alignment.py"),
    "topology": ("tests/e2e/test_browser.py", "tests/e2e/test_production_topology.py",
                 "tests/e2e/test_human_feedback.py"),
    "fault-reference": ("tests/faults/test_kill_resume.py",),
    "ranks": ("tests/test_ranks.py", "tests/faults/test_ranks_faults.py"),
}
GROUP_OF = {f: g for g, files in GROUP_FILES.items() for f in files}


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        """One work unit per group of GROUP_FILES (the largest first), one per other test."""

        def _split_scope(self, nodeid: str) -> str:
            return GROUP_OF.get(nodeid.split("::", 1)[0], nodeid)

    return SharedFixtureScheduling(config, log)


def pytest_itemcollected(item: pytest.Item) -> None:
    """A test that asks for a heavy fixture from a file outside its group would make the
    fixture a second time on another worker: refused at collection."""
    path = item.nodeid.split("::", 1)[0]
    for fixture, group in HEAVY_FIXTURES.items():
        if fixture in getattr(item, "fixturenames", ()) and GROUP_OF.get(path) != group:
            raise pytest.UsageError(f"{item.nodeid} uses {fixture}: add {path} to GROUP_FILES[{group!r}] "
                                    "in tests/conftest.py")


@pytest.fixture(scope="session")
def storage(tmp_path_factory) -> Path:
    """One shared storage root for the session: the tiny model and tokenised data are
    built once and reused, as on a real deployment."""
    root = tmp_path_factory.mktemp("storage")
    os.environ["RLHF_STORAGE"] = str(root)
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf-datasets")
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(storage) -> Path:
    from rlhf_tasks.runtime.models import resolve_model_path

    return Path(resolve_model_path("builtin:tiny-opt"))


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory) -> Iterator:
    """tiny-cpu's whole DAG through Airflow, once per session (tests/runs.py): the e2e
    tests read it back through Airflow and MLflow, and its run directory is the session's
    trained run."""
    if not Path(sys.executable).with_name("airflow").exists():
        pytest.skip(f"airflow is not installed next to {sys.executable}")
    with pipeline_through_airflow(tmp_path_factory.mktemp("rlhf-home")) as run:
        yield run


@pytest.fixture(scope="session")
def trained_run(pipeline_run) -> RunDir:
    """The session's tiny-cpu run, SFT, RM, PPO and evaluation finished (the pipeline run's
    directory; read it, do not write to it). To train another stage on its SFT and RM
    models, take a fork: ``fork_run(trained_run, tmp_path)`` (tests/runs.py)."""
    if why := pipeline_run.failure(("sft", "rm")):
        pytest.fail(f"no trained run: {why}")
    return RunDir(pipeline_run.run_dir)


@pytest.fixture(scope="session")
def ppo_run(pipeline_run, trained_run) -> RunDir:
    """The trained run, PPO and the held-out evaluation finished."""
    if why := pipeline_run.failure(("ppo", "evaluate")):
        pytest.fail(f"no PPO run: {why}")
    return trained_run


@pytest.fixture(scope="session")
def rank_runs(storage, tiny_model_dir, tmp_path_factory):
    """Stages on 2 CPU ranks through DeepSpeed's launcher, each made once per session on
    first request (tests/ranks.py)."""
    from tests.mlflow_server import MlflowServer
    from tests.ranks import RankRuns

    server = MlflowServer(tmp_path_factory.mktemp("ranks-mlflow"))
    server.start()
    yield RankRuns(tmp_path_factory.mktemp("ranks"), server.url)
    server.stop()


@pytest.fixture
def forked_run(trained_run, tmp_path) -> RunDir:
    """A fresh run directory where the session's SFT and RM have finished, its config the
    trained run's: run only the next stage in it (``--output forked_run.path``)."""
    return fork_run(trained_run, tmp_path)


_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True, scope="module")
def _no_process_group_leak():
    """A module that runs a stage inside the test process joins a process group: RANK,
    MASTER_PORT... go into os.environ and this process listens on MASTER_PORT. Stage
    subprocesses started by later modules would inherit them and fail to bind the port
    (EADDRINUSE), so the group is torn down and the variables restored after each module."""
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    import sys

    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
