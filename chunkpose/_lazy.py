"""Lazy package exports: a name is imported from its submodule on first access, so that
importing a package does not pull in heavy dependencies it may not need."""
from importlib import import_module


def lazy_getattr(package: str, exports: dict, namespace: dict):
    """A module-level ``__getattr__`` for `package` resolving `exports` {name: module}
    and caching each value in the package `namespace` (its globals())."""

    def __getattr__(name):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__
