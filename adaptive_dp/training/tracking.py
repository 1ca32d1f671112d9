"""Experiment tracking: a Weights & Biases run (offline by default) with a JSONL twin that is always written.

Every optimizer step becomes one JSON line in ``OUT/history.jsonl`` (flushed at once, so a crash loses
nothing) and one ``wandb.log`` call under clear keys (``privacy/epsilon``, ``privacy/noise_multiplier``,
``leakage/mi``, ``train/audit_loss`` ...). Per-epoch records add their test metrics at the epoch's last step
and feed a ``wandb.Table`` (epoch, ε, MI, test accuracy, σ) logged at the end with a scatter chart of test
accuracy against ε, the privacy-utility trade-off. The tracker logs what it is given: which fields a record
holds (the private training-batch metrics only on request) is decided in :mod:`adaptive_dp.training.records`.

W&B is a convenience, never a dependency of the training run: every W&B call is wrapped, a failure is
logged once per kind (one ``logging.warning`` line) and training goes on; the JSONL file and ``summary.json``
are written either way. An online ``wandb.init`` gets :data:`WANDB_INIT_TIMEOUT_S` seconds (wandb's own
``init_timeout`` is 90 s, and with an unusable API key and no network it waits that long); when it fails the
run continues with an offline W&B run (``wandb sync`` uploads it later), so training never waits longer.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from adaptive_dp.training.config import WANDB_MODES

logger = logging.getLogger(__name__)

#: seconds an online ``wandb.init`` may take (``wandb.Settings(init_timeout=...)``); with the offline fallback
#: that follows a failure, W&B holds training up for about 15 s at most.
WANDB_INIT_TIMEOUT_S = 10.0
#: longest exception text a W&B warning quotes (its first line only).
WARNING_TEXT_CHARS = 200

#: record field -> W&B history key. Fields not listed go under ``train/<field>``; keys that already hold a
#: ``/`` are logged as they are.
WANDB_KEYS: dict[str, str] = {
    "epsilon": "privacy/epsilon",
    "guarantee_epsilon": "privacy/guarantee_epsilon",
    "noise_multiplier": "privacy/noise_multiplier",
    "sigma_floor": "privacy/sigma_floor",
    "sample_rate": "privacy/sample_rate",
    "delta": "privacy/delta",
    "mi": "leakage/mi",
    "critic_gap": "leakage/critic_gap",
    "mi_stderr": "leakage/mi_stderr",
    "controller_error": "control/error",
    "audit_loss": "train/audit_loss",
    "loss": "train/loss",
    "epoch": "train/epoch",
    "lr": "train/lr",
    "batch_size": "train/batch_size",
    "test_accuracy": "test/accuracy",
    "test_loss": "test/loss",
    "train_loss": "train/epoch_loss",
    "epoch_time_s": "time/epoch_s",
}

#: fields of an epoch record logged to W&B at the epoch's last step (the others — ε, σ, the latest MI — are the
#: step's own values or would overwrite them there; they go to the epoch table).
EPOCH_WANDB_FIELDS = ("epoch", "test_accuracy", "test_loss", "train_loss", "epoch_time_s")
#: summary fields also set in the W&B run summary under these keys (beside the summary's own flat keys).
SUMMARY_WANDB_KEYS = {"empirical_epsilon": "privacy/empirical_epsilon"}
#: columns of the per-epoch W&B table, in order.
EPOCH_COLUMNS = ("epoch", "step", "epsilon", "mi", "test_accuracy", "noise_multiplier")


def wandb_api_key_configured() -> bool:
    """Whether a W&B API key is configured on this machine, without prompting or touching the network.

    Looks at ``WANDB_API_KEY``, then at the ``.netrc`` entry ``wandb login`` writes for the configured host
    (``WANDB_BASE_URL``, default ``https://api.wandb.ai``), then (older wandb) at ``wandb.api.api_key``.
    Any error while looking counts as "no key".
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth

        host = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
        return bool(read_netrc_auth(host=host))
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - a broken .netrc means "no key", not a crash
        return False
    try:  # pragma: no cover - wandb < 0.22
        import wandb

        return bool(getattr(wandb.api, "api_key", None))
    except Exception:  # noqa: BLE001
        return False


def resolve_wandb_mode(mode: str | None = None) -> str:
    """The W&B mode to use: ``mode`` if given, else ``$WANDB_MODE`` if valid, else ``"online"`` when an API
    key is configured (:func:`wandb_api_key_configured`) and ``"offline"`` otherwise.

    Raises:
        ValueError: if ``mode`` is not one of :data:`WANDB_MODES`.
    """
    if mode is not None:
        if mode not in WANDB_MODES:
            raise ValueError(f"unknown W&B mode {mode!r}: use one of {', '.join(WANDB_MODES)}")
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in WANDB_MODES:
        return env
    if env == "dryrun":
        return "offline"
    return "online" if wandb_api_key_configured() else "offline"


def jsonable(value: Any) -> Any:
    """``value`` made JSON-friendly: tensors/numpy scalars become Python numbers, paths become strings,
    mappings and sequences are converted element-wise. Non-finite floats stay floats (JSON ``NaN``/``Infinity``,
    which Python's ``json`` reads back)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    item = getattr(value, "item", None)  # torch / numpy scalars
    if callable(item):
        try:
            return jsonable(item())
        except (ValueError, RuntimeError):
            pass
    tolist = getattr(value, "tolist", None)  # small arrays / tensors
    if callable(tolist):
        return jsonable(tolist())
    return str(value)


def wandb_key(field: str) -> str:
    """The W&B history key for a record field (see :data:`WANDB_KEYS`)."""
    if "/" in field:
        return field
    return WANDB_KEYS.get(field, f"train/{field}")


def _wandb_payload(record: Mapping[str, Any]) -> dict[str, Any]:
    """Numbers of ``record`` under their W&B keys; None and non-numeric values are left out (W&B cannot
    chart them), ``step`` is passed separately."""
    payload: dict[str, Any] = {}
    for field, value in jsonable(record).items():
        if field == "step" or value is None or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            payload[wandb_key(field)] = value
    return payload


class Tracker:
    """One training run's tracking: ``OUT/history.jsonl`` + ``OUT/summary.json`` + a W&B run under ``OUT/wandb/``.

    Args:
        out_dir: the run's output folder (created if missing).
        config: the run configuration (JSON-able mapping); becomes the W&B run config.
        mode: ``"offline"``, ``"online"`` or ``"disabled"``; None picks with :func:`resolve_wandb_mode`
            (``$WANDB_MODE``, else online when an API key is configured, else offline).
        project: W&B project name.
        run_name: W&B run name (None: W&B picks one).
        resume: append to ``history.jsonl`` instead of starting it afresh (a resumed training run).

    Use as a context manager: the run is finished on exit, also when training raised (marked failed then).

    Raises:
        ValueError: for an unknown ``mode``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        config: Mapping[str, Any],
        mode: str | None = None,
        project: str = "adaptive-dp",
        run_name: str | None = None,
        resume: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.config = jsonable(dict(config))
        self.mode = resolve_wandb_mode(mode)
        self.project = project
        self.history_path = self.out_dir / "history.jsonl"
        self.summary_path = self.out_dir / "summary.json"
        self.epochs: list[dict[str, Any]] = []
        self.last_step: int | None = None
        self._warned: set[str] = set()
        self._finished = False
        # a resumed run appends to the records of the steps it keeps
        self._jsonl = open(self.history_path, "a" if resume else "w", encoding="utf-8")  # noqa: SIM115 - finish()
        self._wandb: Any = None
        self.run: Any = None
        if self.mode != "disabled":
            self._start_wandb(run_name)

    # -- W&B plumbing ---------------------------------------------------------------------------------------
    def _start_wandb(self, run_name: str | None) -> None:
        try:
            import wandb
        except Exception as exc:  # noqa: BLE001
            self._warn("import", exc)
            return
        self._wandb = wandb
        if self.mode != "online":
            self.run = self._call("init", lambda: self._init(run_name))
            return
        try:
            self.run = self._init(run_name)
        except Exception as exc:  # noqa: BLE001 - any failure: go on offline
            self._warned.add("init")
            logger.warning(
                "W&B online init failed (%s: %s); continuing with an offline W&B run (upload it later with "
                "`wandb sync`) — training does not wait for W&B",
                type(exc).__name__,
                _first_line(exc),
            )
            self.mode = "offline"
            self.run = self._call("init", lambda: self._init(run_name))

    def _init(self, run_name: str | None) -> Any:
        """``wandb.init`` in :attr:`mode`; an online init is bounded by :data:`WANDB_INIT_TIMEOUT_S`."""
        wandb = self._wandb
        settings = wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S) if self.mode == "online" else None
        return wandb.init(
            dir=str(self.out_dir),
            project=self.project,
            name=run_name,
            config=self.config,
            mode=self.mode,
            settings=settings,
        )

    def _warn(self, kind: str, exc: BaseException) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(
                "W&B %s failed (training goes on; JSONL is still written): %s: %s",
                kind,
                type(exc).__name__,
                _first_line(exc),
            )

    def _call(self, kind: str, fn: Callable[[], Any]) -> Any:
        """Run one W&B call; a failure is logged once per ``kind`` and returns None."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._warn(kind, exc)
            return None

    @property
    def active(self) -> bool:
        """Whether a W&B run is open (False when disabled, finished or failed to start)."""
        return self.run is not None and not self._finished

    @property
    def wandb_dir(self) -> Path | None:
        """The W&B run folder (``OUT/wandb/offline-run-...``), or None without a W&B run."""
        if self.run is None:
            return None
        run_dir = self._call("dir", lambda: Path(self.run.dir).parent)
        return run_dir

    @property
    def wandb_file(self) -> Path | None:
        """The run's ``.wandb`` transaction log (readable with ``wandb leet inspect --json``), or None."""
        run_dir = self.wandb_dir
        if run_dir is None:
            return None
        files = sorted(run_dir.glob("*.wandb"))
        return files[0] if files else None

    # -- logging ----------------------------------------------------------------------------------------------
    def log_step(self, record: Mapping[str, Any]) -> None:
        """Log one optimizer step: a JSON line in ``history.jsonl`` (flushed) and ``wandb.log(..., step=step)``.

        Args:
            record: must hold ``step`` (1-based optimizer step, int); the other numeric fields go to W&B under
                :func:`wandb_key` names, None values are written to JSONL only.

        Raises:
            ValueError: if ``record`` has no integer ``step``.
        """
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"a step record needs an integer 'step' (1-based optimizer step), got {step!r}")
        line = json.dumps(jsonable(record))
        self._jsonl.write(line + "\n")
        self._jsonl.flush()
        self.last_step = step if self.last_step is None else max(self.last_step, step)
        if self.active:
            payload = _wandb_payload(record)
            self._call("log", lambda: self.run.log(payload, step=step))

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """Log one epoch's record (``epoch``, ``step``, ``epsilon``, ``mi``, ``test_accuracy``,
        ``noise_multiplier``, ...): its :data:`EPOCH_WANDB_FIELDS` go to W&B at ``step`` (the last optimizer step
        of the epoch) and the row is kept for the per-epoch table logged by :meth:`finish`."""
        row = jsonable(dict(record))
        self.epochs.append(row)
        if self.active:
            payload = _wandb_payload({k: v for k, v in row.items() if k in EPOCH_WANDB_FIELDS})
            step = row.get("step")
            kwargs = self._step_kwargs(step if isinstance(step, int) else None)
            self._call("log", lambda: self.run.log(payload, **kwargs))

    def restore_epochs(self, records: list[Mapping[str, Any]], *, last_step: int | None = None) -> None:
        """Take over the epoch records of an interrupted run (for the final per-epoch table), without logging
        them again; ``last_step``: the last optimizer step already logged by that run."""
        self.epochs = [jsonable(dict(r)) for r in records]
        if last_step is not None:
            self.last_step = last_step

    def _step_kwargs(self, step: int | None = None) -> dict[str, int]:
        """``step=`` for a W&B log call: ``step`` if given, else the last optimizer step logged (so that
        images and tables land on the final step rather than on a step of their own)."""
        step = self.last_step if step is None else step
        return {} if step is None else {"step": step}

    def log_image(self, path: str | os.PathLike, key: str) -> None:
        """Log an image file (e.g. the trade-off PNG) to W&B under ``key``; a no-op without a W&B run."""
        if not self.active:
            return
        wandb = self._wandb
        kwargs = self._step_kwargs()
        self._call("image", lambda: self.run.log({key: wandb.Image(str(path))}, **kwargs))

    def _log_epoch_table(self) -> None:
        if not self.epochs:
            return
        wandb = self._wandb
        columns = list(EPOCH_COLUMNS)
        data = [[_table_value(row.get(c)) for c in columns] for row in self.epochs]

        def log() -> None:
            table = wandb.Table(columns=columns, data=data)
            chart = wandb.plot.scatter(
                table, "epsilon", "test_accuracy", title="test accuracy vs ε (one point per epoch)"
            )
            self.run.log({"epochs/table": table, "epochs/accuracy_vs_epsilon": chart}, **self._step_kwargs())

        self._call("table", log)

    def finish(self, summary: Mapping[str, Any] | None = None, *, exit_code: int = 0) -> None:
        """Close the run: write ``summary.json`` (when ``summary`` is given), log the per-epoch table and
        scatter chart, set the W&B run summary (the summary's fields, plus those of :data:`SUMMARY_WANDB_KEYS`
        under their W&B keys) and finish the W&B run. Idempotent.

        Args:
            summary: the run summary (JSON-able mapping), e.g. what :func:`adaptive_dp.training.train` returns.
            exit_code: 0 for success; non-zero marks the W&B run failed.
        """
        if self._finished:
            return
        try:
            if summary is not None:
                self.summary_path.write_text(json.dumps(jsonable(summary), indent=2) + "\n", encoding="utf-8")
            if self.active:
                self._log_epoch_table()
                if summary is not None:
                    clean = jsonable(summary)
                    clean.update({key: clean[f] for f, key in SUMMARY_WANDB_KEYS.items() if f in clean})
                    self._call("summary", lambda: self.run.summary.update(clean))
                self._call("finish", lambda: self.run.finish(exit_code=exit_code))
        finally:
            self._finished = True
            self._jsonl.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, at most :data:`WARNING_TEXT_CHARS` characters."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return text if len(text) <= WARNING_TEXT_CHARS else text[: WARNING_TEXT_CHARS - 1] + "…"


