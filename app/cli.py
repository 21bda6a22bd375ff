"""The `alto` command: run, worker, serve, check, status, openapi, bench, dead-letters."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from typer.exceptions import TyperException

from orchestrator.spec import EngineSpec, PipelineSpec, SpecError, load_pipeline, with_streaming

cli = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="alto: stream partial outputs between LLM pipeline stages.",
)
# soft_wrap: a message is one line however long (rich wrapped at 80 columns, or the
# terminal's width, and a one-line error became two); logs and CI output get grepped
console = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")


def _flush_traces() -> None:
    """Send the spans still batched (when tracing is on), within 2 s."""
    if "opentelemetry.trace" not in sys.modules:
        return
    from opentelemetry import trace

    flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if flush is not None:
        with contextlib.suppress(Exception):  # the process is ending either way
            flush(timeout_millis=2000)


def _exit(code: int) -> None:
    """End the process with `code` once its runtime has stopped. Python joins the threads
    of plain-function calls at exit, so one that hangs would keep the process alive for
    good (a pod until its grace period ends, a terminal until killed): with such calls
    still running, exit without waiting for them. Nothing is lost: a call stopped in
    flight was not acknowledged (its input stays pending for another worker), and one
    past its stage's `timeout_s` has already failed its run."""
    from workers.stagefn import running_plain_calls

    hung = running_plain_calls()
    if hung:
        calls = ", ".join(f"{n} of stage {s!r}" for s, n in sorted(hung.items()))
        console.print(f"[yellow]exiting without waiting for plain-function calls still "
                      f"running in threads[/yellow] ({calls})", soft_wrap=True)
        _hard_exit(code)
    raise typer.Exit(code)


def _hard_exit(code: int) -> None:
    """End the process now: threads are not joined and atexit does not run, so what it
    would flush is flushed first (spans, log handlers, stdio)."""
    _flush_traces()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _load(path: Path, stream: bool = True) -> PipelineSpec:
    try:
        spec = load_pipeline(path)
    except SpecError as exc:
        console.print(f"[red]invalid pipeline[/red] {escape(f'{path}: {exc}')}")
        raise typer.Exit(2) from None
    return spec if stream else with_streaming(spec, False)


def _say_error(message: str) -> None:
    console.print(f"[red]error[/red]: {escape(message)}", soft_wrap=True)  # one line


def _usage(message: str) -> NoReturn:
    """A mistake in how alto was started (an option, a setting): one line, exit 2."""
    _say_error(message)
    raise typer.Exit(2)


def _problems(exc: ValidationError, name: Callable[[tuple[Any, ...]], str],
              show_input: bool = False) -> str:
    """A pydantic error as `name: why; ...` on one line (never the input of a setting,
    which may be a secret)."""
    out = []
    for e in exc.errors():
        why = str(e["msg"]).removeprefix("Value error, ")
        if isinstance(e.get("ctx", {}).get("error"), json.JSONDecodeError):
            why = f"not valid JSON ({why})"
        shown = f" {e['input']!r}" if show_input and "input" in e else ""
        out.append(f"{name(tuple(e['loc']))}{shown}: {why}")
    return "; ".join(out)


def _setting_name(loc: tuple[Any, ...]) -> str:
    head = f"ALTO_{str(loc[0]).upper()}" if loc else "settings"
    return ".".join([head, *(str(x) for x in loc[1:])])


def _engine_options(options: list[str] | None) -> dict[str, Any]:
    """`--engine-opt KEY=VALUE`s: VALUE as JSON where it parses, else as a string."""
    extra: dict[str, Any] = {}
    for opt in options or []:
        k, eq, v = opt.partition("=")
        if not eq or not k:
            _usage(f"--engine-opt {opt!r}: expected KEY=VALUE")
        if k == "kind":
            _usage("--engine-opt kind=...: the engine kind is --engine's")
        try:
            extra[k] = json.loads(v)
        except json.JSONDecodeError:
            extra[k] = v
    return extra


def _engine_spec(kind: str, options: dict[str, Any], kind_from: str,
                 option_from: Callable[[str], str]) -> EngineSpec:
    """The override engine, or exit 2 naming the option or setting that is wrong."""
    try:
        return EngineSpec(**{**options, "kind": kind})
    except ValidationError as exc:
        def name(loc: tuple[Any, ...]) -> str:
            return kind_from if loc and loc[0] == "kind" else option_from(str(loc[0]))

        _usage(f"invalid engine override: {_problems(exc, name, show_input=True)}")


def _engine_override(engine: str | None, options: list[str] | None = None,
                     settings: Any = None) -> EngineSpec | None:
    """The engine of every LM stage: --engine (else ALTO_ENGINE) with ALTO_ENGINE_OPTIONS
    and the --engine-opt options on top, from `settings` when given. One resolution for
    `alto run`, `alto worker` and `alto serve`, so a setting means the same to each; exit
    2 naming the flag or setting that is wrong."""
    return _build_engine(_engine_choice(engine, options, settings))


def _build_engine(choice: _EngineChoice) -> EngineSpec | None:
    """`choice` validated (None without a kind), or exit 2 naming where the bad part came
    from."""
    if choice.kind is None:
        return None
    return _engine_spec(choice.kind, choice.options, choice.kind_from, choice.option_from)


