"""Client-side subcommands of the imgserve CLI."""
