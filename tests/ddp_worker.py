"""Run under torchrun (2 CPU processes, gloo): train a tiny adapter a few steps with DDP and save rank results.

Not a test module itself; tests/test_train.py launches it.
"""
import sys

import torch
import torch.distributed as dist

from train_fixtures import synthetic_setup  # noqa: E402  (tests/ is on sys.path under torchrun via PYTHONPATH)

from kangaroo_fast.train.distill import Recipe, train_adapter


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    setup = synthetic_setup()
    recipe = Recipe(epochs=2, batch_size=4, lr=3e-3, warmup_steps=2, seed=0)
    adapter = train_adapter(setup.adapter, setup.features, setup.train_idx, setup.heldout_idx, setup.lm_head,
                            setup.cos, setup.sin, recipe, progress=False)
    state = {k: v.detach().clone() for k, v in adapter.official_state_dict().items()}
    torch.save(state, f"{out_path}.rank{dist.get_rank()}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
