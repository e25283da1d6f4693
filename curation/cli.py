"""`curation <stage> ...`: one command per stage of `curation.registry`, its flags generated from the stage's config
dataclass (see `curation.stage` for the field metadata). Every stage is resumable: rerun the same command.

    curation <stage> --output OUT [config flags] [--force] [--ray-address ADDR] [--no-progress]
    curation run --output OUT [every in-run stage's flags, as --<stage>-<flag> or unique ones bare] [--no-<stage>]
    curation logs --output OUT [--stage LABEL] [--all]
    curation browse --output OUT [--host 127.0.0.1] [--port 8470]
    curation verify --output OUT [--stage LABEL ...]
    curation make-tiny-models FOLDER

Nothing here names a stage (but the legacy flag table below): a new stage is its module and one registry line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import pathlib
import sys
import types
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from curation import registry
from curation.errors import ConfigError, CurationError

MISSING = dataclasses.MISSING
# Flags every stage command (and `run`) has; a config field may not take these names.
COMMON = ("--output", "--ray-address", "--force", "--no-progress", "--help", "--verbose")
# OSErrors on these paths (the output, a stage's input, export's --to, stats' --captions) are the user's to fix.
USER_PATH_FIELDS = ("input", "to", "captions")
# `curation run` flags of older releases that the generated names do not cover: {old flag: generated flag}.
# An entry whose target no longer exists is ignored. (--caption-model, --caption-batch-size, --dedup-threshold and
# --no-dedup are generated: caption's --model and --batch-size, dedup's --threshold, dedup's skip flag.)
LEGACY_RUN_FLAGS = {
    "--feature-device": "--features-device",  # features' --device
    "--field": "--features-field",  # the text features encode (stats has a --field too, so no bare one is made)
    # caption's, bare before quality (which has them too) joined `curation run`
    "--model": "--caption-model",
    "--batch-size": "--caption-batch-size",
    "--revision": "--caption-revision",
    "--num-threads": "--caption-num-threads",
}


# -- options from config dataclasses ---------------------------------------------------------------------------
@dataclass
class Option:
    """One config field as a flag."""

    path: str  # the field's dotted path in the config: "model.batch_size" (nested configs contribute their fields)
    names: tuple[str, ...]  # the flag without dashes, then its aliases: ("device", "feature-device")
    kwargs: dict[str, Any]  # argparse keywords (type, action, choices, nargs, metavar, help)
    required: bool
    negatable: bool = False  # BooleanOptionalAction: --no-<name> too
    convert: Callable[[Any], Any] = lambda v: v  # parsed value -> field value (nargs lists -> tuples)

    def strings(self, name: str) -> list[str]:
        """The option strings argparse makes of one name."""
        return [f"--{name}", f"--no-{name}"] if self.negatable else [f"--{name}"]


class _Union(argparse.Action):
    """A tuple field that several flags add to (`--include a,b`, and `--include-duplicates` meaning
    `--include duplicate`): each value once, in the order given, whatever the order of the flags."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        given = getattr(namespace, self.dest, ())
        setattr(namespace, self.dest, tuple(dict.fromkeys((*given, *(self.const if self.nargs == 0 else values)))))


def config_options(config_type: type) -> list[Option]:
    """The flags of a config dataclass, nested config dataclasses included, in field order (a field's shorthands,
    flags meaning some of its values, right after it)."""
    options = _options(config_type, (), None)
    seen: dict[str, str] = {}
    for o in options:
        for name in o.names:
            if name in seen:
                raise TypeError(f"{config_type.__name__}: fields {seen[name]} and {o.path} both make --{name}")
            seen[name] = o.path
    return options


