"""The plain U-Net and the 3-D V-Net of livernode.training.archs, at tiny sizes (seconds on 2 CPU cores)."""

import numpy as np
import pytest

from livernode.training.archs import build_plain_unet, build_vnet, count_params
from livernode.training.model import import_tf

_, tf = import_tf()

# (builder, tiny settings, input shape): every spatial size a multiple of 2**depth
CASES = {
    "unet": (build_plain_unet, dict(base_filters=4, depth=3), (2, 32, 32, 1)),
    "vnet": (build_vnet, dict(base_filters=4, depth=2), (2, 16, 16, 16, 1)),
}


@pytest.fixture(autouse=True)
def _fresh_keras():
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(0)
    yield
    tf.keras.backend.clear_session()


def _random_batch(shape, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype("float32")
    labels = rng.integers(0, classes, size=shape[:-1])
    return x, np.eye(classes, dtype="float32")[labels]


@pytest.mark.parametrize("name", CASES)
def test_output_matches_input_shape_and_is_a_distribution(name):
    builder, kw, shape = CASES[name]
    model = builder(**kw)
    assert model.input.name.startswith("image") and model.output_names == ["probabilities"]
    assert model.name == {"unet": "unet_plain", "vnet": "vnet"}[name]
    x, _ = _random_batch(shape)
    y = model(x, training=False).numpy()
    assert y.shape == shape[:-1] + (3,)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)
    assert count_params(model) == model.count_params() > 0


@pytest.mark.parametrize("name", CASES)
def test_other_sizes_channels_and_classes(name):
    builder, kw, shape = CASES[name]
    model = builder(channels=2, classes=4, **kw)
    spatial = (48,) * (len(shape) - 2) if name == "unet" else (8, 16, 24)
    y = model(np.zeros((1, *spatial, 2), "float32"), training=False)
    assert tuple(y.shape) == (1, *spatial, 4)


def test_default_sizes_build():
    assert count_params(build_plain_unet()) == 7_768_419  # README: 7.8 M parameters (batch-norm statistics included)
    assert count_params(build_plain_unet()) > count_params(build_plain_unet(base_filters=16))
    with pytest.raises(ValueError):
        build_plain_unet(depth=0)
    with pytest.raises(ValueError):
        build_vnet(classes=1)


@pytest.mark.parametrize("name", CASES)
def test_float32_output_under_mixed_precision(name):
    builder, kw, shape = CASES[name]
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = builder(**kw)
        x, _ = _random_batch(shape)
        y = model(x, training=False)
        assert model.get_layer("logits").compute_dtype == "float16"  # the policy did apply
        assert model.output.dtype == tf.float32 and y.dtype == tf.float32
        np.testing.assert_allclose(y.numpy().sum(-1), 1.0, atol=1e-3)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("name", CASES)
def test_a_few_steps_reduce_the_loss(name):
    builder, kw, shape = CASES[name]
    model = builder(**kw)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    x, y = _random_batch(shape)
    before = model.evaluate(x, y, batch_size=len(x), verbose=0)
    model.fit(x, y, batch_size=len(x), epochs=8, verbose=0)
    after = model.evaluate(x, y, batch_size=len(x), verbose=0)
    assert np.isfinite(after) and after < before


def _perturb(model):
    """Non-trivial batch-norm statistics and PReLU slopes, so parity tests more than the initial identity."""
    rng = np.random.default_rng(2)
    for layer in model.layers:
        if isinstance(layer, (tf.keras.layers.BatchNormalization, tf.keras.layers.PReLU)):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") if "variance" in w.name
                               else rng.normal(0, 0.3, w.shape).astype("float32") for w in layer.weights])


def _onnx_parity(model, shape):
    import onnxruntime as ort
    import tf2onnx

    _perturb(model)
    spec = [tf.TensorSpec((None,) * (len(shape) - 1) + (1,), tf.float32, name="image")]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=shape).astype("float32")
    ref = model(x, training=False).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_plain_unet_onnx_matches_keras():
    _onnx_parity(build_plain_unet(base_filters=4, depth=3), (1, 32, 32, 1))


def test_vnet_onnx_matches_keras():
    _onnx_parity(build_vnet(base_filters=4, depth=2), (1, 16, 16, 16, 1))
