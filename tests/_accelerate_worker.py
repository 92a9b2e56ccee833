"""One process of examples/accelerate_example.py that records what the tests compare.

    accelerate launch --multi_gpu --num_processes 2 tests/_accelerate_worker.py OUT_DIR --cpu [example flags]

Runs the example's main() with an on_step hook and writes, per process, the replacement
draws of every Theseus step (draws-<rank>.json: the rate and, per group, whether its last
call ran the successor) and the engine's tensors after the last step (successors and
rest-copies, weights-<rank>.safetensors), plus the example's result (result-<rank>.json).
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

import accelerate_example  # noqa: E402


def run(out: str, argv: list) -> dict:
    from safetensors.torch import save_file

    draws, final, rank = [], {}, [0]

    def record(th, accelerator):
        rank[0] = accelerator.process_index
        draws.append({"step": th.step_count, "rate": th.scheduler(th.step_count - 1),
                      "successor": {str(k): v for k, v in sorted(th.last_decisions.items())}})
        final.clear()
        final.update({k: v.detach().cpu().clone().contiguous() for k, v in th.state_dict()["tensors"].items()})

    result = accelerate_example.main(argv, on_step=record)
    with open(os.path.join(out, f"draws-{rank[0]}.json"), "w") as f:
        json.dump(draws, f)
    with open(os.path.join(out, f"result-{rank[0]}.json"), "w") as f:
        json.dump(result, f)
    save_file(final, os.path.join(out, f"weights-{rank[0]}.safetensors"))
    return result


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    run(sys.argv[1], sys.argv[2:])