def _check_engines(specs: list[PipelineSpec], override: EngineSpec | None,
                   choice: _EngineChoice, instances: int | None = None,
                   only: set[tuple[str, str]] | None = None) -> None:
    """Build (without starting) every engine the runtime will build (an `alto worker`:
    those of the (pipeline, stage)s `only` names), so a wrong engine option or setting is
    one line naming the engine, exit 2, before anything starts (not a runtime failure,
    nor uvicorn's startup traceback); an optional dependency this machine lacks is one
    line too, exit 1."""
    from app.engine_check import EngineProblem, check_engines

    try:
        check_engines(specs, override, instances, only)
    except EngineProblem as exc:
        what, why = f"engine {exc.engine!r} of pipeline {exc.pipeline!r}", exc.message
        if exc.engine is None:
            what, why = "engine override", f"{choice.named_in(exc.message)}: {exc.message}"
        if exc.usage:
            _usage(f"invalid {what}: {why}")
        _say_error(f"cannot build the {what}: {why}")
        raise typer.Exit(1) from None


@dataclass(frozen=True)
class _EngineChoice:
    """The override engine's kind and options before validation, and which options the
    command line gave (so an error names the flag or the setting it came from)."""

    kind: str | None
    kind_from: str  # "--engine" or "ALTO_ENGINE"
    options: dict[str, Any]
    from_flags: frozenset[str]

    def option_from(self, key: str) -> str:
        """Where option `key` was given: the flag or the setting."""
        return f"--engine-opt {key}" if key in self.from_flags else f"ALTO_ENGINE_OPTIONS {key}"

    def named_in(self, message: str) -> str:
        """Where the option an engine's error `message` is about was given: the option
        quoted first in it (engines quote the option they refuse before any list of the
        known ones), else the kind's flag or setting."""
        at = {message.find(repr(k)): k for k in self.options if repr(k) in message}
        return self.option_from(at[min(at)]) if at else f"{self.kind_from} {self.kind}"


def _engine_choice(engine: str | None, options: list[str] | None,
                   settings: Any = None) -> _EngineChoice:
    """ALTO_ENGINE/ALTO_ENGINE_OPTIONS (from `settings`) with --engine and --engine-opt
    overriding them, option by option. Options without a kind are refused: nothing would
    use them, and ignoring them silently hides the mistake."""
    env_kind = settings.engine if settings is not None else None
    env_options = dict(settings.engine_options) if settings is not None else {}
    flags = _engine_options(options)
    if "kind" in env_options:
        _usage("ALTO_ENGINE_OPTIONS: has 'kind', which is ALTO_ENGINE's (or --engine's)")
    kind = engine or env_kind or None
    if flags and not kind:
        _usage("--engine-opt needs --engine (or ALTO_ENGINE): it sets an option of the "
               "engine that overrides the pipeline's")
    if env_options and not kind:
        _usage("ALTO_ENGINE_OPTIONS needs ALTO_ENGINE (or --engine): it sets options of "
               "the engine that overrides the pipeline's")
    return _EngineChoice(kind, "--engine" if engine else "ALTO_ENGINE",
                         {**env_options, **flags}, frozenset(flags))


def _redis_url(flag: str | None, settings: Any) -> tuple[str | None, str]:
    """The Redis URL a command uses, and what to call it in messages: --redis-url, else
    ALTO_REDIS_URL (empty or unset: none, i.e. the embedded transport for `alto run` and
    `alto serve`). Exit 2 on a URL redis-py cannot use, before anything connects."""
    from workers.settings import reveal

    url, source = (flag, "--redis-url") if flag else (reveal(settings.redis_url),
                                                      "ALTO_REDIS_URL")
    if url:
        _check_redis_url(url, source)
    return url or None, source


def _check_redis_url(url: str, source: str) -> None:
    """Exit 2 on a URL redis-py cannot use (a wrong scheme, a bad query option), before
    anything connects or starts."""
    from redis.asyncio import ConnectionPool

    from workers.redact import redact_url  # never print a URL's password

    try:
        ConnectionPool.from_url(url)  # parses only: no connection is made
    except (ValueError, TypeError) as exc:
        _usage(f"invalid {source} {redact_url(url)}: {exc}")


async def _make_transport(redis_url: str | None, source: str = "--redis-url"):  # noqa: ANN202 - returns a Transport
    if redis_url:
        from workers.redis_transport import RedisTransport

        _check_redis_url(redis_url, source)
        t = RedisTransport(redis_url)
        try:
            await t.ping()
        except Exception as exc:  # noqa: BLE001 - any connection failure is reported the same way
            from workers.redact import redact_url  # never print a URL's password

            console.print(f"[red]cannot reach Redis at {redact_url(redis_url)}[/red]: "
                          f"{type(exc).__name__}: {exc}")
            raise typer.Exit(1) from None
        return t
    from orchestrator.embedded import EmbeddedTransport

    return EmbeddedTransport()


