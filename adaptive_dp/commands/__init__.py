"""Sub-commands of the ``adaptive-dp`` console script.

Each module here defines ``configure(parser: argparse.ArgumentParser) -> None`` (adds its options) and
``run(args: argparse.Namespace) -> int`` (does the work, returns the exit code). Heavy imports belong
inside ``run`` so that ``adaptive-dp --help`` stays fast.
"""
