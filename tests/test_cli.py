"""The generated CLI: real parsing of every registered stage, cheap real runs, and the one-line/traceback split."""

from __future__ import annotations

import errno
import json
import logging
import re
import runpy
import sys
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from curation import registry
from curation.cli import build_parser, config_options, configs_from_args, main, make_config, run_option_strings
from curation.errors import SetupError
from curation.ingest import IngestStage
from curation.layout import Layout
from curation.shards import ShardWriteError
from curation.stage import Stage
from tests.conftest import REPO

EXAMPLES = REPO / "examples" / "folder"


# -- a tiny stage of our own, registered for one test at a time ------------------------------------------------
@dataclass(frozen=True)
class ToyInner:
    model: str = field(metadata={"help": "required here, defaulted by the enclosing field"})
    size: int = field(default=4, metadata={"help": "an int"})


@dataclass(frozen=True)
class ToyConfig:
    inner: ToyInner = field(default_factory=lambda: ToyInner(model="m0"))
    sizes: tuple[int, ...] = field(default=(1, 2), metadata={"help": "comma-separated"})
    names: tuple[str, ...] = field(default=(), metadata={"help": "several values", "nargs": "+"})
    mode: str = field(default="a", metadata={"help": "one of two", "choices": ["a", "b"], "aliases": ["old-mode"]})
    clean: bool = field(default=True, metadata={"help": "on by default"})
    loud: bool = field(default=False, metadata={"help": "off by default"})
    limit: float | None = field(default=None, metadata={"help": "optional"})
    internal: int = field(default=0, metadata={"cli": False})


class ToyStage(Stage):
    name = "toy"
    help = "a stage of the tests"
    config_type = ToyConfig

    def passes(self, ctx):
        return iter(())


class FailingStage(IngestStage):
    """Ingest whose check() raises what the test sets: our own code failing, no library mocked."""

    name = "failing"
    help = "ingest that fails in check()"
    error: ClassVar[BaseException] = ZeroDivisionError("division by zero")

    def check(self) -> None:
        raise type(self).error


@pytest.fixture
def register(monkeypatch):
    def add(cls: type, in_run: bool = False) -> None:
        monkeypatch.setattr(registry, "STAGES", [*registry.STAGES, (f"{__name__}:{cls.__name__}", in_run)])

    return add


@pytest.fixture
def curation_log_level():
    logger = logging.getLogger("curation")
    level = logger.level
    yield
    logger.setLevel(level)


def _required_args(cls: type) -> list[str]:
    """Values for a stage's required flags (the parser, not the run, is under test)."""
    out = []
    for o in config_options(cls.config_type):
        if o.required:
            value = o.kwargs.get("choices", [None])[0] or ("1" if o.kwargs.get("type") in (int, float) else "x")
            out += [f"--{o.names[0]}", str(value)]
    return out


def _parse(*argv: str):
    return build_parser().parse_args(list(argv))


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"curation {command}: error: "), err
    return err[0]


