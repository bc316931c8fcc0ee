"""torchrun target for the kill test: `saescope ...` whose ranks, once their first checkpoint is written and
training is not over, record their pid in $SAESCOPE_TEST_PIDS/rank<R>.pid and wait there to be killed."""

import os
import sys
import time
from pathlib import Path

from saescope.cli import main
from saescope.train import MultiTrainer

_checkpoint = MultiTrainer.checkpoint


def checkpoint_then_wait(self):
    _checkpoint(self)
    if self.tokens_done < self.train.tokens:
        Path(os.environ["SAESCOPE_TEST_PIDS"], f"rank{self.world.rank}.pid").write_text(str(os.getpid()))
        time.sleep(600)


MultiTrainer.checkpoint = checkpoint_then_wait
main(sys.argv[1:])