def _options(config_type: type, path: tuple[str, ...], defaults: Any) -> list[Option]:
    try:
        hints = typing.get_type_hints(config_type)
    except Exception as exc:  # a type only imported under TYPE_CHECKING: the stage's config cannot make flags
        raise TypeError(f"{config_type.__name__}: cannot resolve its field types for the CLI: {exc}") from exc
    out: list[Option] = []
    for f in dataclasses.fields(config_type):
        if not f.init or f.metadata.get("cli", True) is False:
            continue
        tp, _ = _strip_optional(hints[f.name])
        default = _default(f, defaults)
        if dataclasses.is_dataclass(tp):
            out += _options(tp, (*path, f.name), None if default is MISSING else default)
        else:
            out.append(option := _option(config_type, f, tp, ".".join((*path, f.name)), default))
            for name, values in f.metadata.get("shorthands", {}).items():
                text = f"same as --{option.names[0]} {','.join(values)}"
                kwargs = {"action": _Union, "nargs": 0, "const": tuple(values), "help": text}
                out.append(Option(option.path, (name,), kwargs, False, convert=tuple))
    return out


def _default(f: dataclasses.Field, defaults: Any) -> Any:
    """The field's default: from the enclosing field's default instance if any, else from the dataclass."""
    if defaults is not None:
        return getattr(defaults, f.name)
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _option(config_type: type, f: dataclasses.Field, tp: Any, path: str, default: Any) -> Option:
    meta = f.metadata
    name = f.name.replace("_", "-")
    aliases = tuple(str(a).lstrip("-").replace("_", "-") for a in meta.get("aliases", ()))
    choices = list(meta["choices"]) if meta.get("choices") is not None else None
    kwargs: dict[str, Any] = {"metavar": f.name.upper()}
    negatable, convert = False, (lambda v: v)
    where = f"{config_type.__name__}.{f.name}"
    shown = default
    if tp is bool:
        kwargs.pop("metavar")
        if default is False:
            kwargs["action"], shown = "store_true", MISSING
        else:
            kwargs["action"], negatable = argparse.BooleanOptionalAction, True
            shown = "on" if default is True else MISSING
    elif tp is tuple or typing.get_origin(tp) is tuple:
        elem = _element_type(tp, where)
        if meta.get("nargs") == "+":
            kwargs.update(nargs="+", type=_scalar(elem, where), choices=choices)
            convert = tuple
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        else:
            kwargs.update(type=_comma_separated(_scalar(elem, where), choices))
            if choices:
                kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "},..."
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    elif typing.get_origin(tp) is typing.Literal:
        values = typing.get_args(tp)
        kwargs.update(type=type(values[0]), choices=choices or list(values))
    else:
        kwargs.update(type=_scalar(tp, where), choices=choices)
    if kwargs.get("choices") is None:
        kwargs.pop("choices", None)
    elif "nargs" in kwargs or kwargs.get("metavar") == f.name.upper():
        kwargs.pop("metavar", None)  # argparse shows {a,b,c}
    if meta.get("shorthands"):
        kwargs["action"] = _Union  # the shorthands add to the same field: neither flag replaces the other
    text = str(meta.get("help", ""))
    if kwargs.get("type") is not None and kwargs["type"].__name__.startswith("comma-separated") and "comma" not in text:
        text = f"{text} (comma-separated)".strip()
    if shown is not MISSING and shown is not None and shown != "" and shown != () and "(default" not in text:
        text = f"{text} (default: {shown})".strip()
    kwargs["help"] = text.replace("%", "%%")
    return Option(path, (name, *aliases), kwargs, default is MISSING, negatable, convert)


def _element_type(tp: Any, where: str) -> Any:
    args = [a for a in typing.get_args(tp) if a is not Ellipsis]
    if not args:
        return str
    if len(set(args)) != 1:
        raise TypeError(f"{where}: a tuple of mixed types has no CLI form; mark it metadata cli: False")
    return args[0]


def _scalar(tp: Any, where: str) -> Callable[[str], Any]:
    if tp in (str, int, float, pathlib.Path):
        return tp
    raise TypeError(f"{where}: type {tp!r} has no CLI form; mark it metadata cli: False")


def _comma_separated(elem: Callable[[str], Any], choices: list | None) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        values = tuple(elem(part.strip()) for part in text.split(",") if part.strip())
        bad = [v for v in values if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"invalid choice: {bad[0]!r} (choose from {', '.join(map(str, choices))})")
        return values

    parse.__name__ = f"comma-separated {getattr(elem, '__name__', 'value')} list"  # argparse's "invalid ... value"
    return parse