# -- the parser --------------------------------------------------------------------------------------------------
def test_help_lists_every_registered_stage(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    printed = capsys.readouterr().out
    for cls in registry.stage_classes():
        assert cls.name in printed and cls.help.split()[0] in printed
    for command in ("run", "logs", "browse", "make-tiny-models"):
        assert command in printed


@pytest.mark.parametrize("cls", registry.stage_classes(), ids=lambda c: c.name)
def test_each_stage_command_accepts_force_and_the_common_flags(cls, capsys):
    args = _parse(cls.name, "--output", "out", *_required_args(cls), "--force", "--no-progress", "--ray-address", "a")
    assert (args.force, args.no_progress, args.ray_address, args.output) == (True, True, "a", "out")
    with pytest.raises(SystemExit):
        main([cls.name, "--help"])
    assert "--force" in capsys.readouterr().out


def test_run_help_keeps_todays_flags(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    printed = capsys.readouterr().out
    for flag in ("--caption-batch-size", "--features-device", "--feature-device", "--caption-model",
                 "--dedup-threshold", "--no-dedup", "--source", "--input", "--shard-size", "--prompt",
                 "--max-new-tokens", "--t5", "--vae", "--resolutions", "--multiscale", "--ingest-workers", "--field",
                 "--max-length", "--dtype", "--vae-tag"):  # fmt: skip
        assert re.search(rf"(?<![\w-]){flag}(?![\w-])", printed), flag


def test_run_builds_the_configs_a_user_expects():
    args = _parse(
        "run", "--source", "folder", "--input", "X", "--output", "Y", "--caption-batch-size", "3",
        "--max-new-tokens", "7", "--resolutions", "256,512", "--feature-device", "cpu",
    )  # fmt: skip
    configs = configs_from_args(args)
    in_run = registry.stage_classes(pipeline_only=True)
    assert [cls.name for cls in in_run if not cls.opt_in] == list(configs), "quality is off unless asked for"
    assert (configs["ingest"].source, configs["ingest"].input) == ("folder", "X")
    for given in (["--quality"], ["--min-aesthetic", "5"], ["--quality-model", "m"]):
        on = configs_from_args(_parse("run", "--source", "folder", "--input", "X", "--output", "Y", *given))
        assert [cls.name for cls in in_run] == list(on), given
    assert on["quality"].model.model == "m" and on["caption"].model.model != "m"
    assert (
        configs_from_args(_parse("run", "--source", "folder", "--input", "X", "--output", "Y", "--model", "m"))[
            "caption"
        ].model.model
        == "m"
    ), "caption's bare --model of earlier releases"
    caption = configs["caption"].model
    assert (caption.batch_size, caption.max_new_tokens) == (3, 7)
    assert caption.model == registry.get("caption").config_type().model.model  # not given: the dataclass default
    assert configs["features"].resolutions == (256, 512) and configs["features"].device == "cpu"
    # The prefixed form of a bare flag, and today's run flags, land on the same fields.
    args = _parse(
        "run", "--source", "folder", "--input", "X", "--output", "Y", "--caption-max-new-tokens", "9",
        "--caption-model", "m", "--dedup-threshold", "3", "--features-device", "cuda", "--ingest-workers", "2",
    )  # fmt: skip
    configs = configs_from_args(args)
    assert (configs["caption"].model.max_new_tokens, configs["caption"].model.model) == (9, "m")
    assert (configs["dedup"].threshold, configs["features"].device, configs["ingest"].workers) == (3, "cuda", 2)
    # --field of old runs is features' (stats has one too, so only the legacy table makes it bare).
    args = _parse("run", "--source", "folder", "--input", "X", "--output", "Y", "--field", "original",
                  "--stats-field", "caption")  # fmt: skip
    configs = configs_from_args(args)
    assert (configs["features"].field, configs["stats"].field) == ("original", "caption")


def test_run_skips_every_stage_but_the_first_by_name():
    in_run = registry.stage_classes(pipeline_only=True)
    for cls in in_run[1:]:
        args = _parse("run", "--source", "folder", "--input", "X", "--output", "Y", f"--no-{cls.name}")
        assert cls.name not in configs_from_args(args)
    with pytest.raises(SystemExit):
        _parse("run", "--source", "folder", "--input", "X", "--output", "Y", f"--no-{in_run[0].name}")


def test_run_flag_of_several_stages_only_prefixed(capsys):
    in_run = registry.stage_classes(pipeline_only=True)
    plan = run_option_strings(in_run)
    owners: dict[str, list[str]] = {}
    for (stage, _), strings in plan.items():
        for s in strings:
            owners.setdefault(s, []).append(stage)
    assert all(len(stages) == 1 for stages in owners.values())  # no string means two things
    shared = {o.names[0] for o in config_options(in_run[0].config_type)} & {
        o.names[0] for cls in in_run[1:] for o in config_options(cls.config_type)
    }
    for name in shared:  # e.g. --workers: ambiguous, so only --ingest-workers, --caption-workers ...
        assert f"--{name}" not in owners
    assert main(["run", "--output", "Y", "--input", "X"]) == 2  # a required flag of a stage that runs
    assert "--source" in _one_error_line(capsys, "run")


def test_generated_flags_follow_the_field_metadata(register):
    register(ToyStage)
    options = {o.path: o for o in config_options(ToyConfig)}
    assert "internal" not in options and not options["inner.model"].required
    args = _parse("toy", "--output", "o", "--model", "m1", "--sizes", "3,4", "--names", "p", "q",
                  "--old-mode", "b", "--no-clean", "--loud", "--limit", "0.5")  # fmt: skip
    config = configs_from_args(args)["toy"]
    assert config == ToyConfig(ToyInner("m1", 4), (3, 4), ("p", "q"), "b", False, True, 0.5)
    assert configs_from_args(_parse("toy", "--output", "o")) == {"toy": ToyConfig()}  # defaults: the dataclass's
    assert make_config(ToyConfig, {"inner.size": 9}).inner == ToyInner("m0", 9)  # over the enclosing default
    for bad in (["--mode", "c"], ["--sizes", "1,x"], ["--limit", "many"]):
        with pytest.raises(SystemExit):
            _parse("toy", "--output", "o", *bad)


def test_a_registered_stage_joins_run_with_no_edit(register, capsys):
    register(ToyStage, in_run=True)
    args = _parse("run", "--source", "folder", "--input", "X", "--output", "Y", "--toy-size", "5", "--sizes", "7")
    assert configs_from_args(args)["toy"] == ToyConfig(ToyInner("m0", 5), sizes=(7,))
    assert "toy" not in configs_from_args(_parse("run", "--source", "folder", "--input", "X", "--output", "Y",
                                                 "--no-toy"))  # fmt: skip
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    printed = capsys.readouterr().out
    for flag in ("--toy-mode", "--old-mode", "--no-toy", "--toy-clean", "--no-toy-clean", "--toy-model"):
        assert re.search(rf"(?<![\w-]){flag}(?![\w-])", printed), flag
    assert "--toy-old-mode" not in printed and "--toy-internal" not in printed  # aliases bare only; cli: False


# -- errors -------------------------------------------------------------------------------------------------------
def _failing(tmp_path, *extra: str) -> list[str]:
    return ["failing", "--source", "folder", "--input", str(EXAMPLES), "--output", str(tmp_path / "out"), *extra]


def test_a_bug_keeps_its_traceback(register, tmp_path):
    register(FailingStage)
    with pytest.raises(ZeroDivisionError):
        main(_failing(tmp_path))


def test_a_setup_error_is_one_line_and_exit_2(register, monkeypatch, tmp_path, capsys):
    register(FailingStage)
    monkeypatch.setattr(FailingStage, "error", SetupError("the output is locked"))
    assert main(_failing(tmp_path)) == 2
    assert _one_error_line(capsys, "failing").endswith("the output is locked")


def test_os_errors_on_the_users_paths_only_are_one_line(register, monkeypatch, tmp_path, capsys):
    register(FailingStage)
    mine = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "images" / "x.tar"))
    monkeypatch.setattr(FailingStage, "error", mine)
    assert main(_failing(tmp_path)) == 2
    assert "No space left on device" in _one_error_line(capsys, "failing")
    monkeypatch.setattr(FailingStage, "error", ShardWriteError("cannot write shard 00000-000: disk full"))
    assert main(_failing(tmp_path)) == 2
    assert "disk full" in _one_error_line(capsys, "failing")
    monkeypatch.setattr(FailingStage, "error", FileNotFoundError(errno.ENOENT, "No such file", "/no/such/lib.so"))
    with pytest.raises(FileNotFoundError):  # not a path the user named: the environment's or a bug
        main(_failing(tmp_path))
    monkeypatch.setattr(FailingStage, "error", OSError("no filename, not the shard writer"))
    with pytest.raises(OSError):
        main(_failing(tmp_path))


