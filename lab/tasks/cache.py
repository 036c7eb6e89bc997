"""`lab.cache`: the machine's shared pull-through image cache — what it holds, or remove it."""

from __future__ import annotations

import json
from typing import Any

from invoke.context import Context

from lab import logs
from lab.cli import CONFIG_HELP, LOG_OPTIONS, task
from lab.cli import guard as _guard
from lab.cli import setup as _setup
from lab.config import LabConfig


def cache_line(cache: dict[str, Any]) -> str:
    """One status line: running, size on disk, images cached of those the lab needs."""
    if not cache.get("enabled"):
        return "image cache: off (imageCache: false)"
    if "error" in cache:
        return f"image cache: unknown ({cache['error']})"
    if "registries" not in cache:
        return "image cache: on (not asked: --offline)"
    regs = cache["registries"]
    running = [r["upstream"] for r in regs if r["running"]]
    if not any(r["exists"] for r in regs):
        return "image cache: not created yet (`invoke lab.up` creates it)"
    down = [r["upstream"] for r in regs if not r["running"]]
    state = f"running for {', '.join(running)}" if running else "stopped"
    if running and down:
        state += f"; down: {', '.join(down)} (pulled from upstream)"
    return (f"image cache: {state}; {cache['diskKiB'] / 1024:.0f} MiB on disk; "
            f"{cache['imagesCached']}/{cache['imagesNeeded']} of the lab's images cached")


def purge_cache(cfg: LabConfig) -> None:
    from lab.bootstrap import lab_tools
    from lab.imagecache import ImageCache

    log = logs.get("lab")
    removed = _guard(lambda: ImageCache(cfg, lab_tools(cfg, log), log).purge())
    print(f"✓ removed the image cache {', '.join(removed)} and its volumes" if removed
          else "✓ no image cache to remove")


@task(help={
    "config": CONFIG_HELP,
    "purge": "remove the cache containers and their volumes (every lab on the machine)",
    "json": "machine-readable output",
    **LOG_OPTIONS,
})
def cache(c: Context, config: str | None = None, purge: bool = False, json_: bool = False,
          log_format: str | None = None,
          log_level: str | None = None, verbose: bool = False) -> None:
    """The shared image cache: state, size, the lab's images it holds; --purge removes it."""
    cfg = _setup(config, log_format, log_level, verbose)
    if purge:
        purge_cache(cfg)
        return
    from lab.bootstrap import lab_tools
    from lab.imagecache import status

    log = logs.get("lab")
    row = _guard(lambda: status(cfg, lab_tools(cfg, log), log))
    if json_:
        print(json.dumps(row, indent=2))
        return
    print(cache_line(row))
    for ref in row.get("missing", []):
        print(f"  not cached: {ref}")


CACHE_TASKS = (cache,)
