"""Makes tests/data/peer_ema.json: the shadows the peers' own EMA code computes, call by call.

Each case drives one peer's EMA over a 4-element parameter whose values change at every call
(seeded), and records the shadow after each call. `ours` says how the same EMA is configured in
wgpu-ema (schedule, policy, where the counter starts, which parameters the shadows start from);
tests/suite/peers.rs replays it through the crate and compares call by call. The mapping is
data here so that the test checks it against the peer, not against our own schedule code.

Run once, with the peers installed (CI only compares):
    python -m venv /tmp/peers && /tmp/peers/bin/pip install torch timm diffusers ema-pytorch numpy
    /tmp/peers/bin/python tests/data/make_peer_fixtures.py --edm2 PATH/TO/NVlabs/edm2 > tests/data/peer_ema.json
(`--edm2`: a checkout of github.com/NVlabs/edm2, whose training/phema.py is imported as is.)
"""

import argparse
import copy
import importlib.metadata as md
import json
import sys

import numpy as np
import torch

T = 30  # calls per case
N = 4  # elements


def param_sequence(seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(N).astype(np.float32) for _ in range(T + 1)]


class Net(torch.nn.Module):
    def __init__(self, values):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(values))


def run(seed, make, update, shadow):
    """params[0] at construction; before call t (1..T) the parameter becomes params[t]."""
    params = param_sequence(seed)
    net = Net(params[0])
    peer = make(net)
    shadows = []
    for t in range(1, T + 1):
        with torch.no_grad():
            net.w.copy_(torch.tensor(params[t]))
        update(peer, net, t)
        shadows.append([float(x) for x in shadow(peer).detach().numpy().astype(np.float32)])
    return [[float(x) for x in p] for p in params], shadows


def case(name, peer, ours, seed, make, update, shadow, note=""):
    params, shadows = run(seed, make, update, shadow)
    out = {"name": name, "peer": peer, "ours": ours, "params": params, "shadows": shadows}
    if note:
        out["note"] = note
    return out


