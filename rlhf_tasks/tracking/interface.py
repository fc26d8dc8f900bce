"""What stage code is typed against: :class:`TrackerLike`, and :class:`NullTracker`, the
tracker that does nothing (tracking off, server unreachable, unit tests of stages)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol


class TrackerLike(Protocol):
    """What a stage may call on its tracker: :class:`Tracker` or :class:`NullTracker`."""

    run_id: str | None
    tracking_uri: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool: ...
    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> bool: ...
    def log_dict(self, dictionary: Any, name: str) -> bool: ...
    def log_text(self, text: str, name: str) -> bool: ...
    def log_figure(self, fig: Any, name: str) -> bool: ...
    def log_table(self, rows: list[dict[str, Any]], name: str) -> bool: ...
    def flush(self, timeout: float = 30.0) -> bool: ...
    def close(self, status: str = "FINISHED", timeout: float = 30.0) -> None: ...


class NullTracker:
    """Same interface as :class:`Tracker`, does nothing: tracking off, server
    unreachable at start, and unit tests of stages."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def __init__(self, unreachable: bool = False):
        self.unreachable = unreachable  # tracking was asked for but the server did not answer
        self._produced = 0

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._produced += len(metrics)

    def stats(self) -> dict[str, int]:
        """Metric points: produced, sent to the server, dropped, invalid, still pending."""
        lost = self._produced if self.unreachable else 0
        return {"points_produced": self._produced, "points_sent": 0, "points_dropped": lost,
                "points_invalid": 0, "points_pending": 0}

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        return False

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> bool:
        return False

    def log_dict(self, dictionary: Any, name: str) -> bool:
        return False

    def log_text(self, text: str, name: str) -> bool:
        return False

    def log_figure(self, fig: Any, name: str) -> bool:
        return False

    def log_table(self, rows: list[dict[str, Any]], name: str) -> bool:
        return False

    def flush(self, timeout: float = 30.0) -> bool:
        return True

    def close(self, status: str = "FINISHED", timeout: float = 30.0) -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type else "FINISHED")
