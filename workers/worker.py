"""Process entry point of an inference worker: ``dfm-stream-worker ARGS`` is ``dfm-stream work ARGS``."""

import sys

from dfm_stream.cli import main as cli_main


def main() -> int:
    """Run ``dfm-stream work`` with this process's arguments."""
    return cli_main(["work", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
