"""What the pipelines print: Ray's noise held back, and a closing block saying what was produced and what next.

- `quiet_ray()` turns Ray Data's progress bars off (one bar per operator, redrawn for every dataset execution:
  over a thousand lines in the demo) unless `--verbose`.
- `filter_ray_lines()` drops the lines Ray prints at error level on every healthy run (listed, with why, in
  BENIGN_RAY_LINES) and Ray Data's per-execution chatter from what the driver prints, unless `--verbose`.
- `closing_block()` lists MLflow runs with the `mlflow ui` command that shows them, checkpoints, plots, and
  the next commands.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

# (substring, why it is harmless)
BENIGN_RAY_LINES = (
    ("Actor with class name: 'PreemptionWatcher'",
     "Ray Train's controller starts this helper with restartable arguments; Ray logs an error-level notice"),
    ("has constructor arguments in the object store and max_restarts > 0",
     "the same notice, for any restartable actor Ray's libraries create"),
    ("`ExecutionOptions.exclude_resources` is deprecated", "Ray Train's own use of a Ray Data option"),
    ("self.exclude_resources = exclude_resources", "the source line of that warning"),
)
# Ray Data's per-execution chatter (every epoch re-executes the training pipeline); kept with --verbose and in
# Ray Data's own log file under the session folder.
RAY_DATA_CHATTER = ("Starting execution of Dataset", "Execution plan of Dataset", "Progress bars disabled",
                    "execution finished in")


def quiet_ray(verbose: bool = False) -> None:
    """Ray Data's progress bars off unless `verbose`; call before Ray starts, so a local Ray's workers
    inherit the setting, and it also applies to this process's DataContext (datasets carry it to the
    executors that run them)."""
    if verbose:
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
    except Exception:  # noqa: BLE001 - a Ray Data without these switches keeps its bars
        pass


def is_benign(line: str) -> bool:
    return any(s in line for s, _ in BENIGN_RAY_LINES) or any(s in line for s in RAY_DATA_CHATTER)


class _DropChatter:
    """logging filter for this process's own Ray Data console lines."""

    def filter(self, record) -> bool:
        return not is_benign(record.getMessage())


def filter_ray_lines(verbose: bool = False) -> bool:
    """After Ray is initialised: wrap the driver's printer of worker output so the lines in BENIGN_RAY_LINES
    are dropped. Returns whether the filter is installed (not with `verbose`, or when Ray prints nothing)."""
    if verbose:
        return False
    import logging

    for handler in logging.getLogger("ray.data").handlers:
        if not any(isinstance(f, _DropChatter) for f in handler.filters):
            handler.addFilter(_DropChatter())
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    name = "ray_print_logs"
    with dispatcher._lock:
        found = [h for n, h in dispatcher.handlers if n == name]
    if not found or getattr(found[0], "_magface_filtered", False):
        return bool(found)
    printer = found[0]

    def filtered(data):
        lines = [ln for ln in data.get("lines", []) if not is_benign(ln)]
        if lines:
            printer({**data, "lines": lines})

    filtered._magface_filtered = True
    dispatcher.remove_handler(name)
    dispatcher.add_handler(name, filtered)
    return True


def mlflow_ui_command(uri: str | None) -> str:
    """How to look at runs in the store at `uri`."""
    if not uri:
        return "mlflow ui"
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def artifact_files(run_id: str | None, uri: str | None, suffixes=(".png",)) -> list[str]:
    """Local paths of a run's artifacts with these suffixes (plots), when its artifact store is a local
    folder; [] otherwise or when MLflow cannot be asked."""
    if not run_id:
        return []
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri) if uri else MlflowClient()
        root = client.get_run(run_id).info.artifact_uri
    except Exception:  # noqa: BLE001 - the summary is best effort
        return []
    parsed = urlparse(root)
    if parsed.scheme not in ("", "file"):
        return []
    folder = Path(unquote(parsed.path) if parsed.scheme == "file" else root)
    if not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.rglob("*") if p.suffix in suffixes)


def closing_block(title: str, *, tracking_uri: str | None = None, runs: dict | None = None,
                  checkpoints: dict | None = None, plots: list | None = None, next_steps: list | None = None,
                  max_plots: int = 8) -> str:
    """The block every pipeline ends with. `runs`: label -> MLflow run id; `checkpoints`: label -> path."""
    lines = [f"== {title} =="]
    runs = {k: v for k, v in (runs or {}).items() if v}
    if runs:
        lines.append(f"MLflow ({tracking_uri or 'default store'}):")
        lines += [f"  {label:<22} run {rid}" for label, rid in runs.items()]
        lines.append(f"  view: {mlflow_ui_command(tracking_uri)}")
    for label, path in (checkpoints or {}).items():
        if path:
            lines.append(f"checkpoint ({label}): {path}")
    plots = list(plots or [])
    if plots:
        lines.append("plots:")
        lines += [f"  {p}" for p in plots[:max_plots]]
        if len(plots) > max_plots:
            lines.append(f"  ... and {len(plots) - max_plots} more beside them")
    if next_steps:
        lines.append("next:")
        lines += [f"  {s}" for s in next_steps]
    return "\n".join(lines)
