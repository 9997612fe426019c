import click


@click.group()
def main() -> None:
    """source-proj."""
