"""The daemon's half installs without TensorFlow: a GPU workstation needs only the base install."""

import subprocess
import sys


def test_daemon_does_not_import_tensorflow():
    """Every module of the daemon and of inference, imported in a fresh interpreter: no TensorFlow, no training."""
    code = ("import importlib, pkgutil, sys, livernode.daemon, livernode.inference\n"
            "names = [m.name for pkg in (livernode.daemon, livernode.inference)\n"
            "         for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.')]\n"
            "for n in names: importlib.import_module(n)\n"
            "bad = [m for m in ('tensorflow', 'tf_keras', 'keras', 'segmentation_models', 'tf2onnx', "
            "'livernode.training', 'livernode.export') if m in sys.modules]\n"
            "print(len(names), bad); sys.exit(1 if bad or len(names) < 20 else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_node_without_ray_configured_never_imports_it():
    """Ray is an optional extra: every daemon module imports without it, and only `backend = "ray"` loads it."""
    code = ("import importlib, pkgutil, sys, livernode.daemon, livernode.batch\n"
            "for m in pkgutil.walk_packages(livernode.daemon.__path__, 'livernode.daemon.'):\n"
            "    importlib.import_module(m.name)\n"
            "from livernode.config import load_daemon_config\n"
            "assert load_daemon_config(None).inference.backend == 'local'\n"
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
