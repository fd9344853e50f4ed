"""One rank of the 2-process DDP test (launched by Testing/test_ddp.py through torchrun).

Trains the test regressor with the real Trainer under the gloo process group and writes this
rank's final weights to OUT/rank<r>.pt so the test can compare ranks.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures_train import RegressionSamples, TwoHeadRegressor, regressor_config  # noqa: E402

from CTReasonerLib.train.distributed import init_distributed, shutdown_distributed  # noqa: E402
from CTReasonerLib.train.trainer import Trainer  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    context = init_distributed("cpu")
    torch.manual_seed(0)  # same initial weights everywhere (DDP would broadcast rank 0's anyway)
    model = TwoHeadRegressor(dropout=0.0)
    config = regressor_config(str(Path(out_dir) / "run"), epochs=2, batch_size=2, grad_accum_steps=2,
                              checkpoint_every=2, max_minutes=10)
    result = Trainer(model, config, RegressionSamples(count=16), context=context).train()
    torch.save({"weights": model.state_dict(), "steps": result.steps, "world_size": context.world_size,
                "backend": context.backend}, Path(out_dir) / f"rank{context.rank}.pt")
    shutdown_distributed(context)


if __name__ == "__main__":
    main(sys.argv[1])
