"""Pydantic models for the TOML configuration files, validated once at the entry point and passed down."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from livernode.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WindowConfig(_Strict):
    """CT window in Hounsfield units mapped to [0, 1]."""

    low: float = -100.0
    high: float = 400.0

    @model_validator(mode="after")
    def _ordered(self) -> "WindowConfig":
        if not self.high > self.low:
            raise ValueError(f"high ({self.high}) must be greater than low ({self.low})")
        return self


class PreprocessConfig(_Strict):
    window: WindowConfig = WindowConfig()
    channels: Literal[1, 3] = 1
    bilateral: bool = False
    size: int = Field(256, ge=32, description="square training and inference size in pixels, a multiple of 32")

    @model_validator(mode="after")
    def _multiple(self) -> "PreprocessConfig":
        if self.size % 32:
            raise ValueError(f"size {self.size} is not a multiple of 32 (U-Net input)")
        return self


class ModelConfig(_Strict):
    arch: Literal["resnet34-unet", "unet", "vnet"] = Field(
        "resnet34-unet", description="resnet34-unet: segmentation-models U-Net with the named backbone; unet: the "
                                     "original U-Net (double convolutions, no pretrained encoder); vnet: a 3-D "
                                     "V-Net on patches resampled to [volume] spacing_mm")
    backbone: str = "resnet34"
    encoder_weights: str | None = Field(
        None, description="None for random init, or a local .h5 file with ImageNet weights for the backbone"
    )
    context: int = Field(0, ge=0, le=3, description="2-D architectures: neighbouring slices on each side fed as "
                                                     "channels (2.5-D); 0: the slice alone")

    @model_validator(mode="after")
    def _context(self) -> "ModelConfig":
        if self.arch == "vnet" and self.context:
            raise ValueError("model.context applies to the 2-D architectures; vnet sees whole volumes")
        return self


class VolumeConfig(_Strict):
    """How the 3-D V-Net sees a volume: resampled to spacing_mm, cut into overlapping patches."""

    spacing_mm: tuple[float, float, float] = Field((3.0, 3.0, 3.0), description="(slice, row, column) mm")
    patch: tuple[int, int, int] = Field((32, 64, 64), description="(slices, rows, columns), multiples of 16")
    overlap: float = Field(0.5, ge=0, lt=1, description="share of a patch its neighbour overlaps at inference")
    batch_size: int = Field(2, ge=1, description="patches per training batch (train.batch_size is for slices)")

    @model_validator(mode="after")
    def _valid(self) -> "VolumeConfig":
        if any(s <= 0 for s in self.spacing_mm):
            raise ValueError(f"spacing_mm {list(self.spacing_mm)} must be positive")
        if any(p < 16 or p % 16 for p in self.patch):
            raise ValueError(f"patch {list(self.patch)}: every side a multiple of 16 (the V-Net halves it 4 times)")
        return self


class AugmentConfig(_Strict):
    enabled: bool = True
    flip: bool = Field(False, description="left-right flips; off: a mirrored abdomen puts the liver on the wrong "
                                          "side, and the node turns every study the right way up")
    rotate_degrees: float = Field(10.0, ge=0, le=45)
    intensity_jitter: float = Field(0.05, ge=0, le=0.5)


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="cosine: decay from learning_rate to 5 % of it over all epochs"
    )
    focal_weight: float = Field(1.0, ge=0)
    class_weights: tuple[float, float, float] = (0.2, 1.0, 3.0)
    steps_per_epoch: int | None = Field(None, ge=1, description="None: one pass over the training slices")
    liver_slices_only_fraction: float = Field(
        0.5, ge=0, le=1, description="share of each batch drawn from slices that contain liver"
    )
    tumour_slices_fraction: float = Field(
        0.375, ge=0, le=1, description="share of each batch drawn from slices with a labelled tumour"
    )
    augment: AugmentConfig = AugmentConfig()


class SplitConfig(_Strict):
    validation: float = Field(0.15, gt=0, lt=1, description="checkpoints are chosen on validation Dice")
    test: float = Field(0.15, ge=0, lt=1)
    seed: int = 0


class TrainingConfig(_Strict):
    """`config/training.toml`."""

    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelConfig = ModelConfig()
    volume: VolumeConfig = VolumeConfig()
    train: TrainConfig = TrainConfig()
    split: SplitConfig = SplitConfig()

    @model_validator(mode="after")
    def _channels(self) -> "TrainingConfig":
        if self.model.context and self.preprocess.channels != 1:
            raise ValueError("preprocess.channels = 3 repeats the grey slice; with model.context the channels are "
                             "the neighbouring slices: leave channels at 1")
        return self

    @property
    def input_channels(self) -> int:
        """Channels of the network input: 2 * context + 1 slices, or the grey slice (repeated) alone."""
        return 2 * self.model.context + 1 if self.model.context else self.preprocess.channels

    @property
    def dims(self) -> int:
        return 3 if self.model.arch == "vnet" else 2


def _describe(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{path}'"
    if not first["loc"]:  # a check across sections names its keys itself
        return f"{source}: {first['msg'].removeprefix('Value error, ')}"
    return f"{source}: key '{path}': {first['msg']}"


def load_training_config(path: Path | None, overrides: dict | None = None) -> TrainingConfig:
    """Read and validate a training TOML file (defaults when `path` is None) with dotted-key `overrides` applied.

    Raises ConfigError naming the file and the offending key's path.
    """
    return _load(TrainingConfig, path, overrides)


def _load(model: type[BaseModel], path: Path | None, overrides: dict | None):
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:  # a folder, no permission, an I/O error
            raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


# ------------------------------------------------------------------------------------------- daemon (serve)
class ServerTlsConfig(_Strict):
    """TLS 1.2+ on the C-STORE listener: our certificate and key, and the CA that signs the peers' certificates.
    With `ca_file` set, a peer without a certificate signed by that CA is refused (mutual authentication)."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None


