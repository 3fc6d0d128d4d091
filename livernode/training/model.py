"""The ResNet34-UNet and its loss and metrics. The only module that imports segmentation_models.

Targets carry a fourth channel, "tumour labelled", constant per slice. Where it is 0 (CHAOS), the liver target
means "liver or tumour", so the loss and metrics compare it with p(liver) + p(tumour) and ignore the tumour
channel, instead of teaching the network that such slices have no tumour.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from livernode.errors import MissingExtra, TrainingError

N_CLASSES = 3
INPUT_NAME = "image"


def import_tf() -> tuple[Any, Any]:
    """Import segmentation_models and TensorFlow with the environment they need; (sm, tf).

    segmentation-models must see SM_FRAMEWORK and TF_USE_LEGACY_KERAS before TensorFlow is first imported.
    """
    os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import segmentation_models as sm
        import tensorflow as tf
    except ImportError as exc:
        raise MissingExtra(
            f"training needs the 'train' extra ({exc.name} is missing): pip install 'livernode[train]'"
        ) from None
    return sm, tf


def build_model(backbone: str = "resnet34", channels: int = 1, encoder_weights: str | None = None,
                bn_momentum: float = 0.9):
    """U-Net with the named segmentation-models backbone, 3-class softmax, input (None, None, channels) float32.

    `encoder_weights` is None (random init) or a local .h5 file of ImageNet weights for the backbone. ImageNet
    encoders expect 3 channels; for a 1-channel model the grey image is repeated into 3 channels by a parameter-free
    layer in front of the encoder, so the pretrained first convolution is used unchanged.
    """
    sm, tf = import_tf()
    keras = tf.keras
    if backbone not in sm.Backbones.models_names():
        raise TrainingError(f"unknown backbone {backbone!r}; segmentation-models offers {sm.Backbones.models_names()}")
    if encoder_weights is not None:
        path = Path(encoder_weights)
        if not path.is_file():
            raise TrainingError(f"{path}: encoder weights file not found (weights load only from a local .h5 file)")
        encoder_weights = str(path)
    inner_channels = 3 if (encoder_weights and channels == 1) else channels
    try:
        base = sm.Unet(backbone, input_shape=(None, None, inner_channels), classes=N_CLASSES,
                       activation="linear", encoder_weights=encoder_weights)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{encoder_weights}: cannot load encoder weights for {backbone} ({exc})") from None
    # Keras' default batch-norm momentum (0.99) needs hundreds of steps before the moving statistics describe the
    # data, so a short CPU run would validate (and export) a network whose inference mode is still off.
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = bn_momentum
    inp = keras.Input((None, None, channels), name=INPUT_NAME, dtype="float32")
    x = keras.layers.Concatenate(name="grey_to_rgb")([inp, inp, inp]) if inner_channels != channels else inp
    out = base(x)
    # softmax in float32 whatever the compute precision (mixed precision computes the rest in float16)
    out = keras.layers.Activation("softmax", name="probabilities", dtype="float32")(out)
    return keras.Model(inp, out, name=f"unet_{backbone}")


def batchnorm_layers(model) -> list:
    """Every BatchNormalization layer, including those inside nested models."""
    _, tf = import_tf()
    found = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            found.append(layer)
        elif hasattr(layer, "layers"):
            found += batchnorm_layers(layer)
    return found


def recalibrate_batchnorm(model, x) -> None:
    """Set every batch-norm layer's moving statistics to those of the batch `x` under the current weights.

    Moving averages lag behind weights that change quickly (early, high learning rate), and a network evaluated
    with lagging statistics can collapse to "all background" although it trains well. Recalibrating before each
    validation makes the validated (and checkpointed, and exported) network the one the weights describe.
    """
    layers = batchnorm_layers(model)
    saved = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        model(x, training=True)
    finally:
        for layer, m in zip(layers, saved):
            layer.momentum = m


def _effective(tf, y_true, y_pred):
    """(target, prediction, per-class validity) with unlabelled-tumour slices folded into liver-or-tumour."""
    known = y_true[..., 3:4]
    t = y_true[..., :3]
    p = y_pred
    t_merged = tf.concat([t[..., 0:1], t[..., 1:2] + t[..., 2:3], tf.zeros_like(t[..., 2:3])], -1)
    p_merged = tf.concat([p[..., 0:1], p[..., 1:2] + p[..., 2:3], tf.ones_like(p[..., 2:3])], -1)
    t_eff = known * t + (1 - known) * t_merged
    p_eff = known * p + (1 - known) * p_merged
    valid = tf.concat([tf.ones_like(known), tf.ones_like(known), known], -1)
    return t_eff, p_eff, valid


def make_loss(class_weights=(0.2, 1.0, 3.0), focal_weight: float = 1.0, gamma: float = 2.0):
    """Weighted soft Dice loss + categorical focal loss, both aware of the tumour-labelled channel."""
    _, tf = import_tf()
    w = tf.constant(class_weights, tf.float32)
    eps = 1e-5

    def dice_focal_loss(y_true, y_pred):
        y_pred = tf.clip_by_value(y_pred, 1e-7, 1.0 - 1e-7)
        t, p, valid = _effective(tf, y_true, y_pred)
        axes = list(range(len(y_pred.shape) - 1))  # every axis but the classes: slices (b, h, w) or patches (b, d, h, w)
        inter = tf.reduce_sum(t * p * valid, axes)
        denom = tf.reduce_sum((t + p) * valid, axes)
        dice = (2 * inter + eps) / (denom + eps)
        dice_loss = 1.0 - tf.reduce_sum(w * dice) / tf.reduce_sum(w)
        p = tf.clip_by_value(p, 1e-7, 1.0)
        focal = -t * tf.pow(1.0 - p, gamma) * tf.math.log(p) * valid * w
        focal_loss = tf.reduce_mean(tf.reduce_sum(focal, -1))
        return dice_loss + focal_weight * focal_loss

    return dice_focal_loss


def _hard_scores(tf, y_true, y_pred, kind: str):
    # Harden the raw prediction first, then fold it like the target (argmax of a folded p would be wrong).
    t, hard, valid = _effective(tf, y_true, tf.one_hot(tf.argmax(y_pred, -1), N_CLASSES))
    scores = []
    for c in (1, 2):
        tc, pc = t[..., c] * valid[..., c], hard[..., c] * valid[..., c]
        inter = tf.reduce_sum(tc * pc)
        union = tf.reduce_sum(tc) + tf.reduce_sum(pc)
        if kind == "iou":
            scores.append((inter + 1e-5) / (union - inter + 1e-5))
        else:
            scores.append((2 * inter + 1e-5) / (union + 1e-5))
    return tf.reduce_mean(tf.stack(scores))


def make_metrics():
    """IoU and F-score (Dice) of the hard prediction, averaged over liver and tumour."""
    _, tf = import_tf()

    def iou_score(y_true, y_pred):
        return _hard_scores(tf, y_true, y_pred, "iou")

    def f1_score(y_true, y_pred):
        return _hard_scores(tf, y_true, y_pred, "f1")

    return [iou_score, f1_score]


def load_model(path: Path):
    """Load a checkpoint written by `train` (custom loss/metrics are not needed for inference)."""
    _, tf = import_tf()
    try:
        return tf.keras.models.load_model(str(path), compile=False)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{path}: not a loadable checkpoint ({exc})") from None


def as_float32(model):
    """A float32 copy of a checkpoint trained with mixed precision (the same model when it already is float32):
    export always converts float32 weights and compute."""
    _, tf = import_tf()

    def policies(node):
        if isinstance(node, dict):
            if node.get("class_name") in ("Policy", "DTypePolicy") and isinstance(node.get("config"), dict):
                return {**node, "config": {**node["config"], "name": "float32"}}
            return {k: policies(v) for k, v in node.items()}
        if isinstance(node, list):
            return [policies(v) for v in node]
        return "float32" if node == "mixed_float16" else node

    config = model.get_config()
    if policies(config) == config:
        return model
    copy = tf.keras.Model.from_config(policies(config))
    copy.set_weights(model.get_weights())
    return copy


ARCHITECTURES = {"resnet34-unet": ("Unet", None), "unet": ("U-Net", "plain (double convolutions)"),
                 "vnet": ("V-Net", "3-D residual stages")}


def build_network(arch: str, backbone: str, channels: int, encoder_weights: str | None = None):
    """The network `--arch` names: the segmentation-models U-Net with `backbone`, the original U-Net, or the 3-D
    V-Net."""
    if arch == "resnet34-unet":
        if encoder_weights is not None and channels not in (1, 3):
            raise TrainingError(f"ImageNet encoder weights take 1 or 3 channels, not {channels} (model.context "
                                "1 gives 3)")
        return build_model(backbone, channels, encoder_weights)
    if arch in ("unet", "vnet"):
        if encoder_weights is not None:
            raise TrainingError("--encoder-weights needs a pretrained encoder: use --arch resnet34-unet")
        from livernode.training.archs import build_plain_unet, build_vnet

        return build_plain_unet(channels) if arch == "unet" else build_vnet(channels)
    raise TrainingError(f"unknown architecture {arch!r} (resnet34-unet, unet or vnet)")


def describe(arch: str, backbone: str) -> tuple[str, str]:
    """(architecture name, backbone) as the manifest records them."""
    name, fixed = ARCHITECTURES[arch]
    return name, fixed or backbone
