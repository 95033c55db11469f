"""Each provider's options as a typed model: unknown keys refused, values typed.

A typo (``dset``, ``timout``, ``regoin``) used to be ignored at run time; now it is
refused where the user wrote it: a job's ``[provider]`` table (job/validate.py), the
``--option KEY=VALUE`` flag (cli/snapshot.py) or a Python call. This module needs only
pydantic, so the job schema, the CLI and library users read the models without importing
a provider (boto3 alone costs 125 ms).

No ``from __future__ import annotations`` here: the command provider has a field named
``list``, and pydantic would resolve string annotations in the class namespace.
"""

import difflib
import json
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from quiesce.errors import ProviderOptionsError, UsageError

# -- value types ------------------------------------------------------------------------------


def _to_path(value: Any) -> Any:
    """A TOML/CLI string becomes a Path (also under strict validation); "" is refused
    rather than read as the current directory."""
    if isinstance(value, str):
        if not value:
            raise PydanticCustomError("empty_path", "an empty path: leave the key out instead")
        return Path(value)
    if not isinstance(value, Path):
        raise PydanticCustomError("string_type", "Input should be a valid string")
    return value


def _to_argv(value: Any) -> Any:
    """A command as an argv list; a string is split like a shell would (no shell runs)."""
    if isinstance(value, str):
        try:
            value = shlex.split(value)
        except ValueError as e:
            raise PydanticCustomError("argv_split", f"cannot split {value!r}: {e}") from None
    if isinstance(value, list | tuple) and not value:
        raise PydanticCustomError("argv_empty", "an empty command: give the program and its args")
    return list(value) if isinstance(value, tuple) else value


def _to_tags(value: Any) -> Any:
    """Tags as a table, or ``k=v,k2=v2`` (the command line's form)."""
    if not isinstance(value, str):
        return value
    tags = {}
    for part in value.split(",") if value else []:
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            raise PydanticCustomError("bad_tag", f"bad tag {part!r}: write key=value,key2=value2")
        tags[key.strip()] = val.strip()
    return tags


_LVM_SIZE = re.compile(r"\d+(\.\d+)?[bBsSkKmMgGtTpPeE]?")
_LVM_EXTENTS = re.compile(r"\d+%(ORIGIN|VG|FREE|PVS)")


def _lvm_size(value: str) -> str:
    if not (_LVM_EXTENTS.fullmatch(value) or _LVM_SIZE.fullmatch(value)):
        raise PydanticCustomError(
            "lvm_size",
            f"bad LVM snapshot size {value!r}: give an absolute size (512M, 2G) or extents "
            "(20%ORIGIN, 10%VG, 50%FREE)",
        )
    return value


FsPath = Annotated[Path, BeforeValidator(_to_path)]
Argv = Annotated[
    list[Annotated[str, Field(min_length=1)]], Field(min_length=1), BeforeValidator(_to_argv)
]
Tags = Annotated[dict[str, str], BeforeValidator(_to_tags)]
LvmSize = Annotated[str, AfterValidator(_lvm_size)]

# -- the models -------------------------------------------------------------------------------


class ProviderOptions(BaseModel):
    """Base of the option models: frozen, and every key must be a field."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    provider: ClassVar[str] = ""

    def to_options(self) -> dict[str, Any]:
        """The keys that were given, JSON-able: what a manifest records, so that
        ``provider_for(manifest)`` re-creates the same provider."""
        return self.model_dump(mode="json", exclude_unset=True)

    @classmethod
    def parse(
        cls, options: "ProviderOptions | Mapping[str, Any] | None" = None, **kwargs: Any
    ) -> Self:
        """The model from a model, a dict and/or keyword arguments; strings are coerced
        (``"5"`` -> 5.0, ``"false"`` -> False). Raises :class:`ProviderOptionsError`."""
        if isinstance(options, cls) and not kwargs:
            return options
        data = options.to_options() if isinstance(options, ProviderOptions) else options
        data = {**(data or {}), **kwargs}
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise options_error(cls, e.errors(), data) from None

    @classmethod
    def lenient(cls, options: Mapping[str, Any] | None) -> Self:
        """The model from options a manifest or journal recorded: keys this version does
        not know, or whose value it refuses, are dropped (their defaults apply), so that a
        snapshot an older version made can still be mounted and deleted."""
        data = {k: v for k, v in (options or {}).items() if k in cls.model_fields}
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            bad = {err["loc"][0] for err in e.errors() if err["loc"]}
            kept = {k: v for k, v in data.items() if k not in bad}
            try:
                return cls.model_validate(kept)
            except ValidationError as e2:
                raise options_error(cls, e2.errors(), kept) from None


class ReflinkOptions(ProviderOptions):
    """``reflink``: clones the backing file of each volume's loop device."""

    provider: ClassVar[str] = "reflink"
    dest: FsPath | None = Field(
        None, description="directory for the clones, on the image's filesystem"
    )
    mode: Literal["delta", "clone"] = Field(
        "delta",
        description="delta: clone before the freeze, re-clone only what was written since "
        "inside the window; clone: one FICLONE of the whole image inside the window",
    )
    base: bool = Field(
        True,
        description="delta: keep the last snapshot's content (a base file beside the clones) "
        "and seed the next from it, taking from the image only what changed since",
    )


