"""Versions of the libraries that load shadowmerge's outputs, and the pairs known not to work together.

The package keeps ranges for users; constraints.txt is the tested set. Where an installed pair cannot load
an adapter the way users do (transformers' PEFT integration refuses a peft below its minimum), the
commands that write adapters say so in one line, with the versions to use.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def adapter_loading_warning() -> str | None:
    """A one-line warning when transformers' own adapter loading (add_adapter, set_adapter, active_adapters)
    refuses the installed peft; None when the pair works or either is missing."""
    try:
        from packaging.version import Version
        from transformers.integrations.peft import MIN_PEFT_VERSION

        peft, transformers = version("peft"), version("transformers")
    except (ImportError, PackageNotFoundError):
        return None
    if Version(peft) >= Version(MIN_PEFT_VERSION):
        return None
    return (f"transformers {transformers} needs peft >= {MIN_PEFT_VERSION} for its own adapter loading "
            f"(model.add_adapter, set_adapter, active_adapters), and peft {peft} is installed: load this adapter "
            f"with peft.PeftModel.from_pretrained, or install the tested pair (pip install 'transformers<5.24', see "
            f"docs/versions.md)")
