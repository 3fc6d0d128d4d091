"""Two segmentation networks built from plain Keras layers, as alternatives to the segmentation-models U-Net.

`build_plain_unet` is the original 2-D U-Net shape (Ronneberger et al., 2015) with batch normalisation: every
encoder level is a "double convolution" (two 3x3 convolutions, each followed by batch norm and ReLU) and a 2x2 max
pool; after a double-convolution bottleneck, every decoder level up-samples with a 2x2 transposed convolution,
concatenates the encoder output of the same resolution (the skip connection) and applies another double
convolution. Filters start at `base_filters` and double at every level down.

`build_vnet` is a small 3-D V-Net (Milletari et al., 2016) working on volumes laid out (D, H, W, C). Each stage is
one to three 3x3x3 convolutions with batch norm and PReLU, wrapped in a residual connection (the stage input is
added to the last convolution's output, through a 1x1x1 projection when the channel counts differ). Stages go
down by a 2x2x2 convolution of stride 2 that doubles the filters and up by a 2x2x2 transposed convolution,
whose output is concatenated with the encoder stage of the same resolution before the decoder stage.

Both end in a 1x1(x1) convolution to `classes` logits and a softmax layer named `probabilities` that computes in
float32 whatever the global mixed-precision policy is. The input, named `image`, is float32 and has no fixed
spatial size, but every spatial dimension must be a multiple of 2**depth: each level halves it, and the
up-sampled tensors must line up with their skip connections again.

Batch norm uses momentum 0.9 instead of Keras' 0.99 for the reason given in `livernode.training.model`: short runs
would otherwise validate and export a network whose moving statistics do not yet describe the data.
"""

from __future__ import annotations

from livernode.training.model import INPUT_NAME, N_CLASSES, import_tf

BN_MOMENTUM = 0.9


def _keras():
    _, tf = import_tf()
    return tf.keras


def _check(channels: int, classes: int, base_filters: int, depth: int) -> None:
    for name, value, low in (("channels", channels, 1), ("classes", classes, 2), ("base_filters", base_filters, 1),
                             ("depth", depth, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, not {value!r}")


def _head(keras, x, classes: int, conv):
    """1x1 convolution to the class logits and a float32 softmax."""
    logits = conv(classes, 1, padding="same", name="logits")(x)
    return keras.layers.Activation("softmax", name="probabilities", dtype="float32")(logits)


# --- plain 2-D U-Net -----------------------------------------------------------------------------------------


def _double_conv(keras, x, filters: int, name: str):
    for i in (1, 2):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer="he_normal",
                                name=f"{name}_conv{i}")(x)
        x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn{i}")(x)
        x = keras.layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def build_plain_unet(channels: int = 1, classes: int = N_CLASSES, base_filters: int = 32, depth: int = 4):
    """The original U-Net shape with batch norm; input (None, None, channels) float32, H and W multiples of
    2**depth; output (None, H, W, classes) float32 softmax probabilities."""
    _check(channels, classes, base_filters, depth)
    keras = _keras()
    inp = keras.Input((None, None, channels), name=INPUT_NAME, dtype="float32")
    x = inp
    skips = []
    for level in range(depth):
        x = _double_conv(keras, x, base_filters * 2**level, f"enc{level}")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    x = _double_conv(keras, x, base_filters * 2**depth, "bottleneck")
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = keras.layers.Conv2DTranspose(filters, 2, strides=2, kernel_initializer="he_normal",
                                         name=f"dec{level}_up")(x)
        x = keras.layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = _double_conv(keras, x, filters, f"dec{level}")
    out = _head(keras, x, classes, keras.layers.Conv2D)
    return keras.Model(inp, out, name="unet_plain")


# --- small 3-D V-Net -----------------------------------------------------------------------------------------


def _prelu(keras, name: str):
    # one slope per channel: a slope per voxel would need a fixed input size
    return keras.layers.PReLU(shared_axes=[1, 2, 3], name=name)


def _conv_bn_act(keras, x, conv, filters: int, kernel: int, name: str, strides: int = 1):
    x = conv(filters, kernel, strides=strides, padding="same", use_bias=False, kernel_initializer="he_normal",
             name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return _prelu(keras, f"{name}_prelu")(x)


def _residual_stage(keras, x, filters: int, n_convs: int, name: str):
    """n_convs 3x3x3 convolutions; the stage input (projected if its width differs) is added before the last
    activation."""
    shortcut = x
    if x.shape[-1] != filters:
        shortcut = keras.layers.Conv3D(filters, 1, use_bias=False, kernel_initializer="he_normal",
                                       name=f"{name}_proj")(x)
        shortcut = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_proj_bn")(shortcut)
    for i in range(1, n_convs + 1):
        x = keras.layers.Conv3D(filters, 3, padding="same", use_bias=False, kernel_initializer="he_normal",
                                name=f"{name}_conv{i}")(x)
        x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn{i}")(x)
        if i < n_convs:
            x = _prelu(keras, f"{name}_prelu{i}")(x)
    x = keras.layers.Add(name=f"{name}_add")([x, shortcut])
    return _prelu(keras, f"{name}_prelu")(x)


def build_vnet(channels: int = 1, classes: int = N_CLASSES, base_filters: int = 16, depth: int = 4):
    """A small residual 3-D V-Net; input (None, None, None, channels) float32 laid out (D, H, W, C), every spatial
    dimension a multiple of 2**depth; output (None, D, H, W, classes) float32 softmax probabilities."""
    _check(channels, classes, base_filters, depth)
    keras = _keras()
    inp = keras.Input((None, None, None, channels), name=INPUT_NAME, dtype="float32")
    x = inp
    skips = []
    for stage in range(depth):
        filters = base_filters * 2**stage
        x = _residual_stage(keras, x, filters, min(stage + 1, 3), f"enc{stage}")
        skips.append(x)
        x = _conv_bn_act(keras, x, keras.layers.Conv3D, filters * 2, 2, f"enc{stage}_down", strides=2)
    x = _residual_stage(keras, x, base_filters * 2**depth, min(depth + 1, 3), "bottleneck")
    for stage in reversed(range(depth)):
        filters = base_filters * 2**stage
        x = _conv_bn_act(keras, x, keras.layers.Conv3DTranspose, filters, 2, f"dec{stage}_up", strides=2)
        x = keras.layers.Concatenate(name=f"dec{stage}_concat")([x, skips[stage]])
        x = _residual_stage(keras, x, filters, min(stage + 1, 3), f"dec{stage}")
    out = _head(keras, x, classes, keras.layers.Conv3D)
    return keras.Model(inp, out, name="vnet")


def count_params(model) -> int:
    """Trainable and non-trainable weights (batch-norm moving statistics included), as Keras' summary counts."""
    return int(model.count_params())
