"""Experiment tracking: `--report_to none|tensorboard|mlflow|trackio|wandb` (a comma list), as in transformers.

Every backend is optional and imported only when asked for; a missing one is a one-line UserError with the
pip command (`check_tracking_args` finds it at flag-check time, before any work). Only rank 0 writes
(`is_main=False` gives a tracker that does nothing and imports nothing). Nothing reaches the network unless
the user configured a server themselves:

  tensorboard  event files in <output_dir>/runs/<run_name>/ (view: tensorboard --logdir <output_dir>/runs)
  mlflow       a local SQLite store, <output_dir>/mlflow.db, artifacts in <output_dir>/mlartifacts; MLflow's
               file store (./mlruns) refuses to start since MLflow 3 ("maintenance mode"), SQLite is its local
               replacement. MLFLOW_TRACKING_URI, when set, wins; MLFLOW_EXPERIMENT_NAME names the experiment
               (default "LLM_Fine_Tuning"). Telemetry is off unless MLFLOW_DISABLE_TELEMETRY says otherwise.
               View: pip install mlflow && mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db
  wandb        offline, files in <output_dir>/wandb/ (upload later: wandb sync <output_dir>/wandb/offline-run-*),
               unless WANDB_MODE is set; WANDB_PROJECT names the project (default "LLM_Fine_Tuning"); error
               reports off unless WANDB_ERROR_REPORTING is set
  trackio      local SQLite in <output_dir>/trackio/ (set before trackio is first imported; TRACKIO_DIR, when
               set, wins); view: TRACKIO_DIR=<output_dir>/trackio trackio show --project LLM_Fine_Tuning

Scalars may be nested dicts (an evaluation's metrics): they are flattened to names like
`val/per_class/暴恐/f1`; non-numeric leaves (label lists, the confusion matrix) are left out, and names a
backend refuses are made safe for it. Params (the run's arguments, already redacted) are logged once.

Usage (the integrator's wiring in train_lora.py):

    from lft.tracking import Tracker, add_tracking_args, check_tracking_args

    add_tracking_args(parser)                         # --report_to, --run_name
    check_tracking_args(args, problems)               # in check_args: unknown name, package not installed
    tracker = Tracker.open(args.report_to, out, args.run_name, C.safe_args(args), is_main=d.main,
                           resume_step=state["global_step"] if resume else None)
    tracker.log(gs, {"train/loss": loss, "train/lr": lr})          # with each log line
    tracker.log(step, {"val": m})                                   # after each evaluation (nested is fine)
    tracker.close()                                                 # in a finally: flushes files
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

from .common import UserError

BACKENDS = ("tensorboard", "mlflow", "trackio", "wandb")
PROJECT = "LLM_Fine_Tuning"  # the mlflow experiment, wandb and trackio project, unless the user's env names one
# module to look for -> the pip command that brings it (the versions the tests run against)
PACKAGES = {
    "tensorboard": ({"tensorboard": "tensorboard"}, "pip install tensorboard==2.21.0"),
    "mlflow": ({"mlflow": "mlflow-skinny", "sqlalchemy": "sqlalchemy", "alembic": "alembic"},
               "pip install mlflow-skinny==3.17.2 sqlalchemy==2.1.9 alembic==1.20.1"),
    "trackio": ({"trackio": "trackio"}, "pip install trackio==0.43.0"),
    "wandb": ({"wandb": "wandb"}, "pip install wandb==0.31.0"),
}


def add_tracking_args(parser) -> None:
    parser.add_argument("--report_to", default="none",
                        help=f"experiment trackers, comma-separated: none or {', '.join(BACKENDS)} (local files "
                             "under --output_dir; each is an optional pip package)")
    parser.add_argument("--run_name", default=None, help="run name in the trackers (default: --output_dir's name)")


def parse_report_to(value) -> list[str]:
    """'tensorboard, mlflow' or ['tensorboard', 'mlflow'] -> ['tensorboard', 'mlflow']; 'none' or '' -> []."""
    names = [n.strip().lower() for n in (value.split(",") if isinstance(value, str) else value or [])]
    names = [n for n in names if n]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in BACKENDS + ("none",)]
    if unknown or "none" in names:
        bad = ", ".join(repr(n) for n in unknown) or "'none' with a tracker"
        raise ValueError(f"--report_to {bad}: choose none or a comma list of {', '.join(BACKENDS)}")
    return list(dict.fromkeys(names))


def missing_package(backend: str) -> str | None:
    """The one-line problem when `backend`'s packages are not installed, else None (nothing is imported)."""
    modules, cmd = PACKAGES[backend]
    missing = [pkg for mod, pkg in modules.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        return None
    what = f"the package '{missing[0]}'" if len(missing) == 1 else "the packages " + ", ".join(f"'{m}'"
                                                                                               for m in missing)
    return f"--report_to {backend} needs {what}: {cmd}"


def check_tracking_args(args, problems: list) -> None:
    """Append a sentence to `problems` for an unknown tracker or one whose package is not installed."""
    try:
        problems.extend(p for p in map(missing_package, parse_report_to(args.report_to)) if p)
    except ValueError as e:
        problems.append(str(e))
    if args.run_name is not None and not args.run_name.strip():
        problems.append("--run_name must not be empty")


def flatten_scalars(scalars: dict, prefix: str = "") -> dict[str, float]:
    """{'val': {'macro_f1': 0.9, 'per_class': {'暴恐': {'f1': 0.8}}, 'labels': [...]}} ->
    {'val/macro_f1': 0.9, 'val/per_class/暴恐/f1': 0.8}: numbers only (bools and non-numbers are dropped)."""
    out = {}
    for k, v in scalars.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_scalars(v, name + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) or _is_scalar_array(v):
            out[name] = float(v)
    return out


def _is_scalar_array(v) -> bool:  # numpy / torch 0-d values
    return getattr(v, "shape", None) == () and hasattr(v, "item") and not isinstance(v.item(), bool)


# MLflow's allowed names (POSIX): word characters (CJK included), '/', '.', '-', ' ', ':'; at most 250
_MLFLOW_BAD = re.compile(r"[^/\w.\- :]")


def mlflow_name(name: str) -> str:
    name = _MLFLOW_BAD.sub("_", name)
    # names double as file paths: '..', '//', a leading or trailing '/' would resolve to another name
    name = "/".join(p if p not in ("", ".", "..") else "_" for p in name.split("/"))
    if len(name) > 250:
        name = name[:241] + "~" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


class Tracker:
    """The open trackers of one run; `log` and `close` are no-ops when there are none (or not rank 0)."""

    def __init__(self, backends: list | None = None):
        self._backends = backends or []

    @property
    def names(self) -> list[str]:
        return [b.name for b in self._backends]

    @classmethod
    def open(cls, report_to, output_dir, run_name: str | None, params: dict, is_main: bool,
             resume_step: int | None = None) -> "Tracker":
        """Start a run in each tracker of `report_to` (a comma string or a list). `resume_step`: the step of the
        checkpoint a resumed run continues from (TensorBoard hides what the interrupted run logged after it;
        MLflow, wandb and trackio continue the same run). Raises UserError for a missing package."""
        try:
            names = parse_report_to(report_to)
        except ValueError as e:
            raise UserError(str(e)) from None
        if not is_main or not names:
            return cls()
        for name in names:
            if problem := missing_package(name):
                raise UserError(problem)
        output_dir = Path(output_dir).resolve()
        run_name = run_name or output_dir.name
        opened = []
        try:
            for name in names:
                opened.append(_OPENERS[name](output_dir, run_name, params, resume_step))
        except BaseException:
            for b in opened:
                b.close()
            raise
        return cls(opened)

    def log(self, step: int, scalars: dict) -> None:
        if not self._backends:
            return
        flat = flatten_scalars(scalars)
        if flat:
            for b in self._backends:
                b.log(int(step), flat)

    def close(self) -> None:
        backends, self._backends = self._backends, []
        for b in backends:
            b.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _param_value(v):
    """A value every backend accepts as a hyper-parameter: str/int/float/bool, anything else as text."""
    return v if isinstance(v, (str, int, float, bool)) else str(v)


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, output_dir: Path, run_name: str, params: dict, resume_step):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops this run's events at and after it, so the steps a resumed run redoes
        # are not shown twice
        self.writer = SummaryWriter(log_dir=str(output_dir / "runs" / run_name),
                                    purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            rows = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in params.items())
            self.writer.add_text("args", "| argument | value |\n|---|---|\n" + rows, 0)
            self.writer.add_hparams({k: _param_value(v) for k, v in params.items()}, {}, run_name=".")

    def log(self, step, flat):
        for k, v in flat.items():
            self.writer.add_scalar(k, v, step)

    def close(self):
        self.writer.close()


