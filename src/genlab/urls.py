"""Where streamed data may come from, and how it is opened: no shell command ever runs from a file.

webdataset's `gopen` runs whatever follows `pipe:` in a shell. That is a feature when the
person at the keyboard types it (`data.path="pipe:curl -s https://host/shards"`), and a
remote-code hole when the string comes from a file someone else wrote: a run directory's
saved config, a shard index, a config group. So:

- a `pipe:` value opens only when it was typed on this command line (the values of the
  overrides, as Hydra parses them), when `GENLAB_ALLOW_COMMANDS` lists it, or with
  `--trust-run` for a run's saved config; anything else is refused in one sentence
  (`UntrustedCommand`) before anything is opened. The command entry points say what is
  allowed with `commands_allowed`; without it (the Python API) nothing is.
- a shard index names its shards relative to its own location (`shard_url`): no absolute
  path, no `..`, no other scheme, checked when the index is read, before any shard opens;
  under a typed `pipe:` location the names are plain file names, so they cannot add shell syntax.
- object storage (s3://, gs://) goes through fsspec (s3fs, gcsfs), never through a shell:
  no URL is ever put into a command line. http(s):// and hf:// go through webdataset's
  gopen, which runs curl with an argument list (no shell). Local paths are plain `open`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator
from urllib.parse import unquote, urlparse

from genlab.errors import ConfigError

#: Exact `pipe:` commands the user allows on purpose (a JSON list), e.g. from a config file of
#: their own; `genlab train` also sets it for the processes a launcher starts (submitit, SLURM).
ALLOW_COMMANDS_ENV = "GENLAB_ALLOW_COMMANDS"
#: Schemes read through fsspec: (the package each needs, genlab's extra that installs it).
FSSPEC_PACKAGES = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gs"), "gcs": ("gcsfs", "gs")}
#: Schemes webdataset's gopen reads with curl (an argument list, no shell).
CURL_SCHEMES = ("http", "https", "hf")
#: What a shard name under a `pipe:` location may hold: nothing a shell reads as syntax.
SHELL_SAFE = re.compile(r"[A-Za-z0-9._+/-]+")


class UntrustedCommand(ConfigError):
    """A `pipe:` URL that did not come from the person at the keyboard, or a shard index naming
    something outside its own folder; nothing was opened."""


@dataclass(frozen=True)
class _Allowed:
    typed: frozenset[str] = frozenset()  # exact commands typed on this command line
    trust_all: bool = False              # --trust-run: the saved config's commands too
    how: str = ("type it on the genlab command line, or allow it on purpose with "
                f"{ALLOW_COMMANDS_ENV}='[\"pipe:...\"]'")


_ALLOWED: ContextVar[_Allowed] = ContextVar("genlab_allowed_commands", default=_Allowed())


def scheme(url: str) -> str:
    """The URL's scheme in lower case ("" for a local path). `PIPE:` is `pipe:` to gopen too."""
    value = str(url).strip()
    parsed = urlparse(value).scheme.lower()
    return parsed if parsed == "pipe" or "://" in value else ""


def is_command(url: Any) -> bool:
    return isinstance(url, str) and scheme(url) == "pipe"


def is_url(value: Any) -> bool:
    """A URL (or a `pipe:` command) rather than a local path: never made absolute or joined as a Path."""
    return isinstance(value, str) and scheme(value) != ""


def environment_commands() -> frozenset[str]:
    """The commands $GENLAB_ALLOW_COMMANDS lists (a JSON list of exact strings)."""
    raw = os.environ.get(ALLOW_COMMANDS_ENV, "").strip()
    if not raw:
        return frozenset()
    try:
        listed = json.loads(raw)
    except ValueError:
        listed = None
    if not isinstance(listed, list) or not all(isinstance(c, str) for c in listed):
        raise ConfigError(f"{ALLOW_COMMANDS_ENV} must be a JSON list of exact commands, e.g. '[\"pipe:cat a.tar\"]'; "
                          f"it is {raw[:80]!r}.")
    return frozenset(listed)


