"""``python -m inferd.engines.jobs TARGET EVENT_FD``: a job's child process (see ``child``)."""

import os
import sys

from inferd.engines.jobs.child import main

if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown (torch/llama atexit hooks can hang or crash)