@cli.command()
def run(
    pipeline: Annotated[Path, typer.Argument(help="pipeline YAML")],
    input: Annotated[str, typer.Option(
        "--input", "-i", help="the run's input text; -: read it from stdin, @PATH: from "
        "that file (as curl -d reads them; @@ for a text that starts with @)")],
    redis_url: Annotated[str | None, typer.Option(
        help="run on Redis, by the `alto worker`s there (they run their own spec and "
        "engines); default ALTO_REDIS_URL; neither set: every stage runs in this process")
    ] = None,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="barrier mode")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON event per line")] = False,
    engine: Annotated[str | None, typer.Option(
        help="override every LM stage's engine kind (or ALTO_ENGINE)")] = None,
    engine_opt: Annotated[list[str] | None, typer.Option(
        "--engine-opt", help="KEY=VALUE engine option (over ALTO_ENGINE_OPTIONS)")] = None,
    deadline: Annotated[float, typer.Option(
        min=0, help="seconds before giving up (and cancelling the run); 0: never")] = 600.0,
) -> None:
    """Run one request through a pipeline and print partial outputs as they arrive.
    `--input -` reads the input from stdin and `--input @PATH` from a file, verbatim
    (`--input @@text` is the text `@text`). With --redis-url, or else ALTO_REDIS_URL,
    the run goes to the `alto worker`s on that Redis; with neither (ALTO_REDIS_URL unset
    or empty) every stage runs in this process. Ctrl-C (SIGINT) or SIGTERM cancels the
    run, as its deadline passing does."""
    from workers.settings import get_settings

    settings = get_settings()
    url, source = _redis_url(redis_url, settings)
    override, choice = None, None
    if url:
        # the workers load the pipeline and build the engines: these would change nothing
        # (ALTO_ENGINE and friends are theirs too, so they are not read here)
        local = [name for name, given in (("--no-stream", no_stream), ("--engine", engine),
                                          ("--engine-opt", engine_opt)) if given]
        if local:
            hint = " (or set ALTO_REDIS_URL= empty to run here)" if source != "--redis-url" else ""
            _usage(f"{', '.join(local)} cannot be combined with {source}: the workers "
                   f"run their own pipeline spec and engines (give it to `alto worker`){hint}")
    else:
        choice = _engine_choice(engine, engine_opt, settings)
        override = _build_engine(choice)
    spec = _load(pipeline, not no_stream)
    if choice is not None:  # embedded: this process builds the engines (on Redis the workers do)
        _check_engines([spec], override, choice, settings.instances)
    from orchestrator.template import is_blank

    text = _input_text(input)
    if spec.input_required and is_blank(text):
        _usage(f"--input: pipeline {spec.name!r} needs an input (input_required), and it "
               "holds no text")
    _exit(asyncio.run(_run(spec, text, url, source, as_json, override, deadline)))


def _input_text(value: str) -> str:
    """What `--input` gives, with curl's conventions for a text too long (or too awkward)
    for a command line: `-` (or `@-`) reads stdin, `@PATH` a file, and `@@...` is the text
    after the first @ (so any text can still be given as it is). Contents are taken
    verbatim (a trailing newline included) and must be UTF-8; exit 2 naming the option
    otherwise. A file's leading UTF-8 byte order mark is dropped: Windows editors write
    one, and it marks the encoding, it is not text the model (or a stage function
    splitting words) should see."""
    if value.startswith("@@"):
        return value[1:]
    if value in ("-", "@-"):
        return _utf8(sys.stdin.buffer.read(), value, "stdin")
    if not value.startswith("@"):
        return value
    if value == "@":
        _usage("--input @: a file name must follow @ (@@ for a text that starts with @)")
    path = Path(value[1:])
    try:
        data = path.read_bytes()
    except OSError as exc:
        _usage(f"--input {value}: cannot read {path}: {_os_reason(exc)} (@@ for a text "
               "that starts with @)")
    return _utf8(data.removeprefix(codecs.BOM_UTF8), value, str(path))


def _utf8(data: bytes, value: str, where: str) -> str:
    """`data` decoded, or exit 2: a run's input is text."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        _usage(f"--input {value}: {where} is not UTF-8 text ({exc.reason} at byte {exc.start})")


async def _cancel_run(transport: Any, run_id: str, code: str, message: str) -> None:
    """End the run as the gateway does (`fail_run`), within 10 s; a failure is said."""
    from workers.client import fail_run

    try:
        async with asyncio.timeout(10):
            await fail_run(transport, run_id, code, message)
    except Exception as exc:  # noqa: BLE001 - say so; the process is ending anyway
        console.print(f"[red]could not cancel run {run_id}[/red]: {type(exc).__name__}: "
                      f"{escape(str(exc))}", soft_wrap=True)


async def _show_events(transport: Any, spec: PipelineSpec, run_id: str, deadline: float,
                       as_json: bool) -> int:
    from app.gateway import public_event
    from app.routes_native import event_payload
    from orchestrator.envelope import strict_json
    from workers.client import follow_run

    code = 0
    try:
        async for _, ev in follow_run(transport, spec, run_id, deadline_s=deadline):
            if as_json:  # the native API's event, as its SSE stream sends it
                print(strict_json(event_payload(public_event(ev))).decode(), flush=True)
                if ev["type"] == "error":
                    code = 1
                continue
            kind = ev["type"]
            if kind == "run":
                console.print(f"[bold]run[/bold] {ev['run']} ({spec.name})")
            elif kind == "partial":
                data = ev["data"]
                text_ = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
                console.print(
                    f"[cyan]{ev['stage']}[/cyan] [dim]{ev['lineage']}[/dim] {escape(text_[:200])}"
                )
            elif kind == "stage_done":
                console.print(f"[green]done[/green] {ev['stage']}")
            elif kind == "result":
                o = ev["output"]
                text_ = o if isinstance(o, str) else json.dumps(o, indent=2, ensure_ascii=False)
                print(text_, flush=True)  # the answer, verbatim (no markup, no wrapping)
            elif kind == "error":
                console.print(f"[red]error[/red] {ev.get('stage', '')}: {escape(ev['message'])}",
                              soft_wrap=True)  # one line, however long: logs get grepped
                code = 1
    except TimeoutError as exc:
        await _cancel_run(transport, run_id, "deadline_exceeded",
                          f"the run did not finish within --deadline ({deadline:g} s)")
        console.print(f"[red]{exc}[/red]; cancelled it", soft_wrap=True)
        code = 1
    return code


class _SaidByTheRun(logging.Filter):
    """`alto run` on its embedded runtime: drops the runner's error record of a stage call
    that failed for an engine (a server it cannot reach, an HTTP error, a broken stream)
    or its `timeout_s`. The run's error event prints that as one line naming the stage
    and the engine; the record repeated it with some 60 lines of httpx internals per
    traceback. A stage function's own exception keeps its record: its traceback points
    into the author's code."""

    def filter(self, record: logging.LogRecord) -> bool:
        from workers.engines.common import EngineError
        from workers.stagefn import StageTimeout

        exc = record.exc_info[1] if isinstance(record.exc_info, tuple) else None
        return record.levelno < logging.ERROR or not isinstance(exc, EngineError | StageTimeout)