def command_line_values(words: Iterable[str]) -> frozenset[str]:
    """The `pipe:` values of the key=value overrides among `words`, as Hydra parses them (each
    choice of a sweep too): what the user typed on this command line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [w for w in words if "=" in w and not w.startswith("-")]
    values: set[str] = set()
    parser = OverridesParser.create()
    for word in overrides:
        try:
            (override,) = parser.parse_overrides([word])
        except Exception:  # Hydra refuses it itself, with its own message
            continue
        value = override.value()
        choices = getattr(value, "list", None)
        for v in (choices if isinstance(choices, list) else [value]):
            if is_command(v):
                values.add(v)
    return frozenset(values)


@contextlib.contextmanager
def commands_allowed(typed: Iterable[str] = (), trust_all: bool = False, how: str | None = None) -> Iterator[None]:
    """Within the block, `pipe:` URLs in `typed` (plus $GENLAB_ALLOW_COMMANDS) may open; all of
    them with `trust_all` (a run trusted with --trust-run).

    Args:
        typed: the exact commands the user typed on this command line.
        trust_all: allow every command (the user trusts the run's files on purpose).
        how: the refusal's hint: how this command lets a user trust a command.
    """
    allowed = _Allowed(frozenset(typed) | environment_commands(), trust_all, how or _Allowed.how)
    token = _ALLOWED.set(allowed)
    try:
        yield
    finally:
        _ALLOWED.reset(token)


@contextlib.contextmanager
def passed_on(commands: Iterable[str]) -> Iterator[None]:
    """Within the block, $GENLAB_ALLOW_COMMANDS also lists `commands` (those typed on this command
    line), for this process's Hydra job and for the processes a launcher starts (submitit's jobs
    inherit the environment, a SLURM requeue too); the variable is restored afterwards."""
    commands = frozenset(commands)
    before = os.environ.get(ALLOW_COMMANDS_ENV)
    if commands:
        os.environ[ALLOW_COMMANDS_ENV] = json.dumps(sorted(environment_commands() | commands))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ALLOW_COMMANDS_ENV, None)
        else:
            os.environ[ALLOW_COMMANDS_ENV] = before


def check_command(url: str, key: str, source: str = "") -> None:
    """Refuse a `pipe:` URL the user did not allow (see `commands_allowed`); other URLs pass.

    Args:
        key: the config key holding it ("data.path"); source: the file it was read from.
    """
    allowed = _ALLOWED.get()
    if is_command(url) and not (allowed.trust_all or url in allowed.typed):
        where = f"{source}: " if source else ""
        raise UntrustedCommand(f"{where}{key}={url!r} is a shell command (pipe:) that was not typed on this command "
                               f"line, so nothing was run; if you trust it, {allowed.how}.")


def check_config_commands(cfg: Any, source: str) -> None:
    """`check_command` on every string of a config (a DictConfig, a dict or a list), before
    anything of it is built: a saved config may hide a command under any key."""
    from omegaconf import DictConfig, ListConfig

    def visit(node: Any, path: str) -> None:
        if isinstance(node, (dict, DictConfig)):
            items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
            for key, value in items:
                visit(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, (list, ListConfig)):
            for i, value in enumerate(node):
                visit(value, f"{path}[{i}]")
        elif isinstance(node, str):
            check_command(node, path, source)

    visit(cfg, "")


def join(base: str, name: str) -> str:
    """`name` (genlab's own, e.g. "train.json") under a folder or URL `base`."""
    if is_url(base):
        return base.rstrip("/") + "/" + name
    return str(Path(base).expanduser() / name)


def shard_url(index: str, base: str, name: Any, position: int) -> str:
    """The URL of the shard an index at `index` names `name` (entry `position`), resolved against
    `base`, the index's own folder; refuses any name that would leave it.

    A name is relative: no scheme (so no `pipe:`), no absolute path, no `..` (also %-encoded),
    no backslash; a full URL of the index's own scheme is accepted when it lies inside `base`.
    Under a `pipe:` location the name becomes part of the typed command, so it may hold only
    letters, digits and `._+-/`.

    Raises:
        UntrustedCommand: naming the entry and the rule it breaks.
    """
    def refuse(why: str) -> UntrustedCommand:
        return UntrustedCommand(f"{index}: shardlist[{position}] names {name!r}, {why}; an index may name only "
                                "shards inside its own folder, so nothing was read. Fix the index or pack the data "
                                "again with `genlab data pack SRC OUT`.")

    if not isinstance(name, str) or not name.strip():
        raise refuse("which is not a file name")
    own = scheme(base)
    if scheme(name) or urlparse(name).scheme:  # "x:y" is a scheme to gopen and to fsspec alike
        prefix = base.rstrip("/") + "/"
        if own in ("", "pipe") or scheme(name) != own or not name.startswith(prefix):
            raise refuse(f"a URL ({scheme(name) or urlparse(name).scheme}:) outside the index's own folder")
        name = name[len(prefix):]
    decoded = unquote(name)
    if name.startswith(("/", "~")) or decoded.startswith("/") or "\\" in decoded or "\0" in decoded:
        raise refuse("an absolute path")
    if ".." in decoded.split("/"):
        raise refuse("which climbs out of it (..)")
    if own == "pipe" and not SHELL_SAFE.fullmatch(name):
        raise refuse("which holds characters a shell would read (the index is read through a pipe: command)")
    return join(base, name)


def open_url(url: str, command_ok: bool = False) -> IO[bytes]:
    """A readable binary stream for a local path or a URL, never through a shell unless `command_ok`.

    Args:
        url: a local path, s3:// or gs:// (fsspec), http(s):// or hf:// (curl, no shell), or pipe:.
        command_ok: the caller checked that this `pipe:` URL is allowed (`check_command`).
    """
    kind = scheme(url)
    if kind == "":
        return open(Path(url).expanduser(), "rb")
    if kind == "pipe":
        if not command_ok:
            raise UntrustedCommand(f"{url!r} is a shell command (pipe:) that genlab was not told to run; "
                                   "nothing was run.")
        from webdataset.gopen import gopen

        return gopen(url)
    if kind in FSSPEC_PACKAGES:
        return _open_fsspec(url, kind)
    if kind in CURL_SCHEMES:
        from webdataset.gopen import gopen

        return gopen(url)
    if kind == "file":
        return open(urlparse(url).path, "rb")
    raise ConfigError(f"{url}: genlab reads local paths, s3:// and gs:// (fsspec), http(s):// and hf:// and typed "
                      f"pipe: commands, not {kind}://.")


def _open_fsspec(url: str, kind: str) -> IO[bytes]:
    """Object storage through its fsspec filesystem; the URL goes to the library unchanged.

    `fsspec.filesystem(protocol).open` rather than `fsspec.open`: the latter would also read
    `::` in a URL as a chain of filesystems.
    """
    import fsspec

    try:
        fs = fsspec.filesystem(kind)
    except ImportError:
        package, extra = FSSPEC_PACKAGES[kind]
        raise ConfigError(f"reading {kind}:// needs the {package} package, which is not installed: "
                          f"pip install {package} (or pip install 'genlab[{extra}]').") from None
    return fs.open(url, "rb")