def test_ingest_of_a_missing_input_is_one_line(tmp_path, capsys):
    argv = ["ingest", "--source", "folder", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "does not exist" in _one_error_line(capsys, "ingest")
    assert not (tmp_path / "out").exists()


# -- real runs ----------------------------------------------------------------------------------------------------
def test_ingest_then_logs_one_json_line_per_shard_attempt(tmp_path, ray_local, capsys, caplog, curation_log_level):
    out = tmp_path / "out"
    argv = ["ingest", "--source", "folder", "--input", str(EXAMPLES), "--output", str(out), "--shard-size", "2"]
    with caplog.at_level(logging.INFO, logger="curation.shards"):
        assert main(["-v", *argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "[images]" in printed and f"images: {out}/images/" in printed
    shards = Layout(str(out)).images.done_shards()
    assert len(shards) == 2
    assert len([r for r in caplog.records if r.name == "curation.shards"]) == 2  # -v: one record per shard
    assert main(["logs", "--output", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines]
    assert sorted(r["shard"] for r in records) == sorted(shards) and {r["stage"] for r in records} == {"images"}
    assert main(["logs", "--output", str(out), "--stage", "captions"]) == 2  # not a stage this output has
    assert _one_error_line(capsys, "logs").endswith(f"no logs of stage 'captions' in {out}; it has logs of: images")
    assert main(["logs", "--output", str(out / "nope")]) == 2
    assert _one_error_line(capsys, "logs").endswith(f"the output {out / 'nope'} does not exist")
    assert not (out / "nope").exists()

    (out / "images" / f"{shards[0]}.done.json").unlink()  # the shard is redone by the rerun: a second record
    assert main([*argv, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["logs", "--output", str(out), "--all"]) == 0
    history = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["shard"] for r in history] == [shards[0], shards[0], shards[1]]
    first_run, rerun = history[0]["run"], history[1]["run"]
    assert first_run < rerun and history[2]["run"] == first_run
    assert main(["logs", "--output", str(out), "--stage", "images"]) == 0  # each shard's latest record
    latest = {json.loads(line)["shard"]: json.loads(line)["run"] for line in capsys.readouterr().out.splitlines()}
    assert latest == {shards[0]: rerun, shards[1]: first_run}


def test_run_of_the_first_stage_alone(tmp_path, ray_local, capsys):
    skips = [f"--no-{cls.name}" for cls in registry.stage_classes(pipeline_only=True)[1:]]
    out = tmp_path / "out"
    argv = ["run", "--source", "folder", "--input", str(EXAMPLES), "--output", str(out), "--shard-size", "2"]
    assert main([*argv, "--no-progress", *skips]) == 0
    printed = capsys.readouterr().out
    assert "[images] shards: 2 run" in printed and f"output: {out}" in printed and f"images: {out}/images/" in printed
    assert main([*argv, "--no-progress", *skips, "--shard-size", "3"]) == 2  # another config: refused ...
    assert "--force" in _one_error_line(capsys, "run")
    assert main([*argv, "--no-progress", *skips, "--shard-size", "3", "--force"]) == 0  # ... unless --force
    assert len(Layout(str(out)).images.done_shards()) == 2


JOBS = sorted(p.name for p in (REPO / "jobs").glob("*.py") if p.stem not in ("__init__", "demo"))


@pytest.mark.parametrize("job", JOBS)
def test_jobs_reach_their_command(job, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [job, "--help"])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(REPO / "jobs" / job), run_name="__main__")
    assert exit.value.code == 0
    assert "--output" in capsys.readouterr().out
