"""Command line: ``python -m rlhf_tasks <stage> --preset P --set key=value ... --output DIR``.

Stages: ``prepare`` (check the worker, resolve the config, validate data and models),
``sft``, ``rm``, the alignment step (a row of the algorithm table: ``ppo``, ``grpo``, ``rloo``, ``dpo``,
``kto``), ``evaluate``, ``register`` (which writes the run report); ``chat``
talks to a trained actor; ``config`` prints a resolved config; ``presets`` lists presets;
``plan`` prints each stage's peak GPU memory (from the models' config.json, no weights).

The last stdout line of a stage is ``RLHF_RESULT <json>`` (paths, metrics, MLflow run
id): the Airflow task parses it and passes only that on.

Exit status: 0 done; 2 a bad input (config value, data file, model directory), refused
before any training; 3 the run directory's stage is already running in another process;
4 the storage is full (the previous checkpoint is intact); 5 a rank of a multi-process
stage made no progress for ``resources.collective_timeout_minutes`` (runtime/watchdog.py);
6 (`plan`) a stage does not fit the GPU capacity, each such stage and the smallest change that
fits it on stderr; 7 the run has spent its budget (``resources.budget_usd``/``budget_gpu_hours``,
runtime/budget.py).

Under DeepSpeed's launcher every rank runs this; rank 0 alone prints the result line.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
from pathlib import Path

from ..config import ALGORITHMS, ConfigError, PipelineConfig, list_presets
from ..runtime.budget import EXIT_OVER_BUDGET, BudgetExceeded
from ..runtime.run_config import resolve_run_config
from ..storage import (
    RESULT_PREFIX,
    RunDir,
    RunDirBusy,
    StorageFullError,
    new_run_id,
    stage_lock,
    storage_root,
)

EXIT_BAD_INPUT, EXIT_BUSY, EXIT_STORAGE_FULL = 2, 3, 4
EXIT_DOES_NOT_FIT = 6  # `plan`: a stage does not fit the GPU capacity given (or found)
# Stage -> "module:entry point", called run(cfg, run_dir) (step 3's, from the algorithm table,
# run(cfg, run_dir, name=<algorithm>)).
STAGE_MODULES = {"prepare": "rlhf_tasks.pipeline.prepare:run", "sft": "rlhf_tasks.algorithms.sft:run",
                 "rm": "rlhf_tasks.algorithms.reward:run", **{a.name: a.stage for a in ALGORITHMS.values()},
                 "evaluate": "rlhf_tasks.pipeline.evaluate:run", "register": "rlhf_tasks.pipeline.register:run"}


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"preset name ({', '.join(list_presets())}) or a YAML file")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set sft.learning_rate=1e-4 ppo.kl_coef=0.05")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m rlhf_tasks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    # DeepSpeed's launcher passes --local_rank=N unless told --no_local_rank (ours is); a
    # hand-typed `deepspeed --module rlhf_tasks ...` must work too. LOCAL_RANK is in the env.
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in STAGE_MODULES:
        p = sub.add_parser(name, help=f"run the {name} stage")
        _config_args(p)
        p.add_argument("--output", type=Path, help="run directory (default: $RLHF_STORAGE/runs/<new id>)")
    p = sub.add_parser("config", help="print the resolved config as YAML")
    _config_args(p)
    sub.add_parser("presets", help="list the presets")
    p = sub.add_parser("plan", help="each stage's peak GPU memory, from the config and the models' config.json")
    _config_args(p)
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="plan against this much memory per GPU")
    p.add_argument("--model-config", action="append", nargs="+", default=[], metavar="[ROLE=]PATH",
                   help="config.json (or its directory) of model.actor / model.rm (actor=PATH rm=PATH; "
                        "a bare PATH is both), for hub models not on this machine")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--suggest", action="store_true", help="also the largest per-device batch that fits, per stage")
    p = sub.add_parser("chat", help="talk to a trained actor")
    p.add_argument("--path", required=True, help="a final/ directory (or any causal LM directory / hub id)")
    p.add_argument("--prompt", help="answer this one prompt and exit (non-interactive)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the run's answer budget (max_seq_len - max_prompt_seq_len), else 64")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--no-repeat-ngram-size", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="default: the run's evaluate.dtype on a GPU, fp32 on CPU")
    p.add_argument("--attn-implementation", choices=["sdpa", "eager", "flash_attention_2"], default=None,
                   help="default: the run's model.attn_implementation (eager where the model has no sdpa)")
    return ap


def resolve(args) -> PipelineConfig | None:
    overrides = [o for group in args.overrides for o in group]
    if args.preset is None:
        if overrides:
            raise ConfigError("--set needs --preset (or reuse a run's saved config by giving only --output)")
        return None
    return PipelineConfig.load(args.preset, overrides)


def plan_main(args, cfg: PipelineConfig) -> int:
    from .. import plan

    given: dict[str, Path] = {}
    for item in (i for group in args.model_config for i in group):
        role, sep, path = item.partition("=")
        if sep and role not in plan.ROLES:
            raise ConfigError(f"--model-config {item!r}: the role is one of {list(plan.ROLES)}")
        given.update({role: Path(path)} if sep else dict.fromkeys(plan.ROLES, Path(item)))
    capacity = args.gpu_memory_gb if args.gpu_memory_gb is not None else plan.gpu_capacity_gb()
    if args.suggest and capacity is None:
        raise ConfigError("--suggest needs a capacity: give --gpu-memory-gb (this machine has no GPU)")
    result = plan.make_plan(cfg, plan.model_configs(cfg, given), capacity, suggest=args.suggest)
    print(json.dumps(result.to_json(), indent=2, sort_keys=True) if args.json else plan.render(result))
    if not result.fits:  # a script's check: each stage that does not fit, with the smallest change that does
        for message in result.messages():
            print(f"error: {message}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "presets":
            print("\n".join(list_presets()))
            return 0
        if args.command == "chat":
            from .chat import main as chat_main

            return chat_main(args)
        cfg = resolve(args)
        if args.command == "plan":
            return plan_main(args, cfg or PipelineConfig.load("tiny-cpu"))
        if args.command == "config":
            print((cfg or PipelineConfig.load("tiny-cpu")).to_yaml())
            return 0
        run = RunDir(args.output or storage_root() / "runs" / new_run_id())
        if run.path.exists() and not run.path.is_dir():
            raise ConfigError(f"--output {run.path} is a file, not a run directory")
        with stage_lock(run.path, args.command):
            from . import preflight
            cfg = resolve_run_config(run.path, cfg)
            preflight.check(args.command, cfg, run)
            module, _, entry = STAGE_MODULES[args.command].partition(":")
            fn = getattr(importlib.import_module(module), entry)
            # Step 3's entry points may serve several algorithms (the RL loop): they are told which.
            result = fn(cfg, run, name=args.command) if args.command in ALGORITHMS else fn(cfg, run)
    except BudgetExceeded as e:
        print(f"error: {e}", file=sys.stderr)
        from .report import write_report

        write_report(cfg, run)  # the report says why the run stopped
        return EXIT_OVER_BUDGET
    except RunDirBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BUSY
    except StorageFullError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_STORAGE_FULL
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: storage full at {e.filename or 'the storage'}: {e}", file=sys.stderr)
            return EXIT_STORAGE_FULL
        if not isinstance(e, FileNotFoundError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    payload = result if isinstance(result, dict) else json.loads(result.to_json())
    if os.environ.get("RANK", "0") in ("", "0"):  # one result line per stage, whatever the ranks
        print(RESULT_PREFIX + json.dumps(payload, sort_keys=True, default=str), flush=True)
    return 0