async def _run(spec: PipelineSpec, text: str, redis_url: str | None, source: str,
               as_json: bool, override: EngineSpec | None, deadline: float) -> int:
    runner_log, said = logging.getLogger("alto.runner"), _SaidByTheRun()
    runner_log.addFilter(said)
    try:
        return await _run_pipeline(spec, text, redis_url, source, as_json, override, deadline)
    finally:
        runner_log.removeFilter(said)


async def _run_pipeline(spec: PipelineSpec, text: str, redis_url: str | None, source: str,
                        as_json: bool, override: EngineSpec | None, deadline: float) -> int:
    from workers.client import start_run
    from workers.runtime import Runtime

    transport = await _make_transport(redis_url, source)
    runtime = None
    if redis_url is None:
        from workers.settings import get_settings

        runtime = Runtime.embedded(transport, [spec], get_settings(), engine_override=override)
        try:
            await runtime.start()
        except Exception as exc:  # noqa: BLE001
            console.print(f"[red]cannot start the pipeline[/red]: {escape(str(exc))}",
                          soft_wrap=True)
            return 1
    else:  # what the gateway answers with 503 no_workers: the run would wait for nothing
        from workers.redact import redact_url
        from workers.status import missing_stages

        missing = await missing_stages(transport, spec)
        if missing:
            await transport.close()
            console.print(f"[red]no worker serves stage(s) {', '.join(missing)}[/red] of "
                          f"pipeline {spec.name!r} on {redact_url(redis_url)}; start them with "
                          "`alto worker --pipeline FILE --stage NAME`", soft_wrap=True)
            return 1
    # from here a signal cancels the run (its workers stop working on it) before exiting
    signals = _Signals()
    loop = asyncio.get_running_loop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signals, sig)
    code = 0
    try:
        # the run event says its deadline, as the gateway's does (--deadline 0: none)
        run_id = await start_run(transport, spec, text,
                                 meta={"deadline_s": deadline} if deadline > 0 else None)
        show = asyncio.create_task(_show_events(transport, spec, run_id, deadline, as_json))
        stopped = asyncio.ensure_future(signals.first.wait())
        waiters: list[asyncio.Future[Any]] = [show, stopped]
        if runtime is not None:
            waiters.append(asyncio.ensure_future(runtime.wait_failure()))
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if show.done():
            code = show.result()
        elif signals.count:
            show.cancel()
            await asyncio.wait([show])
            assert signals.first_signal is not None
            name = signal.Signals(signals.first_signal).name
            await _cancel_run(transport, run_id, "cancelled",
                              f"`alto run` was stopped ({name}) before the run finished")
            console.print(f"[yellow]{name}[/yellow]: cancelled run {run_id}")
            code = 128 + signals.first_signal
        else:  # a stage runner crashed: say so instead of waiting for the deadline
            show.cancel()
            await asyncio.wait([show])
            assert runtime is not None
            console.print(f"[red]a stage runner crashed[/red]: {escape(repr(runtime.failed()))}")
            code = 1
        for w in waiters[1:]:
            w.cancel()
    finally:
        if runtime is not None:
            # a signal while the runtime stops (an engine that cannot be interrupted at
            # once) ends the process: it is asked to stop and nothing more is to be done
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, _hard_exit, 128 + sig)
            # embedded: the run is over (or cancelled) and nothing outlives this process,
            # so no drain (a hung call would hold it); `_exit` does not wait for threads
            await runtime.stop(drain=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await transport.close()
    return code


@cli.command()
def worker(
    pipeline: Annotated[Path, typer.Option("--pipeline", "-p", help="pipeline YAML")],
    stage: Annotated[str, typer.Option(help="the stage this process serves")],
    redis_url: Annotated[str | None, typer.Option(help="Redis URL (or ALTO_REDIS_URL)")] = None,
    engine: Annotated[str | None, typer.Option(
        help="override the engine kind (or ALTO_ENGINE)")] = None,
    engine_opt: Annotated[list[str] | None, typer.Option(
        "--engine-opt", help="KEY=VALUE engine option (over ALTO_ENGINE_OPTIONS)")] = None,
    concurrency: Annotated[int | None, typer.Option(
        min=1, help="max inputs in flight per instance (or ALTO_CONCURRENCY)")] = None,
    instances: Annotated[int | None, typer.Option(
        min=1, max=256, help="engine instances this process runs, each with its own runner "
        "(or ALTO_INSTANCES; default 1, or one per server of an openai engine's base_url "
        "list; instance i talks to the i-th server; LM stages only: a tool or reduce stage "
        "runs one runner, sized by --concurrency)")] = None,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="barrier mode")] = False,
    metrics_port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="serve /metrics /healthz /readyz "
                                 "here (ALTO_METRICS_PORT; 0: off)")
    ] = None,
) -> None:
    """Serve one stage of a pipeline from Redis until SIGTERM (then drain)."""
    from workers.settings import get_settings

    settings = get_settings()
    url, source = _redis_url(redis_url, settings)
    if not url:
        console.print("[red]--redis-url (or ALTO_REDIS_URL) is required[/red]")
        raise typer.Exit(2)
    spec = _load(pipeline, not no_stream)
    if stage not in spec.by_name:
        console.print(f"[red]pipeline {spec.name!r} has no stage {stage!r}[/red] (has {list(spec.by_name)})")
        raise typer.Exit(2)
    choice = _engine_choice(engine, engine_opt, settings)
    override = _build_engine(choice)
    # the flags over ALTO_INSTANCES / ALTO_CONCURRENCY, as `alto run` and `alto serve`
    # (Runtime.embedded) read those settings: the worker used to ignore them
    instances = _worker_count("--instances", instances, "ALTO_INSTANCES", settings.instances,
                              256)
    concurrency = _worker_count("--concurrency", concurrency, "ALTO_CONCURRENCY",
                                settings.concurrency)
    # its stage's engine, built before Redis is reached: a wrong option is one line, exit
    # 2, as `alto run` and `alto serve` say it (it failed the stage's start, exit 1)
    _check_engines([spec], override, choice, instances, only={(spec.name, stage)})
    if instances is None:
        instances = _default_instances(spec, stage, override)
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": metrics_port})
    _exit(asyncio.run(_worker(spec, stage, url, source, override, concurrency, settings,
                              instances)))