class NodeConfig(_Strict):
    ae_title: str = Field("LIVERNODE", min_length=1, max_length=16)
    bind: str = "0.0.0.0"
    port: int | None = Field(11112, ge=0, le=65535, description="None: no C-STORE listener (folder mode only)")
    allowed_calling_ae_titles: tuple[str, ...] = Field(
        (), description="empty: any calling AE title; otherwise only these may associate")
    require_called_ae_title: bool = Field(True, description="refuse associations not addressed to ae_title")
    tls: ServerTlsConfig | None = None
    workers: int | None = Field(None, ge=1, le=64, description=(
        "C-STORE receiver processes sharing the port (each association is served whole by one); 1 receives in "
        "the node's own process; default: the number of cores, at most 4"))

    @model_validator(mode="after")
    def _titles(self) -> "NodeConfig":
        for t in self.allowed_calling_ae_titles:
            if not 0 < len(t.strip()) <= 16:
                raise ValueError(f"allowed calling AE title {t!r} must have 1 to 16 characters")
        return self


class PathsConfig(_Strict):
    state: Path = Path("livernode-state")  # spool, index and results; /var/lib/livernode under systemd
    watch: Path | None = None  # a folder to take DICOM files from (any depth)
    output: Path | None = None  # results per study are written here as well as sent


class InferenceConfig(_Strict):
    model: Path | None = None
    providers: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["local", "ray"] = Field(
        "local", description="local: this process runs the model; ray: actors of a Ray cluster do, several studies "
                             "at once (one actor per GPU, or ray_actors on CPUs)")
    ray_address: str = Field("local", description="'local' starts Ray on this machine, bound to 127.0.0.1; "
                                                  "host:port joins a cluster (token authentication on)")
    ray_actors: int = Field(1, ge=1, description="CPU actors when the cluster has no GPU")
    sr_process: bool | None = Field(None, description=(
        "build each SR in a helper process while the SEG is written (local backend); default: where the node may "
        "run on 2 or more cores"))


class StudyConfig(_Strict):
    quiet_seconds: float = Field(30.0, ge=0)
    max_wait_seconds: float = Field(600.0, gt=0)
    min_free_mb: float = Field(1024.0, ge=0)
    max_attempts: int = Field(
        3, ge=1, description="a study whose processing was cut short by a crash this many times becomes failed")


