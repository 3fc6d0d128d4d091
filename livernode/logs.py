"""The node's and the tools' log lines: text or JSON on stderr, the same in every process of a node."""

from __future__ import annotations

import json
import logging

_format = "text"


def current_format() -> str:
    """The format `configure_logging` last set up ("text" until it is called): receiver processes use the same."""
    return _format


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        for key in ("study", "job"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Log lines to stderr as text or JSON; below DEBUG, the libraries' chatter is quieted. Receiver processes
    (daemon/receivers.py) call it too, so their lines look like the node's."""
    global _format
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    if handler in logging.getLogger().handlers:  # basicConfig leaves a root logger already set up alone
        _format = log_format
    if level > logging.DEBUG:  # per-association and per-module chatter from the libraries
        for name in ("pynetdicom", "highdicom", "tf2onnx", "absl", "tensorflow"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # pydicom warns about every non-conforming value and quotes it in full: unbounded log lines that can
        # carry patient data. Our own checks name the file and the reason instead.
        import warnings

        import pydicom.config

        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        logging.getLogger("pydicom").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="pydicom")
