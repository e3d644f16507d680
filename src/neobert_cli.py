"""The ``neobert`` console command, kept apart from the package so ``neobert --help`` is instant.

Importing ``neobert`` registers the model with transformers' Auto classes, which loads
torch and transformers (seconds). This entry point loads only ``neobert/cli.py`` (standard
library at import time) to answer ``--help``; a command then imports what it needs.
"""

import importlib.util
import sys
from pathlib import Path


def main() -> int:
    package = importlib.util.find_spec("neobert")  # found, not imported
    path = Path(next(iter(package.submodule_search_locations))) / "cli.py"
    spec = importlib.util.spec_from_file_location("neobert_cli_table", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
