"""Layer providers: what takes the snapshot (reflink, btrfs, lvm, zfs, ebs, command).

- :func:`get_provider` (:mod:`.registry`): a provider class by name, imported on first use;
- the option models (:mod:`.options`): ``ReflinkOptions``, ``BtrfsOptions``,
  ``LvmOptions``, ``ZfsOptions``, ``EbsOptions``, ``CommandOptions``; a provider is made
  from its model (``ReflinkProvider(ReflinkOptions(dest=...))``) or from keys validated
  into it (``get_provider("reflink")(dest=...)``);
- :class:`Provider`, :class:`Snapshot`, :class:`FreezeMode` (:mod:`.base`).

Exports are lazy: importing the options imports pydantic, never boto3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quiesce.util.lazy import lazy_exports

if TYPE_CHECKING:
    from quiesce.providers.base import FreezeMode, Provider, Snapshot
    from quiesce.providers.options import (
        BtrfsOptions,
        CommandOptions,
        EbsOptions,
        LvmOptions,
        ProviderOptions,
        ProviderOptionsError,
        ReflinkOptions,
        ZfsOptions,
    )
    from quiesce.providers.registry import PROVIDERS, get_options, get_provider

__getattr__ = lazy_exports(
    __name__,
    {
        "BtrfsOptions": ".options:BtrfsOptions",
        "CommandOptions": ".options:CommandOptions",
        "EbsOptions": ".options:EbsOptions",
        "FreezeMode": ".base:FreezeMode",
        "LvmOptions": ".options:LvmOptions",
        "PROVIDERS": ".registry:PROVIDERS",
        "Provider": ".base:Provider",
        "ProviderOptions": ".options:ProviderOptions",
        "ProviderOptionsError": ".options:ProviderOptionsError",
        "ReflinkOptions": ".options:ReflinkOptions",
        "Snapshot": ".base:Snapshot",
        "ZfsOptions": ".options:ZfsOptions",
        "get_options": ".registry:get_options",
        "get_provider": ".registry:get_provider",
    },
)

__all__ = [
    "PROVIDERS",
    "BtrfsOptions",
    "CommandOptions",
    "EbsOptions",
    "FreezeMode",
    "LvmOptions",
    "Provider",
    "ProviderOptions",
    "ProviderOptionsError",
    "ReflinkOptions",
    "Snapshot",
    "ZfsOptions",
    "get_options",
    "get_provider",
]