def _worker_count(flag: str, given: int | None, setting: str, configured: int | None,
                  most: int | None = None) -> int | None:
    """A worker's count option: the flag (typer checked its range), else the setting, which
    must be in the flag's range (exit 2 naming it); None when neither is given."""
    if given is not None:
        return given
    if configured is None:
        return None
    if configured < 1 or (most is not None and configured > most):
        bound = f"between 1 and {most}" if most is not None else "at least 1"
        _usage(f"invalid setting {setting}: {configured} is not {bound} ({flag}'s range)")
    return configured


def _default_instances(spec: PipelineSpec, stage: str, override: EngineSpec | None) -> int:
    """One engine instance per worker process (a GPU engine fills its pod), except an
    `openai` engine in front of several servers (its base_url list, or
    ALTO_OPENAI_BASE_URL's): then one per server, so a worker fronting a fleet keeps each
    instance's prompts on one server's prefix cache."""
    from workers.engines import default_instances, fleet

    s = spec.stage(stage)
    if s.kind != "lm":
        return 1
    espec = override or spec.engines[s.engine or "default"]
    return default_instances(espec) if len(fleet(espec)) > 1 else 1


async def _worker(spec: PipelineSpec, stage: str, url: str, source: str,
                  override: EngineSpec | None, concurrency: int | None, settings: Any,
                  instances: int) -> int:
    from app.logs import set_defaults
    from workers.metrics import WorkerMetrics, serve_worker_http
    from workers.runner import RunnerConfig
    from workers.runtime import Runtime, StageSelection

    set_defaults(pipeline=spec.name, stage=stage)
    metrics = WorkerMetrics()
    transport = await _make_transport(url, source)
    config = RunnerConfig.from_settings(settings)
    from workers.tracing import SpanRecorder, combine
    from workers.tracing import configure as configure_tracing

    observer = metrics.observe  # + a span per call when OTEL_EXPORTER_OTLP_ENDPOINT is set
    if configure_tracing("alto-worker"):
        observer = combine(metrics.observe, SpanRecorder().observe)
    runtime = Runtime(transport, [spec], config=config, engine_override=override,
                      instances=instances,
                      policy=settings.policy, observer=observer,
                      concurrency=concurrency)
    # up before the engine loads: probes see a live but not-ready worker meanwhile
    http = None
    if settings.metrics_port:
        try:
            http = await serve_worker_http(metrics, runtime, settings.metrics_host,
                                           settings.metrics_port)
        except OSError as exc:  # the port is taken, the host is not this machine's, ...
            _say_error(f"cannot serve metrics on "
                       f"{_address(settings.metrics_host, settings.metrics_port)}: "
                       f"{_os_reason(exc)}")
            await transport.close()  # nothing else has started
            return 1
    try:
        await runtime.start([StageSelection(spec.name, stage)])
    except Exception as exc:  # noqa: BLE001
        console.print(f"[red]cannot start stage {stage!r}[/red]: {escape(str(exc))}",
                      soft_wrap=True)
        if http is not None:
            http.close()
        await transport.close()
        return 1
    signals = _Signals()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals)
    console.print(f"[green]worker ready[/green] {spec.name}.{stage}")
    waiter = asyncio.create_task(signals.first.wait())
    runners = [asyncio.ensure_future(t) for t in runtime._tasks]
    done, _ = await asyncio.wait([waiter, *runners], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    failure = runtime.failed()
    if not signals.count:  # a runner crashed: the drain starts without a signal, and the
        signals()          # first one to come stops it (as the drain's message says)
    await _drain(runtime, signals.second)
    if http is not None:
        http.close()
    await transport.close()
    if failure is not None:
        console.print(f"[red]worker failed[/red]: {failure}")
        return 1
    return 0


def _address(host: str, port: int) -> str:
    """`host:port`, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _os_reason(exc: OSError) -> str:
    """Why a system call failed, in a few words ("address already in use"): asyncio wraps
    the system's reason in a sentence that repeats the address."""
    if exc.errno is not None and exc.errno > 0:  # (a resolver's errors are negative)
        return os.strerror(exc.errno).lower()
    return (exc.strerror or str(exc)).lower()


class _Signals:
    """SIGTERM/SIGINT counted: the first asks for a drain, the second for a stop. Counted,
    not one event cleared in between, so two signals handled in one loop turn are two."""

    def __init__(self) -> None:
        self.count = 0
        self.first_signal: int | None = None
        self.first = asyncio.Event()
        self.second = asyncio.Event()

    def __call__(self, sig: int | None = None) -> None:
        self.count += 1
        if self.count == 1:
            self.first_signal = sig
        (self.first if self.count == 1 else self.second).set()


async def _drain(runtime: Any, second: asyncio.Event) -> None:
    """Finish what is in flight; a second SIGTERM/SIGINT (`second`) stops at once instead
    (what has not finished stays pending for the other workers, as after a crash)."""
    console.print("[yellow]draining[/yellow]: finishing the calls in flight (another "
                  "SIGTERM/SIGINT stops at once)")
    drain = asyncio.create_task(runtime.stop(drain=True))
    again = asyncio.create_task(second.wait())
    await asyncio.wait([drain, again], return_when=asyncio.FIRST_COMPLETED)
    if not drain.done():
        console.print("[yellow]second signal: stopping without finishing the calls in "
                      "flight[/yellow]; their inputs stay pending for other workers")
        await runtime.stop(drain=False)
        await drain
    again.cancel()


def _serve_settings(
    pipeline: list[Path] | None,
    redis_url: str | None,
    engine: str | None,
    engine_opt: list[str] | None,
    host: str | None,
    port: int | None,
) -> tuple[Any, _EngineChoice]:
    """Settings from ALTO_* with the command line's flags on top, the Redis URL and the
    engine resolved as `alto run` and `alto worker` resolve them (and the engine choice,
    whose errors name the flag or setting); exit 2 on what `create_app` and its lifespan
    would fail on, in one line before uvicorn starts."""
    from pydantic import SecretStr

    from workers.settings import get_settings

    settings = get_settings()
    url, _ = _redis_url(redis_url, settings)
    choice = _engine_choice(engine, engine_opt, settings)
    _build_engine(choice)
    update: dict[str, Any] = {
        "redis_url": SecretStr(url) if url else None,  # model_copy does not validate
        "engine": choice.kind,
        "engine_options": choice.options,
    }
    if pipeline:
        update["pipelines"] = [str(p) for p in pipeline]
    if host:
        update["host"] = host
    if port is not None:
        update["port"] = port
    return settings.model_copy(update=update), choice


@cli.command()
def serve(
    pipeline: Annotated[
        list[Path] | None, typer.Option("--pipeline", "-p", help="pipeline YAML (repeatable)")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="be a pure gateway in front of `alto worker`s on Redis "
                                 "(or ALTO_REDIS_URL)")
    ] = None,
    engine: Annotated[str | None, typer.Option(
        help="override every LM stage's engine (or ALTO_ENGINE)")] = None,
    engine_opt: Annotated[list[str] | None, typer.Option(
        "--engine-opt", help="KEY=VALUE engine option (over ALTO_ENGINE_OPTIONS)")] = None,
    host: Annotated[str | None, typer.Option(help="bind address (ALTO_HOST)")] = None,
    port: Annotated[int | None, typer.Option(
        min=0, max=65535, help="port (ALTO_PORT); 0: any free port")] = None,
) -> None:
    """Serve the HTTP gateway (OpenAI-compatible + native API) with uvicorn."""
    import uvicorn

    from app.main import create_app, engine_override, load_pipelines
    from app.middleware import key_digests
    from workers.redact import redact_url
    from workers.settings import reveal

    settings, choice = _serve_settings(pipeline, redis_url, engine, engine_opt, host, port)
    url = reveal(settings.redis_url)
    try:  # what create_app refuses, as one line (it raises; here it would be a traceback)
        key_digests([reveal(k) or "" for k in settings.api_keys])
        key_digests([reveal(k) or "" for k in settings.admin_api_keys], "ALTO_ADMIN_API_KEYS")
    except ValueError as exc:
        _usage(str(exc))
    try:
        specs = load_pipelines(settings.pipelines)
    except (SpecError, ValueError) as exc:
        console.print(f"[red]invalid pipeline[/red]: {escape(str(exc))}")
        raise typer.Exit(2) from None
    if not url:  # embedded: this process runs every stage (on Redis the workers do)
        _check_functions(specs)
        _check_engines(specs, engine_override(settings), choice, settings.instances)
    app = create_app(settings, specs)
    mode = f"redis {redact_url(url)}" if url else "embedded"

    def announce(port: int) -> None:
        console.print(
            f"[green]alto gateway[/green] http://{_address(settings.host, port)} ({mode}; "
            f"pipelines: {', '.join(s.name for s in specs)})", soft_wrap=True
        )

    if settings.port:  # known now: said before the (maybe slow) startup, as before
        announce(settings.port)
    from app.logs import is_json, own_handler

    # JSON logs: uvicorn's records get a JSON handler like the root's, at uvicorn's level
    # (as its own text handlers would be), instead of its text handlers
    log_config = None
    if is_json():
        own_handler("uvicorn", settings.log_level)
    else:
        log_config = uvicorn.config.LOGGING_CONFIG
    guarded = _StartupGuard(app)
    with _stop_signals_raise() as stopped:
        try:
            config = uvicorn.Config(guarded, host=settings.host, port=settings.port,
                                    log_config=log_config,
                                    log_level=settings.log_level.lower(),
                                    timeout_graceful_shutdown=5)
            _run_uvicorn(config, None if settings.port else announce)
        except SystemExit:  # uvicorn's exit 3 after a failed startup
            if guarded.error is None:
                raise
            error = guarded.error
            _say_error(f"cannot start the gateway: {str(error) or type(error).__name__}")
            _exit(1)
        finally:
            guarded.close()
    _exit(128 + stopped[0] if stopped else 0)


