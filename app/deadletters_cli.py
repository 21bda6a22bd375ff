"""`alto dead-letters list|replay|drop`: the dead-letter queue of a pipeline on Redis
(workers/deadletters.py says what resolving a letter means)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

WHY = ": dead letters live in Redis (an embedded runtime's end with its process)"
app = typer.Typer(no_args_is_help=True, help="Inspect, replay or drop failed inputs.")
err = Console(stderr=True)
out = Console()

PipelineOpt = Annotated[Path, typer.Option("--pipeline", "-p", help="pipeline YAML")]
RedisOpt = Annotated[str | None, typer.Option(help="Redis URL (or ALTO_REDIS_URL)")]
IdsArg = Annotated[list[str] | None, typer.Argument(help="dead-letter ids (from `list`)")]
AllOpt = Annotated[bool, typer.Option("--all", help="every unresolved dead letter")]


def _short(value: Any, width: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@app.command("list")
def list_(
    pipeline: PipelineOpt,
    redis_url: RedisOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="at most this many, oldest first")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON record per line")] = False,
) -> None:
    """List the unresolved dead letters: which stage failed, on which run, why."""
    from app.cli import on_redis
    from workers import deadletters

    async def work(t: Any, spec: Any) -> tuple[list[deadletters.DeadLetter], int]:
        return (await deadletters.unresolved(t, spec.name, limit),
                await deadletters.count(t, spec.name))

    letters, total = on_redis(pipeline, redis_url, work, WHY)
    if as_json:
        for d in letters:
            print(json.dumps({"id": d.entry_id, "stage": d.stage, "run": d.run,
                              "reason": d.reason, "instance": d.instance, "input": d.input,
                              "record": d.record}, ensure_ascii=False))
        return
    table = Table(title=f"dead letters: {len(letters)} of {total} unresolved")
    for column in ("id", "stage", "run", "reason", "input"):
        table.add_column(column, overflow="fold" if column == "id" else "ellipsis")
    for d in letters:
        table.add_row(d.entry_id, d.stage, d.run, escape(_short(d.reason, 80)),
                      escape(_short(d.input, 40)))
    out.print(table)


def _chosen(ids: list[str] | None, every: bool) -> list[str] | None:
    if bool(ids) == every:
        err.print("[red]name dead-letter ids or pass --all[/red] (not both)")
        raise typer.Exit(2)
    return None if every else ids


@app.command()
def replay(pipeline: PipelineOpt, ids: IdsArg = None, every: AllOpt = False,
           redis_url: RedisOpt = None) -> None:
    """Submit each letter's run input again as a new run (after a fix), and resolve it.

    Once per run: a failed run can leave several letters, and replaying one of them
    replays that run and resolves all of its letters, the ones not named too."""
    from app.cli import on_redis
    from workers import deadletters

    chosen = _chosen(ids, every)

    async def work(t: Any, spec: Any) -> dict[str, str]:
        return await deadletters.replay(t, spec, chosen)

    try:
        runs = on_redis(pipeline, redis_url, work, WHY)
    except (LookupError, ValueError) as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from None
    for entry, run in runs.items():
        print(f"{entry} -> {run}")
    err.print(f"replayed {len(runs)} dead letter(s)")


@app.command()
def drop(pipeline: PipelineOpt, ids: IdsArg = None, every: AllOpt = False,
         redis_url: RedisOpt = None) -> None:
    """Resolve letters without replaying them."""
    from app.cli import on_redis
    from workers import deadletters

    chosen = _chosen(ids, every)

    async def work(t: Any, spec: Any) -> int:
        return await deadletters.drop(t, spec.name, chosen)

    try:
        n = on_redis(pipeline, redis_url, work, WHY)
    except LookupError as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from None
    err.print(f"dropped {n} dead letter(s)")
