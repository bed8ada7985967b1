"""Progress lines for long steps: at most one per interval, plus the final one."""

import time
from collections.abc import Callable

import dagster as dg


def throttled_log(
    context: dg.AssetExecutionContext, seconds: float = 10.0
) -> Callable[[str, bool], None]:
    """`log(message, final)` writes to the run log when `seconds` have passed or `final` is set."""
    last = time.perf_counter()

    def log(message: str, final: bool = False) -> None:
        nonlocal last
        if final or time.perf_counter() - last > seconds:
            last = time.perf_counter()
            context.log.info(message)

    return log


def partition_progress(
    context: dg.AssetExecutionContext, template: str
) -> Callable[[int, int], None]:
    """`on_progress(done, total)` logging `template.format(done=, total=)` after the partition
    key, throttled as `throttled_log`."""
    log = throttled_log(context)

    def progress(done: int, total: int) -> None:
        line = template.format(done=done, total=total)
        log(f"{context.partition_key}: {line}", done == total)

    return progress