class _MLflow:
    name = "mlflow"

    def __init__(self, output_dir: Path, run_name: str, params: dict, resume_step):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read when mlflow is imported
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{output_dir / 'mlflow.db'}"
        output_dir.mkdir(parents=True, exist_ok=True)
        self.client = client = MlflowClient(tracking_uri=uri)
        exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
        exp = client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            exp_name, artifact_location=(output_dir / "mlartifacts").as_uri())
        # a resumed run continues the run it resumes: same name, same output folder
        folder = str(output_dir)
        found = client.search_runs([exp_id], filter_string=f"tags.lft_output_dir = '{_quote(folder)}' and "
                                   f"attributes.run_name = '{_quote(run_name)}'", max_results=1,
                                   order_by=["attributes.start_time DESC"]) if resume_step is not None else []
        if found:
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = client.create_run(exp_id, run_name=run_name,
                                            tags={"lft_output_dir": folder}).info.run_id
            items = [Param(mlflow_name(k), str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
                client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, step, flat):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_name(k), v, now, step) for k, v in flat.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self):
        self.client.set_terminated(self.run_id)


def _quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'")


class _Wandb:
    name = "wandb"

    def __init__(self, output_dir: Path, run_name: str, params: dict, resume_step):
        mode = os.environ.get("WANDB_MODE") or "offline"
        if mode == "offline":
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # crash reports would go to a server
        import wandb

        output_dir.mkdir(parents=True, exist_ok=True)
        folder = os.environ.get("WANDB_DIR") or str(output_dir)
        # a resumed run continues the wandb run the interrupted one wrote (wandb/latest-run -> ...-<run id>)
        latest = Path(folder) / "wandb" / "latest-run"
        run_id = latest.resolve().name.rsplit("-", 1)[-1] if resume_step is not None and latest.exists() else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, name=run_name, id=run_id,
                              resume="allow" if run_id else None, dir=folder, config=params,
                              settings=wandb.Settings(mode=mode, silent=True, console="off", x_disable_stats=True))

    def log(self, step, flat):
        self.run.log(flat, step=step)

    def close(self):
        self.run.finish()


class _Trackio:
    name = "trackio"

    def __init__(self, output_dir: Path, run_name: str, params: dict, resume_step):
        # trackio reads TRACKIO_DIR once, when first imported
        import sys

        if "trackio" not in sys.modules:
            os.environ.setdefault("TRACKIO_DIR", str(output_dir / "trackio"))
        import trackio
        from trackio.utils import TRACKIO_DIR

        self.dir = Path(TRACKIO_DIR)
        self.run = trackio.init(project=PROJECT, name=run_name, config=params, embed=False,
                                resume="never" if resume_step is None else "allow",
                                auto_log_gpu=False, auto_log_cpu=False)

    def log(self, step, flat):
        self.run.log(flat, step=step)

    def close(self):
        self.run.finish()


_OPENERS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb, "trackio": _Trackio}
