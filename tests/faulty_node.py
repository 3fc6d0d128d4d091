"""`livernode ...` with faults injected from the test side, so the product carries no test hooks.

Environment variables:
- LIVERNODE_TEST_BATCH_DELAY=S: every inference batch takes S seconds longer. A crash or SIGTERM test can then land
  its signal in the middle of a study on a machine of any speed.
- LIVERNODE_TEST_RAISE_IN=STAGE: the pipeline raises RuntimeError at the end of STAGE (for example
  `postprocess`) for every study: a poison study that fails inside the process.
- LIVERNODE_TEST_BREAK_SENDER=1: every pass of the sender thread raises at its top, outside any one item, so
  the thread dies after its retries.
- LIVERNODE_TEST_KILL_AT_QUEUE=1: the process kills itself (SIGKILL) when a study's results are written and about
  to be queued for sending: the moment a crash must not leave an outbox item pointing at a partial file.

Used as `python tests/faulty_node.py serve ...` (tests/peers.py:start_node with `faults=`)."""

from __future__ import annotations

import os
import sys
import time


def _install() -> None:
    from livernode.daemon import pipeline
    from livernode.inference import runner

    delay = float(os.environ.get("LIVERNODE_TEST_BATCH_DELAY", "0") or 0)
    if delay > 0:
        run = runner.Segmenter.run

        def slow_run(self, x):
            time.sleep(delay)
            return run(self, x)
        runner.Segmenter.run = slow_run

    stage = os.environ.get("LIVERNODE_TEST_RAISE_IN", "")
    if stage:
        process_files = pipeline.process_files

        def faulty(*args, progress=pipeline._no_progress, **kwargs):
            def wrapped(name: str, done: int, total: int) -> None:
                progress(name, done, total)
                if name == stage and total == 0:
                    raise RuntimeError(f"injected fault at the end of {stage}")
            return process_files(*args, progress=wrapped, **kwargs)
        pipeline.process_files = faulty
        from livernode.daemon import worker
        worker.process_files = faulty


    if os.environ.get("LIVERNODE_TEST_KILL_AT_QUEUE"):
        import signal

        from livernode.daemon.store import Store

        finish = Store.finish

        def killed(self, study, instances_seen, **kwargs):
            if kwargs.get("outbox"):
                os.kill(os.getpid(), signal.SIGKILL)
            return finish(self, study, instances_seen, **kwargs)
        Store.finish = killed

    if os.environ.get("LIVERNODE_TEST_BREAK_SENDER"):
        from livernode.daemon import sender

        def broken(self):
            raise RuntimeError("injected: the sender's top level failed")
        sender.Sender.send_due = broken


if __name__ == "__main__":
    _install()
    from livernode.cli import main

    sys.exit(main(sys.argv[1:]))