def _run_uvicorn(config: Any, announce: Callable[[int], None] | None) -> None:
    """`uvicorn.run(config's app)`, and `announce(port)` with the port it bound once it
    has: for `--port 0` (any free port) the start line said port 0, the one number a
    client cannot use. Exits 3 after a failed startup, as uvicorn.run does."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if announce is not None and self.started:
                announce(self.servers[0].sockets[0].getsockname()[1])

    config.load_app()
    server = Server(config)
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run
        server.run()
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE


_STARTUP_FAILED = "Application startup failed. Exiting."


class _StartupGuard:
    """The app as `alto serve` hands it to uvicorn, keeping what failed its startup (the
    embedded runtime's: an engine that builds, as checked before, but cannot start, such
    as a model file that is not there) for one line and exit 1, as `alto run` and `alto
    worker` say it. Starlette hands uvicorn the traceback as the failure's message, which
    it logged (40 lines) before exiting 3; here the message is dropped, and so is
    uvicorn's own line, which the one line replaces."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.error: Exception | None = None
        logging.getLogger("uvicorn.error").addFilter(self._quiet)

    def close(self) -> None:
        """Take the filter off uvicorn's logger (a process may serve more than once)."""
        logging.getLogger("uvicorn.error").removeFilter(self._quiet)

    def _quiet(self, record: logging.LogRecord) -> bool:
        return not (self.error is not None and record.getMessage() == _STARTUP_FAILED)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        failed = False

        async def send_quietly(message: Any) -> None:
            nonlocal failed
            if message["type"] == "lifespan.startup.failed":
                failed = True
                message = {"type": message["type"], "message": ""}
            await send(message)

        try:
            await self.app(scope, receive, send_quietly)
        except Exception as exc:
            if failed:  # raised by the startup (not the shutdown)
                self.error = exc
            raise


