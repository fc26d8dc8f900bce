"""The run directory's ``config.yaml``: written by the first stage, agreed with by the rest."""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

from ..config import STAGES, ConfigError, PipelineConfig, flatten
from ..storage import CONFIG_FILE

log = logging.getLogger("rlhf_tasks")


def resolve_run_config(run_path: Path, cfg: PipelineConfig | None) -> PipelineConfig:
    """The run directory's config.yaml is the source of truth for every stage of a run:
    the first stage (or the DAG's install task) writes it; later ones must agree with it,
    so a resumed or retried run can never silently mix settings. ``cfg`` None: use the
    saved one."""
    run_path = Path(run_path)
    run_path.mkdir(parents=True, exist_ok=True)
    config_path = run_path / CONFIG_FILE
    with open(run_path / ".config.lock", "w") as lock:  # stages starting side by side read/write it in turn
        fcntl.flock(lock, fcntl.LOCK_EX)
        if config_path.is_file():
            saved = PipelineConfig.load(config_path)
            if cfg is None or cfg.to_dict() == saved.to_dict():
                return saved
            started = [s for s in STAGES if (run_path / s).is_dir()]
            if started:
                new, old = flatten(cfg.to_dict()), flatten(saved.to_dict())
                diff = [k for k in new if new[k] != old.get(k)]
                raise ConfigError(f"{config_path} already holds a different config (keys {diff[:8]}) and stages "
                                  f"{started} have started with it: use a new --output directory, or drop "
                                  "--preset/--set to reuse the saved one")
            log.info("replacing %s: no stage has started with it yet", config_path)
        if cfg is None:
            raise ConfigError(f"{config_path} does not exist: give --preset (and --set) for a new run")
        cfg.save(config_path)
        return cfg
