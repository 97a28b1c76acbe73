"""Command lines: one thin module per console script (argparse, the call into its engine, printing, exit codes)."""