def _table_value(value: Any) -> Any:
    """A W&B table cell: numbers as floats (None and non-finite values as None)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def read_history(path: str | os.PathLike, *, torn_tail_ok: bool = False) -> list[dict[str, Any]]:
    """The step records of a ``history.jsonl`` file, in order.

    Args:
        torn_tail_ok: drop an unreadable LAST line (a crash in the middle of writing it) instead of raising;
            :func:`read_history_tail` returns that line too.

    Raises:
        FileNotFoundError: if the file does not exist.
        json.JSONDecodeError: on an unreadable line (except a torn last one with ``torn_tail_ok``).
    """
    records, torn = read_history_tail(path)
    if torn is not None and not torn_tail_ok:
        json.loads(torn)  # raises the decoder's error, with its position
    return records


def read_history_tail(path: str | os.PathLike) -> tuple[list[dict[str, Any]], str | None]:
    """The readable records of a ``history.jsonl`` file and its torn last line (None when the file ends in
    a complete record): the record a crash interrupted while it was being written.

    Raises:
        FileNotFoundError: if the file does not exist.
        json.JSONDecodeError: on an unreadable line before the last one.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "history.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no history at {path}: train with `adaptive-dp train --out DIR` first")
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    try:
        records += [json.loads(line) for line in lines[-1:]]
    except json.JSONDecodeError:
        return records, lines[-1].rstrip("\n")
    return records, None


def read_wandb_records(path: str | os.PathLike, *, timeout: float = 60.0) -> list[dict[str, Any]]:
    """The records of an offline W&B run's transaction log, decoded with ``wandb leet inspect --json``.

    Args:
        path: a ``.wandb`` file, a run folder holding one, or a ``wandb`` folder (its latest run).
        timeout: seconds to wait for the reader.

    Returns:
        One dict per record (``type`` is "history", "summary", "config", "run", ...); a history record's
        values are under ``record["history"]["item"]`` and its step under ``record["history"]["step"]["num"]``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        RuntimeError: if the reader fails (its stderr is in the message).
    """
    import subprocess
    import sys

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no W&B run at {path}: pass a run-*.wandb file or its offline-run-* folder")
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"`wandb leet inspect --json {path}` failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def wandb_history(path: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """Step → logged values of an offline W&B run (see :func:`read_wandb_records`)."""
    rows: dict[int, dict[str, Any]] = {}
    for record in read_wandb_records(path):
        if record.get("type") == "history":
            history = record["history"]
            rows[int(history.get("step", {}).get("num", 0))] = history["item"]
    return rows