class SelectionConfig(_Strict):
    """Which series of a study to segment. Coverage of the liver decides first; these rules come next."""

    prefer: tuple[str, ...] = Field(
        (), description="regular expressions, matched without regard to case against 'description | kernel | image "
                        "type'; a series matching an earlier one wins, e.g. ['portal|venous|PV']")
    avoid: tuple[str, ...] = Field((), description="patterns of series taken only when nothing else covers as much "
                                                   "liver, e.g. ['arterial', 'lung|bone']")
    segment_all: bool = Field(False, description="segment every usable series that holds the whole liver (one SEG "
                                                 "and SR each), e.g. every contrast phase")
    coverage_step_mm: float = Field(20.0, gt=0, le=100, description="the coverage pass looks at a slice about this "
                                                                     "often inside a series (along the whole study "
                                                                     "when no series holds the whole liver)")

    @model_validator(mode="after")
    def _patterns(self) -> "SelectionConfig":
        for pattern in (*self.prefer, *self.avoid):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {pattern!r} is not a regular expression: {exc}") from None
        return self


class RetentionConfig(_Strict):
    """How long patient data and results stay on the node once nobody is owed anything."""

    keep_delivered_hours: float = Field(72.0, ge=0, description="spool and results of a study whose results were "
                                                                "all delivered, after its last activity")
    keep_failed_hours: float = Field(720.0, ge=0, description="the same for a study that failed")
    max_spool_gb: float | None = Field(None, gt=0, description="above this much spool and results, the oldest "
                                                               "delivered studies go first; None: no cap")
    interval_seconds: float = Field(900.0, gt=0, description="how often the daemon applies the policy")


class TlsConfig(_Strict):
    """TLS 1.2+ for one destination: the CA that signed the peer's certificate, and our client certificate."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None


class DestinationConfig(_Strict):
    ae_title: str = Field(min_length=1, max_length=16)
    host: str
    port: int = Field(ge=1, le=65535)
    tls: TlsConfig | None = None


class SendConfig(_Strict):
    destinations: tuple[str | DestinationConfig, ...] = ()  # "AET@HOST:PORT" or a table with optional tls
    calling_ae_title: str = Field("LIVERNODE", min_length=1, max_length=16)
    max_attempts: int = Field(8, ge=1)
    backoff_seconds: float = Field(10.0, ge=0)
    timeout_seconds: float = Field(30.0, gt=0)


class ObservabilityConfig(_Strict):
    metrics_bind: str = "127.0.0.1"
    metrics_port: int | None = Field(9464, ge=0, le=65535, description="None: no /metrics and /healthz")
    audit_log: Path | None = Path("audit.jsonl")  # relative paths are inside the state folder
    audit_max_mb: float = Field(64.0, gt=0, description="the audit log is rotated at this size")
    audit_backups: int = Field(8, ge=1, description="rotated audit logs kept: audit.jsonl.1 (newest) ... .N")
    stall_seconds: float | None = Field(
        None, gt=0, description="a worker or sender without progress for this long is stuck: /healthz fails and "
                                "WATCHDOG=1 stops, so systemd restarts the node. None: 120 s, or twice "
                                "send.timeout_seconds plus 30 s when that is longer")


class DaemonConfig(_Strict):
    """`config/livernode.toml`."""

    node: NodeConfig = NodeConfig()
    paths: PathsConfig = PathsConfig()
    inference: InferenceConfig = InferenceConfig()
    study: StudyConfig = StudyConfig()
    selection: SelectionConfig = SelectionConfig()
    retention: RetentionConfig = RetentionConfig()
    send: SendConfig = SendConfig()
    observability: ObservabilityConfig = ObservabilityConfig()

    @model_validator(mode="after")
    def _stall_exceeds_a_send(self) -> "DaemonConfig":
        # One send step may legitimately take a connect plus a response timeout without a heartbeat between them,
        # so a shorter stall bound would call a slow but working PACS a hung node.
        stall = self.observability.stall_seconds
        if stall is not None and stall <= 2 * self.send.timeout_seconds:
            raise ValueError(f"observability.stall_seconds ({stall:g}) must exceed twice send.timeout_seconds "
                             f"({self.send.timeout_seconds:g})")
        return self

    def stall_seconds(self) -> float:
        """The stall bound in force: the configured one, or 120 s (more when the send timeout asks for it)."""
        stall = self.observability.stall_seconds
        return stall if stall is not None else max(120.0, 2 * self.send.timeout_seconds + 30)


def load_daemon_config(path: Path | None, overrides: dict | None = None) -> DaemonConfig:
    """Read and validate the daemon's TOML (defaults when None) with dotted-key overrides from the command line."""
    return _load(DaemonConfig, path, overrides)