class _StoppedBy(BaseException):
    """A SIGTERM or SIGINT that reached the handler `_stop_signals_raise` installs. Not an
    Exception, as KeyboardInterrupt is not: asyncio propagates it out of the loop wherever
    it is raised (it logs an Exception raised in a callback and goes on), and no `except
    Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame: Any) -> None:
    raise _StoppedBy(signum)


@contextlib.contextmanager
def _stop_signals_raise() -> Iterator[list[int]]:
    """SIGTERM and SIGINT raise `_StoppedBy` in the block, which ends there; the list it
    yields then holds the signal. Why: uvicorn handles both while it serves, shuts down
    gracefully, restores the handlers it found and raises the signal again. SIGTERM's
    default handler killed the process by the signal (exit -15: no atexit, so the spans
    still batched were lost), and SIGINT's KeyboardInterrupt was swallowed by uvicorn.run
    (exit 0). With this, `alto serve` ends through `_exit(128 + signal)`, what a shell
    reports for a process a signal ended, after its own cleanup."""
    stopped: list[int] = []
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM,
                                                                    signal.SIGINT)}
    try:
        yield stopped
    except _StoppedBy as exc:
        stopped.append(exc.signum)
    finally:  # from here a signal acts as it did before (a second one ends it at once)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_functions(specs: list[PipelineSpec]) -> None:
    """Exit 2 naming the first stage whose function (or responder) does not import, as
    `alto worker` and `alto run` say it when they start that stage."""
    from workers.stagefn import resolve

    for spec in specs:
        for stage in spec.stages:
            field = "responder" if stage.kind == "lm" else "function"
            path = getattr(stage, field)
            if not path:
                continue
            try:
                resolve(path, stage=stage.name, field_name=field)
            except SpecError as exc:
                console.print(f"[red]cannot start stage {stage.name!r}[/red]: {escape(str(exc))}",
                              soft_wrap=True)
                raise typer.Exit(2) from None


@cli.command()
def check(
    pipeline: Annotated[Path, typer.Argument(help="pipeline YAML")],
    strict: Annotated[bool, typer.Option(help="warnings fail the check too (for CI)")] = False,
) -> None:
    """Check a pipeline without running it: the spec, every stage's function and
    responder import and can be called as the runtime calls them, every engine builds
    (nothing is loaded), and no prompt placeholder is left unfilled. Exit 2: invalid
    spec; 1: a problem (or a warning with --strict)."""
    from orchestrator.lint import call_errors, lint
    from workers.engines import build_engine
    from workers.engines.common import MissingSetting
    from workers.stagefn import StageFunction

    spec = _load(pipeline)
    errors: list[str] = []
    warnings = [str(w) for w in lint(spec)]
    engines: dict[str, Any] = {}
    for stage in spec.stages:
        engine = None
        if stage.kind == "lm":
            name = stage.engine or "default"
            if name not in engines:
                try:
                    engines[name] = build_engine(spec.engines[name], 0)
                except (MissingSetting, RuntimeError) as exc:  # up to where it runs: a
                    engines[name] = None  # setting from the environment, vllm installed
                    warnings.append(f"engines.{name}: cannot be built here: {exc}")
                except ValueError as exc:  # a wrong option is wrong everywhere
                    engines[name] = None
                    errors.append(f"engines.{name}: {exc}")
            engine = engines[name]
            if engine is None:
                continue
        try:
            fn = StageFunction(spec, stage, engine)
        except SpecError as exc:
            errors.append(str(exc))
            continue
        errors += call_errors(stage, fn.fn, fn.responder)
    from rich.tree import Tree

    tree = Tree(f"[bold]{spec.name}[/bold] ({'streaming' if spec.streaming else 'barrier'})")
    nodes = {}
    for name in spec.topo_order:
        s = spec.stage(name)
        what = [s.kind, s.framing]
        if s.aggregate_by is not None:
            what.append(f"aggregate_by {s.aggregate_by}")
        if s.kind == "lm":
            what.append(f"engine {s.engine or 'default'} ({spec.engine_for(name).kind})")
        what += [f"{k} {v}" for k, v in (("timeout_s", s.timeout_s), ("retries", s.retries))
                 if v]
        parents = spec.predecessors[name]
        label = f"[bold]{name}[/bold]: {', '.join(what)}"
        if len(parents) > 1:
            label += f" (also after {', '.join(parents[1:])})"
        nodes[name] = (nodes[parents[0]] if parents else tree).add(label)
    Console().print(tree)
    for e in errors:  # one line each, unwrapped: CI logs get grepped
        console.print(f"[red]error[/red] {escape(e)}", soft_wrap=True)
    for w in warnings:
        console.print(f"[yellow]warning[/yellow] {escape(w)}", soft_wrap=True)
    if errors or (strict and warnings):
        raise typer.Exit(1)
    console.print(f"[green]ok[/green] {len(spec.stages)} stages"
                  + (f", {len(warnings)} warning(s)" if warnings else ""))


def on_redis(pipeline: Path, redis_url: str | None,
             work: Callable[[Any, PipelineSpec], Awaitable[T]], why: str = "") -> T:
    """`work(transport, spec)` against the Redis of `--redis-url` (or ALTO_REDIS_URL): the
    operator commands read what workers and gateways share there."""
    from workers.settings import get_settings

    spec = _load(pipeline)
    url, source = _redis_url(redis_url, get_settings())
    if not url:
        console.print(f"[red]--redis-url (or ALTO_REDIS_URL) is required[/red]{why}")
        raise typer.Exit(2)

    async def main() -> T:
        transport = await _make_transport(url, source)
        try:
            return await work(transport, spec)
        finally:
            await transport.close()

    return asyncio.run(main())


@cli.command()
def status(
    pipeline: Annotated[Path, typer.Option("--pipeline", "-p", help="pipeline YAML")],
    redis_url: Annotated[str | None, typer.Option(help="Redis URL (or ALTO_REDIS_URL)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """A pipeline's state on Redis: per stage its live instances and queue, and its
    unresolved dead letters (what /metrics reports, at a terminal)."""
    from dataclasses import asdict

    from workers.status import pipeline_status

    st = on_redis(pipeline, redis_url, pipeline_status)
    if as_json:
        print(json.dumps(asdict(st)))
        return
    from rich.table import Table

    table = Table(title=f"{st.pipeline}: {st.dead_letters} unresolved dead letter(s)")
    for column in ("stage", "instances", "waiting (lag)", "in progress (pending)", "kept"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for s in st.stages:
        style = "red" if s.instances == 0 else None
        table.add_row(s.stage, str(s.instances), str(s.lag), str(s.pending), str(s.length),
                      style=style)
    Console().print(table)


@cli.command()
def openapi(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write to a file")] = None,
) -> None:
    """Print the gateway's OpenAPI document (what it serves at /openapi.json)."""
    from app.main import create_app, openapi_json
    from workers.settings import get_settings

    text = openapi_json(create_app(get_settings(), pipelines=[]))
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as exc:  # a missing directory, no permission, a directory given
        _say_error(f"cannot write {output}: {_os_reason(exc)}")
        raise typer.Exit(1) from None


