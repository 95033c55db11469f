"""The provider registry: a name in a job's ``[provider] type`` to its class, imported on
first use (boto3 alone costs 125 ms)."""

from __future__ import annotations

import importlib

from quiesce.errors import UsageError
from quiesce.providers.base import Provider
from quiesce.providers.options import ProviderOptions, options_model

_BUILTIN = {
    "reflink": "quiesce.providers.reflink:ReflinkProvider",
    "btrfs": "quiesce.providers.btrfs:BtrfsProvider",
    "command": "quiesce.providers.command:CommandProvider",
    "lvm": "quiesce.providers.lvm:LvmProvider",
    "zfs": "quiesce.providers.zfs:ZfsProvider",
    "ebs": "quiesce.providers.ebs:EbsProvider",
    "qemu": "quiesce.providers.qemu:QemuProvider",
}
PROVIDERS: tuple[str, ...] = tuple(sorted(_BUILTIN))  # the names a job's [provider] type takes


def get_provider(name: str) -> type[Provider]:
    """The provider class for ``name``; imported lazily (boto3 costs 125 ms)."""
    target = _BUILTIN.get(name)
    if target is None:
        raise UsageError(f"unknown provider {name!r}", "choose one of: " + ", ".join(PROVIDERS))
    module, _, cls = target.partition(":")
    try:
        provider: type[Provider] = getattr(importlib.import_module(module), cls)
        return provider
    except ImportError as e:
        raise UsageError(f"provider {name!r} is not available: {e}") from None


def get_options(name: str) -> type[ProviderOptions]:
    """The option model of provider ``name``, without importing the provider."""
    return options_model(name)


__all__ = ["PROVIDERS", "get_options", "get_provider"]