def make_config(config_type: type, given: dict[str, Any], base: Any = None) -> Any:
    """`config_type` from {dotted field path: value}; fields not given keep the dataclass's defaults.

    A nested config field is built from its own given fields over the enclosing field's default (so a field the
    inner dataclass requires may come from the outer default, as caption's model id does).
    """
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(config_type)
    for f in dataclasses.fields(config_type):
        if not f.init:
            continue
        tp, _ = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            sub = {k.partition(".")[2]: v for k, v in given.items() if k.partition(".")[0] == f.name}
            inner = getattr(base, f.name) if base is not None else _default(f, None)
            if sub or inner is MISSING:
                kwargs[f.name] = make_config(tp, sub, None if inner is MISSING else inner)
        elif f.name in given:
            kwargs[f.name] = given[f.name]
    return dataclasses.replace(base, **kwargs) if base is not None else config_type(**kwargs)


# -- the parser ------------------------------------------------------------------------------------------------
def _stages() -> list[tuple[type, bool]]:
    """(stage class, part of `curation run`), in pipeline order."""
    return [(registry.stage_class(path), in_run) for path, in_run in registry.STAGES]


def _dest(stage: str, path: str) -> str:
    return f"{stage}.{path}"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="output folder or fsspec URL (s3://bucket/prefix)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: an embedded local Ray)")
    p.add_argument("--force", action="store_true", help="redo shards that were made with a different config")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _verbose(p, argparse.SUPPRESS)


def _verbose(p: argparse.ArgumentParser, default: Any = False) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="log one JSON record per shard")


