"""``python -m rlhf_tasks <stage>``: the command line of rlhf_tasks/pipeline/cli.py."""

import sys

from .pipeline.cli import (
    EXIT_BAD_INPUT,
    EXIT_BUSY,
    EXIT_DOES_NOT_FIT,
    EXIT_STORAGE_FULL,
    RESULT_PREFIX,
    STAGE_MODULES,
    main,
    parser,
)

__all__ = ["EXIT_BAD_INPUT", "EXIT_BUSY", "EXIT_DOES_NOT_FIT", "EXIT_STORAGE_FULL", "RESULT_PREFIX", "STAGE_MODULES",
           "main", "parser"]

if __name__ == "__main__":
    sys.exit(main())
