import pytest
import torch


def _has_nvdiffrast():
    if not torch.cuda.is_available():
        return False
    try:
        import nvdiffrast.torch  # noqa: F401
    except Exception:
        return False
    return True


def _has_gl():
    try:
        import moderngl

        ctx = moderngl.create_standalone_context(backend="egl")
        ctx.release()
        return True
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    checks = {
        "cuda": (torch.cuda.is_available, "needs CUDA"),
        "nvdiffrast": (_has_nvdiffrast, "needs nvdiffrast on CUDA"),
        "gl": (_has_gl, "needs an EGL OpenGL context"),
    }
    cache = {}
    for item in items:
        for marker, (probe, why) in checks.items():
            if marker in item.keywords:
                if marker not in cache:
                    cache[marker] = probe()
                if not cache[marker]:
                    item.add_marker(pytest.mark.skip(reason=why))