def build_parser() -> argparse.ArgumentParser:
    stages = _stages()
    parser = argparse.ArgumentParser(
        prog="curation",
        description="Curate text-to-image training data: each stage is resumable (rerun the same command). "
        "`curation <command> --help` lists a command's flags.",
    )
    _verbose(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cls, _ in stages:
        if cls.name in ("run", "logs", "browse", "verify", "make-tiny-models"):
            raise TypeError(f"{cls.__name__}: stage name {cls.name!r} is taken by a built-in command")
        # argparse %-formats a command's help (select's "top PCT%"): escaped, it prints as written
        p = sub.add_parser(cls.name, help=cls.help.replace("%", "%%"), description=cls.help)
        _common(p)
        for o in config_options(cls.config_type):
            p.add_argument(
                *(f"--{n}" for n in o.names), dest=_dest(cls.name, o.path), default=argparse.SUPPRESS,
                required=o.required, **o.kwargs,
            )  # fmt: skip
        p.set_defaults(handler=functools.partial(_stage_command, cls))
    _run_parser(sub, [cls for cls, in_run in stages if in_run])

    p = sub.add_parser("logs", help="the output's per-shard log records, one JSON line each")
    p.add_argument("--output", required=True, help="the run's output folder or URL")
    p.add_argument("--stage", default=None, metavar="LABEL", help="one pass only (images, captions, dedup/hashes ...)")
    p.add_argument("--all", action="store_true", help="every attempt of every run (default: each shard's latest)")
    _verbose(p, argparse.SUPPRESS)
    p.set_defaults(handler=_logs)

    p = sub.add_parser("browse", help="a local read-only web app over an output: images, caption sets, filters")
    p.add_argument("--output", required=True, help="the output folder or URL (s3://bucket/prefix)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8470, help="port (default: 8470; 0 picks a free one)")
    _verbose(p, argparse.SUPPRESS)
    p.set_defaults(handler=_browse)

    p = sub.add_parser("verify", help="read every done shard back: files, checksums, indexes, keys between stages")
    p.add_argument("--output", required=True, help="the output folder or URL")
    p.add_argument(
        "--stage", nargs="+", default=None, metavar="LABEL", help="these folders only (images, features ...)"
    )
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: an embedded local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _verbose(p, argparse.SUPPRESS)
    p.set_defaults(handler=_verify)

    p = sub.add_parser("make-tiny-models", help="build tiny random models and quality heads (tests, demo)")
    p.add_argument("folder")
    _verbose(p, argparse.SUPPRESS)
    p.set_defaults(handler=_make_tiny_models)
    return parser


def run_option_strings(in_run: list[type]) -> dict[tuple[str, str], list[str]]:
    """{(stage, flag name): its `run` option strings}: `--<stage>-<flag>` always; the bare `--<flag>` (and its
    aliases) too where no other in-run stage has that name and it clashes with nothing; and `LEGACY_RUN_FLAGS`."""
    options = {cls.name: config_options(cls.config_type) for cls in in_run}
    taken = {*COMMON, *(s for cls in in_run[1:] for s in _switches(cls))}
    for stage, opts in options.items():
        for o in opts:
            taken.update(o.strings(f"{stage}-{o.names[0]}"))
    bare = Counter(s for opts in options.values() for o in opts for n in o.names for s in o.strings(n))
    plan: dict[tuple[str, str], list[str]] = {}
    for stage, opts in options.items():
        for o in opts:
            unique = [n for n in o.names if all(bare[s] == 1 and s not in taken for s in o.strings(n))]
            plan[(stage, o.names[0])] = [f"--{stage}-{o.names[0]}", *(f"--{n}" for n in unique)]
    generated = {s for strings in plan.values() for s in strings}
    for old, new in LEGACY_RUN_FLAGS.items():
        for strings in plan.values():
            if new in strings and old not in generated and old not in taken:
                strings.append(old)
    return plan


def _switches(cls: type) -> list[str]:
    """`curation run`'s flags that turn a stage off (`--no-dedup`), and an opt-in stage on (`--quality`)."""
    return [f"--no-{cls.name}", f"--{cls.name}"] if cls.opt_in else [f"--no-{cls.name}"]


def _run_parser(sub: argparse._SubParsersAction, in_run: list[type]) -> None:
    order = " -> ".join(cls.name for cls in in_run)
    p = sub.add_parser(
        "run",
        help=f"{order} in one go, each stage resumable",
        description=f"{order} on one Ray session, each stage resumable. Every stage's flags are here as "
        "--<stage>-<flag>, and bare (--<flag>) where only one stage has that flag.",
    )
    _common(p)
    for cls in in_run[1:]:
        p.add_argument(f"--no-{cls.name}", dest=f"skip.{cls.name}", action="store_true", help=f"leave {cls.name} out")
        if cls.opt_in:
            p.add_argument(
                f"--{cls.name}", dest=f"enable.{cls.name}", action="store_true",
                help=f"run {cls.name} too (also implied by any of its flags)",
            )  # fmt: skip
    plan = run_option_strings(in_run)
    for cls in in_run:
        group = p.add_argument_group(f"{cls.name}: {cls.help}")
        for o in config_options(cls.config_type):
            # Required fields are checked after parsing: a skipped stage needs none of its own.
            group.add_argument(
                *plan[(cls.name, o.names[0])], dest=_dest(cls.name, o.path), default=argparse.SUPPRESS, **o.kwargs
            )
    p.set_defaults(handler=_run)


# -- configs from parsed arguments -----------------------------------------------------------------------------
def configs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """{stage name: its config} of a parsed stage command or `run` (skipped stages left out), without running."""
    values = vars(args)
    if args.command == "run":
        classes = [cls for cls, in_run in _stages() if in_run and _runs(cls, values)]
    else:
        classes = [registry.get(args.command)]
    configs = {}
    for cls in classes:
        given, missing = {}, []
        for o in config_options(cls.config_type):
            dest = _dest(cls.name, o.path)
            if dest in values:
                given[o.path] = o.convert(values[dest])
            elif o.required:
                missing.append(f"--{o.names[0]}")
        if missing:  # only `run` gets here: argparse checks a stage command's own required flags
            raise ConfigError(f"the following arguments are required for {cls.name}: {', '.join(missing)}")
        configs[cls.name] = make_config(cls.config_type, given)
    return configs


def _runs(cls: type, values: dict[str, Any]) -> bool:
    """Whether `curation run` runs a stage: not left out; an opt-in stage only when turned on or given a flag."""
    if values.get(f"skip.{cls.name}", False):
        return False
    return (
        not cls.opt_in or values.get(f"enable.{cls.name}", False) or any(d.startswith(f"{cls.name}.") for d in values)
    )


# -- commands --------------------------------------------------------------------------------------------------
def _stage_command(cls: type, args: argparse.Namespace) -> int:
    from curation.layout import Layout
    from curation.runner import run

    stage = cls(Layout(args.output), configs_from_args(args)[cls.name])
    result = run(stage, ray_address=args.ray_address, force=args.force, progress=not args.no_progress)
    _print(result.lines())
    _print(stage.outputs())
    return 0


def _run(args: argparse.Namespace) -> int:
    from curation.pipeline import run_pipeline

    configs = configs_from_args(args)
    skip = [cls.name for cls, in_run in _stages() if in_run and cls.name not in configs]
    done = run_pipeline(
        args.output,
        configs,
        ray_address=args.ray_address,
        force=args.force,
        progress=not args.no_progress,
        skip=skip,
        on_stage=lambda stage, result: _print(result.lines()),
    )
    print(f"output: {args.output}")
    for stage, _ in done:
        _print(stage.outputs())
    return 0


def _logs(args: argparse.Namespace) -> int:
    import fsspec

    from curation.errors import SetupError
    from curation.layout import Layout
    from curation.runner import logged_stages, read_logs

    layout = Layout(args.output)
    fs, root = fsspec.core.url_to_fs(args.output)
    if not fs.exists(root):
        raise SetupError(f"the output {args.output} does not exist")
    if args.stage is not None and args.stage not in (stages := logged_stages(layout)):
        has = f"it has logs of: {', '.join(stages)}" if stages else "it has no logs yet"
        raise SetupError(f"no logs of stage {args.stage!r} in {args.output}; {has}")
    for record in read_logs(layout, args.stage, every_attempt=args.all):
        print(json.dumps(record, sort_keys=True))
    return 0


def _browse(args: argparse.Namespace) -> int:
    from curation.browse.app import serve

    return serve(args.output, args.host, args.port)


def _verify(args: argparse.Namespace) -> int:
    """One line per problem found, then a summary; exit 2 when anything was found."""
    from curation.verify import verify

    problems, summary = verify(args.output, args.stage, ray_address=args.ray_address, progress=not args.no_progress)
    _print(problems + summary)
    return 2 if problems else 0


def _make_tiny_models(args: argparse.Namespace) -> int:
    from curation.tiny import make_tiny_models

    for name, path in make_tiny_models(args.folder).items():
        print(f"{name}: {path}")
    return 0


def _print(lines: list[str]) -> None:
    for line in lines:
        print(line)


# -- errors ----------------------------------------------------------------------------------------------------
def user_paths(args: argparse.Namespace) -> list[str]:
    """The paths the user named: --output, and any stage's input/to/captions field."""
    paths = [args.output] if getattr(args, "output", None) else []
    for dest, value in vars(args).items():
        field = dest.rpartition(".")[2]
        if "." in dest and field in USER_PATH_FIELDS and isinstance(value, str | os.PathLike):
            paths.append(os.fspath(value))
    return paths


def is_user_path_error(exc: OSError, paths: list[str]) -> bool:
    """An OSError on one of the user's paths (or our shard writer's, which names the shard in its message)."""
    from curation.shards import ShardWriteError

    names = [os.fspath(n) for n in (exc.filename, exc.filename2) if n is not None]
    if not names:
        return isinstance(exc, ShardWriteError)
    return any(_under(str(n), p) for n in names for p in paths)


def _under(name: str, path: str) -> bool:
    def norm(p: str) -> str:
        p = p.split("://", 1)[1] if "://" in p else os.path.realpath(os.path.abspath(p))
        return p.rstrip("/") or "/"

    name, path = norm(name), norm(path)
    return name == path or name.startswith(path.rstrip("/") + "/")


def _setup_logging(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("curation").setLevel(level)  # also when the caller had configured logging already


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    try:
        return args.handler(args)
    except CurationError as exc:
        return _fail(args, exc)
    except OSError as exc:
        if not is_user_path_error(exc, user_paths(args)):
            raise  # not the user's path: a bug or the environment's, keep the traceback
        return _fail(args, exc)


def _fail(args: argparse.Namespace, exc: BaseException) -> int:
    """A problem the user fixes: one line, exit 2."""
    message = " ".join(str(exc).split("\n")) or type(exc).__name__
    print(f"curation {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