def _bench_group() -> typer.Typer:
    """`alto bench overhead|streaming|scheduling|soak|recovery`: the commands live in
    bench/cli.py (which imports nothing heavy at module level, so mounting it costs
    `alto run` nothing)."""
    from bench.cli import app as bench_app

    return bench_app


cli.add_typer(_bench_group(), name="bench", help="Benchmarks (results in BENCHMARKS.md).")


def _dead_letters_group() -> typer.Typer:
    from app.deadletters_cli import app as dead_app

    return dead_app


cli.add_typer(_dead_letters_group(), name="dead-letters",
              help="Inspect, replay or drop a pipeline's failed inputs (on Redis).")


def main() -> None:
    # stage functions are named 'package.module:fn' relative to where alto is started,
    # as `python -m` would resolve them
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    from app.logs import configure

    try:
        configure()  # ALTO_LOG_FORMAT=text|json, ALTO_LOG_LEVEL
    except ValueError as exc:
        _say_error(str(exc))
        sys.exit(2)
    try:
        # not standalone: click's usage errors come here instead of typer's error box
        code = cli(standalone_mode=False)
    except KeyboardInterrupt:
        sys.exit(130)
    except TyperException as exc:  # click's (typer vendors click): usage errors, exit 2
        if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help
            _say_error(_click_error(exc))
        sys.exit(exc.exit_code)
    except typer.Abort:
        _say_error("aborted")
        sys.exit(1)
    except ValidationError as exc:
        if exc.title != "Settings":  # a bug, not the environment: the whole traceback
            raise
        # ALTO_* (or .env) that does not validate, wherever a command reads its settings
        _say_error(f"invalid setting {_problems(exc, _setting_name)}")
        sys.exit(2)
    # a command's typer.Exit(code) comes back as its code; a command that returns is done
    sys.exit(code if isinstance(code, int) else 0)


def _click_error(exc: TyperException) -> str:
    """A usage error (a bad option value, a missing argument, an unknown option or
    command) as one line, as alto says its own option and setting mistakes (README:
    "one line naming the option or setting, exit 2"), with where to find the usage:
    typer drew a box of five lines or more around it."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    return f"{message} (see {ctx.command_path} --help)" if ctx is not None else message


if __name__ == "__main__":
    main()
