"""The command line: parse, wire the stages, map errors to exit codes. No logic lives here."""

from __future__ import annotations

import sys

import click

from worker.errors import BulkTaggerError


@click.group()
def cli() -> None:
    """bulk-tagger: change the tags and settings of very many Gcore Cloud VM images."""


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False))
def validate(job: str) -> None:
    """Parse and check JOB and its selector files; nothing is sent."""
    from worker import spec

    loaded = spec.load_job(job)
    rows = spec.check_selector_files(loaded)
    click.echo(f"{job}: valid ({len(loaded.targets)} selectors, {sum(rows.values())} file rows)")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except BulkTaggerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
