"""``surfaceinspect profiles``."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from surfaceinspect import cli
from surfaceinspect.cli import common
from surfaceinspect.detectors import available_methods


@cli.app.command("profiles")
@common.handle_errors
def profiles() -> None:
    """List the installed profiles as the --method/--profile pairs that select them, and what each is for."""
    from surfaceinspect.profiles import method_profiles, profile_note

    table = Table(title="use: surfaceinspect train --method METHOD --profile PROFILE", show_header=True)
    for column in ("--method", "--profile", "for", "file"):
        table.add_column(column)
    folders: list[str] = []
    for method in available_methods():
        for name, path in method_profiles(method).items():
            table.add_row(Text(method), Text(name), Text(profile_note(method, name, path)), Text(path.name))
            folders += [str(path.parent)] if str(path.parent) not in folders else []
    table.caption = (
        "without --method (= auto), train measures which method's cpu or texture profile suits your images; "
        f"--method without --profile: paper with CUDA, cpu without\nfiles in {', '.join(folders)}"
    )
    cli.out_console.print(table)
