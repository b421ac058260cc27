"""Ready handler modules: ``simplerpc-mp serve --handlers workers.echo`` (from the repository root)."""
