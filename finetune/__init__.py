"""finetune: QLoRA fine-tuning of causal language models, driven by YAML recipes."""

__version__ = "0.1.0"


def lazy_exports(package: str, modules: dict[str, list[str]]):
    """A package's public names, `{module: [name, ...]}`, imported from its modules on first use (PEP 562).

    Each package's `__init__` lists what the rest of finetune may use from it; nothing is imported until a
    name is asked for, so `finetune validate` (or the allocator re-exec of `finetune train`) loads no model
    library. Returns `(__all__, __getattr__)` for the package's namespace."""
    import importlib
    import sys

    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return sorted(where), __getattr__
