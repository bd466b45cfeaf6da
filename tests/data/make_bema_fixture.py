"""Makes tests/data/trl_bema.json: BEMA's weights as TRL's own BEMACallback computes them.

Each case drives `trl.BEMACallback` (Hugging Face TRL) over a tiny model whose two parameters
take seeded values before every step, the way the Trainer calls it (`on_train_begin`, then
`on_step_end` with `state.global_step` = 1, 2, ...), and records the callback's running model
(the BEMA weights) after every step that updated it. `ours` says how the same BEMA is
configured in wgpu-ema; tests/suite/bema.rs replays the trajectory through the crate and
compares at those steps. The mapping is data here, so the test checks it against TRL itself.

Run once, with TRL installed (CI only compares):
    python -m venv /tmp/trl && /tmp/trl/bin/pip install torch trl
    /tmp/trl/bin/python tests/data/make_bema_fixture.py > tests/data/trl_bema.json
"""

import importlib.metadata as md
import json
import types

import numpy as np
import torch
from trl import BEMACallback

T = 24  # steps per case
SHAPES = {"w": (3, 5), "b": (7,)}


class Config:
    pass


class Tiny(torch.nn.Module):
    """What the callback needs of a model: `config`, `type(model)(config)`, parameters."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.w = torch.nn.Parameter(torch.zeros(SHAPES["w"]))
        self.b = torch.nn.Parameter(torch.zeros(SHAPES["b"]))


def trajectory(seed):
    """Parameters at step 0 (construction) and before each step 1..T: a seeded random walk."""
    rng = np.random.default_rng(seed)
    now = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    out = [{k: v.copy() for k, v in now.items()}]
    for _ in range(T):
        for k, s in SHAPES.items():
            now[k] = (now[k] + 0.1 * rng.standard_normal(s)).astype(np.float32)
        out.append({k: v.copy() for k, v in now.items()})
    return out


def case(name, seed, kwargs):
    params = trajectory(seed)
    model = Tiny(Config())
    with torch.no_grad():
        for k in SHAPES:
            getattr(model, k).copy_(torch.from_numpy(params[0][k]))
    cb = BEMACallback(**kwargs)
    state = types.SimpleNamespace(global_step=0, is_world_process_zero=True)
    cb.on_train_begin(None, state, None, model=model)
    weights = {}
    for step in range(1, T + 1):
        with torch.no_grad():
            for k in SHAPES:
                getattr(model, k).copy_(torch.from_numpy(params[step][k]))
        state.global_step = step
        before = [p.detach().clone() for p in cb.running_model.parameters()]
        cb.on_step_end(None, state, None, model=model)
        after = list(cb.running_model.parameters())
        if any(not torch.equal(x, y) for x, y in zip(before, after)):
            weights[str(step)] = {
                k: getattr(cb.running_model, k).detach().numpy().ravel().tolist() for k in SHAPES
            }
    u = kwargs.get("update_after", 0)
    m = kwargs.get("multiplier", 1.0)
    ours = {
        # TRL evaluates both weights at the global step; the crate counts t from the burn-in.
        "lag": kwargs.get("lag", 10) + m * u,
        "ema_power": kwargs.get("ema_power", 0.5),
        "bias_power": kwargs.get("bias_power", 0.2),
        "multiplier": m,
        "min_ema_multiplier": kwargs.get("min_ema_multiplier", 0.0),
        "update_after_step": u,
        "update_every": kwargs.get("update_freq", 400),
    }
    return {
        "name": name,
        "trl": kwargs,
        "ours": ours,
        "shapes": {k: list(s) for k, s in SHAPES.items()},
        "params": [{k: p[k].ravel().tolist() for k in SHAPES} for p in params],
        "weights": weights,
    }


def main():
    cases = [
        case("defaults, update_freq 3", 1, {"update_freq": 3}),
        case(
            "burn-in 4, every 2nd step, other powers and a floor",
            2,
            {
                "update_freq": 2,
                "update_after": 4,
                "ema_power": 0.7,
                "bias_power": 0.4,
                "lag": 3,
                "multiplier": 0.5,
                "min_ema_multiplier": 0.3,
            },
        ),
    ]
    print(json.dumps({"trl": md.version("trl"), "torch": torch.__version__, "cases": cases}))


if __name__ == "__main__":
    main()
