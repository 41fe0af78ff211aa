"""Process entry point of a camera reader: ``dfm-stream-reader ARGS`` is ``dfm-stream read ARGS``."""

import sys

from dfm_stream.cli import main as cli_main


def main() -> int:
    """Run ``dfm-stream read`` with this process's arguments."""
    return cli_main(["read", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
