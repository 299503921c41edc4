"""End-to-end commands as library functions: the CLI parses arguments and calls these."""
