"""Serve the champion with MLflow's own scoring server, on the state of ``make run``.

    .venv/bin/python -m rlhf_tasks.pipeline.serve [--port 5002] [--ref champion] [--name NAME]
    make serve [SERVE_PORT=5002]

Runs ``mlflow models serve -m models:/<name>@<ref> --env-manager local -h 127.0.0.1 -p PORT``
(no new environment: this virtualenv's packages). The model store is ``$MLFLOW_TRACKING_URI``
when set, else the embedded MLflow of ``make run`` (``.rlhf/mlflow``, ``$RLHF_HOME``), started
on a free loopback port for as long as the scoring server runs. Chat requests go to
``POST /invocations`` (``{"messages": [{"role": "user", "content": "..."}], "max_tokens": 32}``);
the answer is an OpenAI-style ``chat.completion``. Ctrl-C stops everything it started.

A version registered before the models were MLflow LoggedModels (a plain directory, no
MLmodel file) cannot be served by MLflow: refused here with what to do instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

from .local import LOOPBACK, bin_path, home, latest_run_dir, mlflow_server, venv_first, wait_http
from .procs import spawn, stop_groups

DEFAULT_SERVE_PORT = 5002


class NotServable(RuntimeError):
    """The reference names no model MLflow can serve."""


def servable_uri(tracking_uri: str, name: str, ref: str) -> str:
    """``models:/<name>@<ref>`` (or ``/<version>``) after checking that the version is a
    LoggedModel with an MLmodel; NotServable says why not."""
    from ..tracking.registry import resolve_version

    try:
        v = resolve_version(tracking_uri, name, ref)
    except LookupError as e:
        raise NotServable(str(e)) from None
    if not v["source"].startswith("models:/"):
        raise NotServable(
            f"{name} version {v['version']} ({ref}) was registered before the pipeline logged MLflow models: its "
            f"source {v['source']} is a plain save_pretrained directory without an MLmodel file, which MLflow "
            "cannot load or serve. The project's own tools still read it: the labelling DAG's `model` field "
            "takes the version, and `.venv/bin/python -m rlhf_tasks chat --path <run directory>/<algorithm>/final` "
            "its run's files; or serve a version registered since (the register stage logs a servable model).")
    number = ref[1:] if ref[:1] in "vV" and ref[1:].isdigit() else ref
    return f"models:/{name}/{number}" if number.isdigit() else f"models:/{name}@{ref}"


def default_name(h: Path) -> str:
    """The registered model of the newest run of ``make run``'s storage (its config's
    ``tracking.registered_model``), else the tiny-cpu preset's."""
    from ..config import PipelineConfig

    run = latest_run_dir(Path(os.environ.get("RLHF_STORAGE") or h / "storage"))
    if run is not None and (run / "config.yaml").is_file():
        return PipelineConfig.load(run / "config.yaml").tracking.registered_model
    return PipelineConfig.load("tiny-cpu").tracking.registered_model


def serve_argv(model_uri: str, port: int, workers: int = 1) -> list[str]:
    return [bin_path("mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", LOOPBACK,
            "-p", str(port), "-w", str(workers)]


def serve_env(tracking_uri: str) -> dict[str, str]:
    """Offline (the model and its tokenizer are in the artifacts), the store's URI, and this
    virtualenv's bin first on PATH (MLflow starts ``uvicorn`` by name; the venv need not be active)."""
    return {**os.environ, "PATH": venv_first(os.environ.get("PATH", "")), "MLFLOW_TRACKING_URI": tracking_uri, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def _stop(signum, _frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhf_tasks.pipeline.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=DEFAULT_SERVE_PORT)
    ap.add_argument("--name", help="registered model (default: tracking.registered_model of the newest run)")
    ap.add_argument("--ref", default="champion", help="alias, version (3, v3), newest or run:<id>")
    args = ap.parse_args(argv)
    h = home()
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    proc = None
    try:
        with contextlib.ExitStack() as stack:
            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                if not (h / "mlflow" / "mlflow.db").is_file():
                    print(f"serve: no MLflow store in {h / 'mlflow'}: run `make run` first", file=sys.stderr)
                    return 2
                uri = stack.enter_context(mlflow_server(h))
            model_uri = servable_uri(uri, args.name or default_name(h), args.ref)
            log = h / "serve" / "server.log"
            proc = spawn(serve_argv(model_uri, args.port), log, serve_env(uri))
            url = f"http://{LOOPBACK}:{args.port}"
            wait_http(f"{url}/ping", 300, proc)
            print(f"==> serving {model_uri} at {url}/invocations (log {log}); Ctrl-C stops it\n"
                  f"    curl -s {url}/invocations -H 'Content-Type: application/json' "
                  """-d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'""", flush=True)
            return proc.wait()
    except NotServable as e:
        print(f"serve: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, TimeoutError) as e:
        tail = Path(h / "serve" / "server.log")
        print(f"serve: {e}\n{tail.read_text()[-3000:] if tail.is_file() else ''}", file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            stop_groups([proc])
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