class BtrfsOptions(ProviderOptions):
    """``btrfs``: a read-only snapshot of each subvolume."""

    provider: ClassVar[str] = "btrfs"
    dest: FsPath | None = Field(None, description="snapshot directory, on the same btrfs")


class LvmOptions(ProviderOptions):
    """``lvm``: ``lvcreate --snapshot`` of each logical volume."""

    provider: ClassVar[str] = "lvm"
    size: LvmSize = Field("20%ORIGIN", description="size of thick snapshots: extents or 512M")
    kernel: str | None = Field(None, description="kernel release that decides nesting")
    lvcreate_timeout: PositiveFloat = Field(60.0, description="seconds per lvcreate/lvremove")


class ZfsOptions(ProviderOptions):
    """``zfs``: one ``zfs snapshot`` per pool."""

    provider: ClassVar[str] = "zfs"
    timeout: PositiveFloat = Field(60.0, description="seconds per zfs command")


class EbsOptions(ProviderOptions):
    """``ebs``: EC2 ``CreateSnapshots`` of this instance's volumes."""

    provider: ClassVar[str] = "ebs"
    region: str | None = Field(None, description="AWS region (default: AWS_REGION, profile)")
    profile: str | None = Field(None, description="AWS profile")
    instance_id: str | None = Field(None, description="EC2 instance id (default: DMI tag)")
    sysfs_root: FsPath = Field(Path("/sys"), description="where sysfs is mounted")
    tags: Tags = Field({}, description="snapshot tags: a table, or k=v,k2=v2")
    description: str | None = Field(None, description="snapshot description")
    copy_tags: bool = Field(False, description="copy the volumes' tags to the snapshots")
    wait: bool = Field(True, description="wait until the snapshots complete")
    wait_delay: PositiveFloat = Field(15.0, description="seconds between completion polls")
    wait_attempts: PositiveInt = Field(80, description="completion polls before giving up")


class CommandOptions(ProviderOptions):
    """``command``: any storage CLI, run inside the window."""

    provider: ClassVar[str] = "command"
    create: Argv = Field(
        description="argv of the snapshot command; {name} is the snapshot name",
        examples=[["/usr/local/bin/array-snapshot", "create", "{name}"]],
    )
    delete: Argv | None = Field(None, description="argv that deletes snapshot {id}")
    list: Argv | None = Field(None, description="argv that prints snapshot ids")
    timeout: PositiveFloat = Field(10.0, description="seconds the create command may take")


