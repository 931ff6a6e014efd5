"""``dopd train`` under accelerate's FSDP2 plugin on CPU, for tests/test_shards.py.

accelerate shards only on GPUs: on a CPU its FSDP config starts data parallelism. This worker,
run in each of 2 gloo processes (``accelerate launch --config_file configs/accelerate/ddp-cpu.yaml
tests/fsdp2_worker.py OUTPUT_DIR [--stop-after N] [--resume]``), makes every ``Accelerator`` the
trainer builds report ``DistributedType.FSDP`` with an FSDP2 plugin, so that accelerate's own
FSDP2 ``prepare`` shards the student (with its optimizer) and the frozen teacher, and the trainer
runs its sharded paths: chunked loss, synced generation, per-rank checkpoints, gathered export.
"""

from __future__ import annotations

import argparse

from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from dopd.config import load_config
from dopd.training.trainer import Trainer

PLUGIN = FullyShardedDataParallelPlugin(
    fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True
)
_INIT = Accelerator.__init__


def _fsdp2_accelerator(self, *args, **kwargs) -> None:
    _INIT(self, *args, **kwargs)
    for state in (self.state, PartialState()):
        state.distributed_type = DistributedType.FSDP
    self.state.fsdp_plugin = PLUGIN


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    Accelerator.__init__ = _fsdp2_accelerator
    config = load_config("configs/tiny.yaml", [f"output_dir={args.output_dir}", *OVERRIDES])
    Trainer(config, resume=args.resume).train(stop_after=args.stop_after)


# The run every launch of tests/test_shards.py's FSDP2 tests trains (DDP runs take the same).
OVERRIDES = [
    "optim.max_steps=4",
    "loop.save_every=2",
    "data.eval=null",
    "loop.eval_every=0",
    "rollout.prompts_per_step=8",
]

if __name__ == "__main__":
    main()
