"""The ``reid-aug`` click group. Commands register themselves from sibling modules."""

from __future__ import annotations

import signal
import threading

import click


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch scheduler's time limit), raised where the command is, so a job stops as it
    does on Ctrl-C: ``finally`` blocks remove half-written temporary files and the command says so."""


def _raise_terminated(signum, frame):
    raise Terminated()


class _FlowOrderGroup(click.Group):
    """Lists commands in the order of the data flow (registration order), not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context):
        main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            _end_progress_bars()
            what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            click.echo(f"\n{what}: what was finished is kept; run the same command again to resume", err=True)
            # The shell's codes for Ctrl-C and SIGTERM, without click's extra "Aborted!" line.
            ctx.exit(143 if isinstance(exc, Terminated) else 130)
        except OSError as exc:  # a read-only folder, a full disk ...: one line naming the path, no traceback
            _end_progress_bars()
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None
        except click.ClickException:
            _end_progress_bars()
            raise
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)


def _end_progress_bars() -> None:
    """Close the progress bars a failure left open, so that the error starts on a line of its own
    instead of after the bar's last state."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


@click.group(
    cls=_FlowOrderGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="reid-aug")
def main() -> None:
    """Pose-guided synthetic data for person re-identification.

    \b
    Data flow, one folder per step, each with a manifest:
      make-toy-market / Market-1501 root + pose csv
        -> subset      seeded real-data fraction (every identity kept)
        -> synthesize  PCDMs: prior -> inpaint -> refine, Market naming
        -> train-bot   BoT re-ID on real [+ synthetic]
        -> evaluate    Rank-k / mAP / mINP on query/gallery (visualize-ranks: top-k grids)
        -> report      Table-2 layout, markdown / CSV / LaTeX / PNG
    """
