#!/usr/bin/env python3
"""Start train.py on several processes (torchrun's arguments), and end as one process would.

    python scripts/launch.py --nproc_per_node 8 train.py --config production      # what run.sh runs

torch's launcher (the elastic agent of torchrun and accelerate launch) passes a signal on to the workers,
waits for them to save (TORCH_ELASTIC_SHUTDOWN_TIMEOUT), then exits 1 with its own traceback
(SignalException, ChildFailedError) whatever the workers did. This one runs the same agent and exits with the
workers' code instead: 143 after SIGTERM, 130 after Ctrl+C, 129 after SIGHUP, a worker's own exit code (2 for
bad input, 3 for a diverged run) when one fails, whose error line is already on the screen.
"""
import logging
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import elastic_launch
from torch.distributed.run import config_from_args, parse_args


def exit_code_of(error: ChildFailedError) -> int:
    """The first failed worker's exit code, as a shell reports it (a worker killed by signal N: 128 + N). A worker
    that failed says why on its own; one killed by a signal cannot, so the launcher says it, in one line."""
    rank, failure = error.get_first_failure()
    if failure.exitcode < 0:
        print(f"launcher: worker {rank} (pid {failure.pid}) was killed by {signal.Signals(-failure.exitcode).name}",
              file=sys.stderr)
        return 128 - failure.exitcode
    return failure.exitcode


def main(argv: list[str] | None = None) -> int:
    config, entrypoint, arguments = config_from_args(parse_args(sys.argv[1:] if argv is None else argv))
    # It narrates each worker's exit, and a failed one's in a timestamped line of its own: the lines below say it.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, entrypoint)(*arguments)
    except SignalException as error:  # the workers got the signal too, and had their time to save
        print(f"launcher: {error.sigval.name} passed on to the workers", file=sys.stderr)
        return 128 + int(error.sigval)
    except ChildFailedError as error:
        return exit_code_of(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