def ours(schedule, update_after_step=0, update_every=1, start=0, build_from=0, compare_from=1,
         **kw):
    return dict(schedule=schedule, update_after_step=update_after_step,
                update_every=update_every, start=start, build_from=build_from,
                compare_from=compare_from, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--edm2", help="a checkout of NVlabs/edm2 (for training/phema.py)")
    a = ap.parse_args()
    from diffusers.training_utils import EMAModel
    from timm.utils.model_ema import ModelEmaV3
    from ema_pytorch import EMA, KarrasEMA

    cases = []

    # diffusers EMAModel: decay of call n is 0 while n - U - 1 <= 0, then TensorFlow's rule at
    # n - U - 1, capped at `decay` and floored at `min_decay`. Ours: Schedule::diffusers with
    # the same update_after_step.
    for i, (decay, min_decay, uas) in enumerate([(0.999, 0.0, 0), (0.995, 0.5, 3)]):
        cases.append(case(
            f"diffusers_default_{i}",
            f"diffusers {md.version('diffusers')} EMAModel(decay={decay}, min_decay={min_decay}, update_after_step={uas})",
            ours("diffusers", decay=decay, min_decay=min_decay, update_after_step=uas),
            10 + i,
            lambda net, d=decay, m=min_decay, u=uas: EMAModel(
                net.parameters(), decay=d, min_decay=m, update_after_step=u),
            lambda peer, net, t: peer.step(net.parameters()),
            lambda peer: peer.shadow_params[0]))

    # diffusers with use_ema_warmup: the warm-up at n - U - 1 (0 while that is <= 0). Ours:
    # Schedule::warmup evaluated at k = n - update_after_step, so update_after_step = U + 1.
    for i, (power, uas) in enumerate([(2 / 3, 0), (3 / 4, 2)]):
        cases.append(case(
            f"diffusers_warmup_{i}",
            f"diffusers {md.version('diffusers')} EMAModel(decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power={power:.6f}, update_after_step={uas})",
            ours("warmup", inv_gamma=1.0, power=power, min_decay=0.0, max_decay=0.999,
                 update_after_step=uas + 1),
            20 + i,
            lambda net, p=power, u=uas: EMAModel(
                net.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=p,
                update_after_step=u),
            lambda peer, net, t: peer.step(net.parameters()),
            lambda peer: peer.shadow_params[0]))

    # timm ModelEmaV3, updated with step = the global step (1, 2, ...), as timm's train.py
    # does: decay 0 while step - U - 1 <= 0, then the warm-up there (or the constant decay).
    # Ours: update_after_step = U + 1.
    for i, (warm, uas) in enumerate([(True, 0), (False, 2)]):
        cases.append(case(
            f"timm_v3_{'warmup' if warm else 'constant'}",
            f"timm {md.version('timm')} ModelEmaV3(decay=0.99, use_warmup={warm}, warmup_gamma=1.0, warmup_power=0.75, update_after_step={uas}), update(model, step=n)",
            (ours("warmup", inv_gamma=1.0, power=0.75, min_decay=0.0, max_decay=0.99,
                  update_after_step=uas + 1) if warm
             else ours("constant", decay=0.99, update_after_step=uas + 1)),
            30 + i,
            lambda net, w=warm, u=uas: ModelEmaV3(
                net, decay=0.99, use_warmup=w, warmup_gamma=1.0, warmup_power=0.75,
                update_after_step=u, foreach=False),
            lambda peer, net, t: peer.update(net, step=t),
            lambda peer: peer.module.w))

    # ema-pytorch EMA: call n copies when n - 1 is a multiple of update_every and <= U, and
    # updates when it is a multiple and > U, with the warm-up at n - 1 - U. Ours, for U a
    # multiple of update_every: update_after_step = U + 1, same update_every; identical from
    # call U + 1 on. Before it both copy the parameters, ema-pytorch only on every
    # update_every-th call (it holds an older copy in between).
    for i, (uas, every) in enumerate([(4, 2), (6, 3)]):
        cases.append(case(
            f"ema_pytorch_ema_{i}",
            f"ema-pytorch {md.version('ema-pytorch')} EMA(beta=0.999, update_after_step={uas}, update_every={every}, inv_gamma=1.0, power=2/3)",
            ours("warmup", inv_gamma=1.0, power=2 / 3, min_decay=0.0, max_decay=0.999,
                 update_after_step=uas + 1, update_every=every, compare_from=uas + 1),
            40 + i,
            lambda net, u=uas, e=every: EMA(
                net, beta=0.999, update_after_step=u, update_every=e, inv_gamma=1.0,
                power=2 / 3, allow_different_devices=True),
            lambda peer, net, t: peer.update(),
            lambda peer: peer.ema_model.w,
            note="before call update_after_step + 1, ema-pytorch copies only every update_every-th call"))

    # ema-pytorch KarrasEMA (update_every=1; its default, 100, spaces the updates as a Policy's
    # update_every does): its first call copies the parameters, then call n averages with
    # (1 - 1/(n + 1))^(1 + gamma), one step later than EDM2's (1 - 1/n)^(1 + gamma). Ours:
    # Schedule::power built from the parameters after the first call, counter starting at 2.
    for i, sigma_rel in enumerate([0.05, 0.10]):
        cases.append(case(
            f"ema_pytorch_karras_{i}",
            f"ema-pytorch {md.version('ema-pytorch')} KarrasEMA(sigma_rel={sigma_rel}, update_every=1)",
            ours("power_sigma_rel", sigma_rel=sigma_rel, start=2, build_from=1,
                 compare_from=2),
            50 + i,
            lambda net, s=sigma_rel: KarrasEMA(
                net, sigma_rel=s, update_every=1, allow_different_devices=True),
            lambda peer, net, t: peer.update(),
            lambda peer: peer.ema_model.w,
            note="KarrasEMA's first call copies; build ours from those parameters"))

    # EDM2's PowerFunctionEMA with one image per step: update(cur_nimg=n, batch_size=1) after
    # step n, beta = (1 - 1/n)^(exp + 1). Ours: Schedule::power_sigma_rel, as is.
    if a.edm2:
        sys.path.insert(0, a.edm2)
        from training.phema import PowerFunctionEMA
        for i, std in enumerate([0.05, 0.10]):
            cases.append(case(
                f"edm2_power_{i}",
                f"NVlabs/edm2 training/phema.py PowerFunctionEMA(stds=[{std}]), update(cur_nimg=n, batch_size=1)",
                ours("power_sigma_rel", sigma_rel=std),
                60 + i,
                lambda net, s=std: PowerFunctionEMA(net, stds=[s]),
                lambda peer, net, t: peer.update(cur_nimg=t, batch_size=1),
                lambda peer: peer.emas[0].w))

    json.dump({
        "made_by": "tests/data/make_peer_fixtures.py",
        "versions": {p: md.version(p) for p in ["torch", "diffusers", "timm", "ema-pytorch"]},
        "calls": T,
        "cases": cases,
    }, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