class QemuGuest(BaseModel):
    """One running guest of the ``qemu`` provider: its agent's socket and its disk images."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(description="the guest's name in snapshot ids and reports")
    agent: FsPath = Field(
        description="host end of the guest's org.qemu.guest_agent.0 channel (unix socket)"
    )
    images: Annotated[list[FsPath], Field(min_length=1)] = Field(
        description="the guest's raw or qcow2 image files, on a reflink filesystem of this host"
    )
    mountpoints: list[str] = Field(
        [], description="guest mount points to freeze (guest-fsfreeze-freeze-list); [] = all"
    )


class QemuOptions(ProviderOptions):
    """``qemu``: freeze running guests through their agent, reflink-clone their images."""

    provider: ClassVar[str] = "qemu"
    guests: Annotated[list[QemuGuest], Field(min_length=1)] = Field(
        description="the guests frozen together (one consistency group)",
        examples=[[{"name": "db", "agent": "/run/qga-db.sock", "images": ["/vm/db.raw"]}]],
    )
    dest: FsPath | None = Field(None, description="clone directory (default: beside the image)")
    agent_timeout: PositiveFloat = Field(
        60.0, description="seconds an agent may take to answer (its freeze runs the guest's hooks)"
    )
    timeout: PositiveFloat = Field(
        30.0, description="host deadline: seconds from the last guest frozen to the thaw"
    )
    freeze: bool = Field(True, description="false: clone without freezing (crash-consistent)")


OPTIONS: dict[str, type[ProviderOptions]] = {
    m.provider: m
    for m in (
        *(ReflinkOptions, BtrfsOptions, CommandOptions, LvmOptions, ZfsOptions, EbsOptions),
        QemuOptions,
    )
}

# -- errors -----------------------------------------------------------------------------------

Style = Literal["python", "flag"]


def _clean(msg: str) -> str:
    return (
        msg.removeprefix("Value error, ")
        .replace("Input should be", "must be")
        .replace("List should", "must")
    )


def option_hint(model: type[ProviderOptions], key: str, style: Style) -> str:
    """How to write a required option, from the field's example."""
    info = model.model_fields.get(key)
    example = info.examples[0] if info is not None and info.examples else None
    if example is None:
        return ""
    if style == "flag":
        shown = " ".join(example) if isinstance(example, list) else str(example)
        return f"--option {key}='{shown}'"
    return f"{key}={example!r}"


def options_error(
    model: type[ProviderOptions], errors: list[Any], data: Mapping[str, Any]
) -> ProviderOptionsError:
    """pydantic's errors for ``model`` as one :class:`ProviderOptionsError`, said in
    Python's syntax and (``for_flags()``) in the command line's (``--option KEY=VALUE``).
    An unknown key first: it is often why a required one looks missing (comand=)."""
    errors = sorted(errors, key=lambda err: err["type"] != "extra_forbidden")
    data = dict(data)

    def said(style: Style) -> tuple[str, str]:
        both = [_describe(model, err, data, style) for err in errors]
        return "; ".join(m for m, _ in both), next((h for _, h in both if h), "")

    keys = [str(err["loc"][0]) if err["loc"] else "" for err in errors]
    message, hint = said("python")
    return ProviderOptionsError(
        message, hint, provider=model.provider, keys=keys, flags=said("flag")
    )


def _describe(
    model: type[ProviderOptions], err: Mapping[str, Any], data: Mapping[str, Any], style: Style
) -> tuple[str, str]:
    key = str(err["loc"][0]) if err["loc"] else ""
    fields = sorted(model.model_fields)
    flag = style == "flag"
    where = f"--option {key}" if flag else f"option {key!r}"
    allowed = f"options of {model.provider}: " + (", ".join(fields) or "none")
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, fields, n=1)
        mean = (close[0] if flag else repr(close[0])) if close else ""
        said = f"{where}: unknown option for provider {model.provider}"
        return said + (f"; did you mean {mean}?" if mean else ""), allowed
    if err["type"] == "missing":
        return (
            f"{where}: required by provider {model.provider}",
            option_hint(model, key, style),
        )
    value = data.get(key)
    if flag and key in data:
        shown = value if isinstance(value, str) else json.dumps(value)
        where = f"--option {key}={shown}"
    elif key in data:
        where = f"option {key}={value!r}"
    return f"{where}: {_clean(str(err['msg']))}", ""


def options_model(provider: str) -> type[ProviderOptions]:
    """The option model of a built-in provider; raises UsageError for an unknown name."""
    model = OPTIONS.get(provider)
    if model is None:
        raise UsageError(
            f"unknown provider {provider!r}", "choose one of: " + ", ".join(sorted(OPTIONS))
        )
    return model


__all__ = [
    "OPTIONS",
    "BtrfsOptions",
    "CommandOptions",
    "EbsOptions",
    "LvmOptions",
    "ProviderOptions",
    "ProviderOptionsError",
    "QemuGuest",
    "QemuOptions",
    "ReflinkOptions",
    "ZfsOptions",
    "options_error",
    "options_model",
]
