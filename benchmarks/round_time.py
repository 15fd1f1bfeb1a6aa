"""Time one faithful I-BAU round in JAX against the PyTorch reference, on the same data.

    python benchmarks/round_time.py [--shared ../shared] [--limit-batches B] [--host-devices N]
                                     [--torch-structure both|lean|original|none] [--torch-device cpu|cuda]
                                     [--repeats R]

Two PyTorch rounds are timed after the JAX one (``--torch-structure both``, the default):
the lean reference (experiments/torch_ibau.py: one outer backward pass, no multiplication
of a zero vector) and the same computation organised as the authors' original code is
(two outer backward passes, the zero first iteration, a host norm check per iteration,
parameter gradients in the search). The original's round is the baseline of the speed
target; the lean one shows what a careful PyTorch program does.

All implementations start from the authors' BadNets checkpoint, use the clean set
(test images 0..4999 in batches of 100), the same perturbed index per outer batch, K=5 and
the original defaults, then report seconds, clean accuracy, ASR and how far the two
unlearned models differ. JAX compile time is measured apart (``lower().compile()``).

FLOPs: XLA's cost analysis counts a loop body once, so the round's FLOPs are computed from
the standalone compiled pieces: B x (one search step) + B x (one outer step). Achieved
FLOP/s = those FLOPs / the round's run seconds. Writes benchmarks/results/round_time_<backend>.json
(``_hostN`` appended with ``--host-devices N``) and prints a markdown table.

``--repeats R`` runs the sequence (JAX round, then each PyTorch round) R times in turn, so
that a slow spell of a shared machine falls on all of them; every round restarts from the
checkpoint. ``round_s`` is then the median of the R runs (``round_s_runs`` lists them) and
each time ratio the median of the R within-cycle ratios (``ratio_runs_*``); JAX is compiled
once.

``--host-devices N`` splits the CPU into N XLA host devices and runs the round data-parallel
over them (``ibau.make_round(..., mesh=...)``): one XLA CPU device does not keep both cores of
this machine busy through a round, N data-parallel devices do (benchmarks/devices.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))


def _host_devices_flag(argv: list[str]) -> None:
    # XLA reads its flags once, at start-up: set them before jax is imported.
    if "--host-devices" in argv:
        n = argv[argv.index("--host-devices") + 1]
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={n}").strip()


_host_devices_flag(sys.argv)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ibau_jax import checkpoints, experiment, sharding  # noqa: E402
from ibau_jax.defenses import ibau  # noqa: E402
from ibau_jax.results import write_atomic  # noqa: E402


def flops_of(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.environ.get("IBAU_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--limit-batches", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-torch", action="store_true", help="same as --torch-structure none")
    ap.add_argument("--torch-structure", choices=("both", "lean", "original", "none"), default="both",
                    help="PyTorch rounds to time: the lean reference, the original code's organisation, or both")
    ap.add_argument("--torch-threads", type=int, default=0, help="0 = torch's default")
    ap.add_argument("--torch-device", default="cpu", help="cpu, or cuda on a GPU machine")
    ap.add_argument("--host-devices", type=int, default=1, help="XLA CPU devices, data-parallel (see above)")
    ap.add_argument("--repeats", type=int, default=1, help="cycles of (JAX, PyTorch rounds), interleaved")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    shared = Path(args.shared)

    ckpt = shared / "ibau-original/checkpoints/badnets_8_02_ckpt.pth"
    # the original split, BadNets trigger, target 8 (experiment.load's defaults)
    exp = experiment.load(ckpt, data_dir=shared / "datasets/cifar10", download=False)
    cfg = ibau.IBAUConfig.faithful()
    xb, yb = exp.batches(cfg.batch_size, args.limit_batches)
    B = xb.shape[0]
    variables, model = exp.variables, exp.model
    masks = jnp.asarray(ibau.seed_masks(args.seed, 1, B, cfg)[0])  # as `ibau-jax unlearn --seed`
    idx = [np.flatnonzero(np.asarray(m)) for m in masks]

    # ---------------- JAX
    params, bs = jax.tree.map(jnp.asarray, variables["params"]), jax.tree.map(jnp.asarray, variables["batch_stats"])
    opt_state = cfg.outer_tx().init(params)
    xb_j, yb_j = jnp.asarray(xb), jnp.asarray(yb)
    inputs = (params, bs, opt_state, xb_j, yb_j, masks)
    if args.host_devices > 1:
        mesh = sharding.make_mesh(args.host_devices)
        round_fn = ibau.make_round(model, cfg, mesh=mesh)
        inputs = (*sharding.replicate(mesh, inputs[:3]), *sharding.shard(mesh, tuple(inputs[3:]), 1))
    else:
        round_fn = ibau.make_round(model, cfg)
    t0 = time.perf_counter()
    compiled = round_fn.lower(*inputs).compile()
    compile_s = time.perf_counter() - t0

    def time_jax():
        t0 = time.perf_counter()
        res = jax.block_until_ready(compiled(*inputs))
        return res, time.perf_counter() - t0

    out, jax_s = time_jax()
    jax_runs = [jax_s]
    out = sharding.to_host(out)  # host copies: evaluation and the FLOP count run unsharded
    jax_vars = {"params": out.params, "batch_stats": bs}
    jax_m = exp.evaluate(jax_vars)

    logits = ibau.make_logits_fn(model)
    fn = lambda p, x: logits(bs, p, x)
    delta = out.delta
    step_flops = flops_of(lambda p, s: ibau.outer_step(fn, cfg, p, s, delta, xb_j[0], yb_j[0], xb_j[1], yb_j[1],
                                                      masks[1]), params, opt_state)
    search_flops = flops_of(lambda p, x, y: ibau.search_perturbation(fn, p, x[None], y[None], cfg),
                            params, xb_j[0], yb_j[0])
    round_flops = B * (step_flops + search_flops)
    result = {
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "jax_version": jax.__version__, "batches": B, "K": cfg.K, "seed": args.seed,
        "host_devices": args.host_devices,
        "jax": {"compile_s": compile_s, "round_s": jax_s, "per_step_s": jax_s / B, **jax_m,
                "delta_norm": float(jnp.linalg.norm(delta)),
                "flops_round": round_flops, "flops_outer_step": step_flops, "flops_search_step": search_flops,
                "achieved_gflops_per_s": round_flops / jax_s / 1e9},
    }

    # ---------------- PyTorch reference, same data and perturbed indices
    structures = {"both": ("lean", "original"), "none": ()}.get(args.torch_structure, (args.torch_structure,))
    if args.skip_torch:
        structures = ()
    keys = {s: "torch" if s == "lean" else "torch_original" for s in structures}
    # one tick per timed round (the first JAX round is done): rate and ETA for long --repeats runs
    bar = tqdm(total=args.repeats * (1 + len(keys)), initial=1, unit="round", desc="rounds timed", dynamic_ncols=True)
    for cycle in range(args.repeats):
        if cycle:
            again, secs = time_jax()
            jax_runs.append(secs)
            bar.update(1)
            same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                       zip(jax.tree.leaves(sharding.to_host(again).params), jax.tree.leaves(out.params)))
            result["jax"]["repeat_identical"] = result["jax"].get("repeat_identical", True) and same
        for structure, key in keys.items():
            rec, agreement = _torch_round(args, str(ckpt), cfg, xb, yb, idx, exp.acc_x, exp.acc_y, exp.asr_x, exp.asr_t,
                                          out.params, np.asarray(delta), variables, structure)
            if cycle == 0:
                rec["round_s_runs"], rec["per_step_s_runs"] = [rec["round_s"]], [rec["per_step_s"]]
                result[key] = rec
                result["agreement" if structure == "lean" else "agreement_original"] = agreement
            else:
                result[key]["round_s_runs"].append(rec["round_s"])
                result[key]["per_step_s_runs"].append(rec["per_step_s"])
                result[key]["repeat_identical"] = (result[key].get("repeat_identical", True)
                                                   and rec["clean_acc"] == result[key]["clean_acc"]
                                                   and rec["asr_all"] == result[key]["asr_all"])
            bar.update(1)
    bar.close()
    if args.repeats > 1:
        j = result["jax"]
        j.update(round_s=float(np.median(jax_runs)), round_s_runs=jax_runs)
        j.update(per_step_s=j["round_s"] / B, achieved_gflops_per_s=round_flops / j["round_s"] / 1e9)
    for key in keys.values():
        t = result[key]
        ratios = [a / b for a, b in zip(jax_runs, t["round_s_runs"])]   # within a cycle: same spell of the machine
        if args.repeats > 1:
            t["round_s"], t["per_step_s"] = float(np.median(t["round_s_runs"])), float(np.median(t["per_step_s_runs"]))
            result["ratio_runs_jax_over_" + key] = ratios
        result["ratio_jax_over_" + key] = float(np.median(ratios))

    backend = result["backend"]
    suffix = f"_host{args.host_devices}" if args.host_devices > 1 else ""
    out_path = Path(args.out) if args.out else REPO / f"benchmarks/results/round_time_{backend}{suffix}.json"
    write_atomic(out_path, json.dumps(result, indent=2) + "\n")
    j = result["jax"]
    if args.repeats > 1:
        print(f"medians of {args.repeats} interleaved runs; runs (s): JAX "
              + ", ".join(f"{x:.1f}" for x in jax_runs) + "".join(
                  f"; {k} " + ", ".join(f"{x:.1f}" for x in result[k]["round_s_runs"]) for k in keys.values()))
    print("| impl | round s | per step s | clean acc | ASR (all) |\n|---|---|---|---|---|")
    print(f"| JAX ({backend}) | {j['round_s']:.1f} | {j['per_step_s']:.3f} | {j['clean_acc']:.4f} | {j['asr_all']:.4f} |")
    lines = []
    for key, label, agr in (("torch", "PyTorch lean", "agreement"), ("torch_original", "PyTorch, original's structure",
                                                                      "agreement_original")):
        if key not in result:
            continue
        t = result[key]
        where = t["device"] if t["device"] != "cpu" else f"{t['threads']} thr"
        print(f"| {label} ({where}) | {t['round_s']:.1f} | {t['per_step_s']:.3f} | "
              f"{t['clean_acc']:.4f} | {t['asr_all']:.4f} |")
        lines.append(f"JAX / {label}: time ratio {result['ratio_jax_over_' + key]:.3f}"
                     + (" (median of the within-cycle ratios "
                        + ", ".join(f"{r:.3f}" for r in result["ratio_runs_jax_over_" + key]) + ")"
                        if args.repeats > 1 else "") + "; "
                     f"δ rel. diff {result[agr]['delta_rel_err']:.2e}; "
                     f"parameter-update rel. diff {result[agr]['update_rel_err']:.2e}")
    print("\n" + "\n".join(lines) if lines else "")
    print(f"JAX compile {j['compile_s']:.1f} s; round FLOPs {j['flops_round'] / 1e12:.2f} T "
          f"(outer step {j['flops_outer_step'] / 1e9:.1f} G, search step {j['flops_search_step'] / 1e9:.1f} G); "
          f"achieved {j['achieved_gflops_per_s']:.0f} GFLOP/s")
    print(f"wrote {out_path}")


def _torch_round(args, ckpt: str, cfg, xb, yb, idx, acc_x, acc_y, asr_x, asr_t, jax_params, jax_delta,
                 variables, structure: str) -> tuple[dict, dict]:
    """One PyTorch round from the checkpoint (``structure`` lean or original): its record and
    how far its δ and parameters are from the JAX round's."""
    import torch
    import torch_ibau

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    tm = torch_ibau.load_small_vgg(ckpt).to(args.torch_device)
    opt = torch_ibau.make_optimizer(tm, cfg.outer_lr)
    t0 = time.perf_counter()
    tdelta, timings = torch_ibau.unlearn_round(tm, xb, yb, idx, K=cfg.K, eta=cfg.fp_step, reg=cfg.inner_reg,
                                               outer_lr=cfg.outer_lr, search_lr=cfg.search_lr,
                                               radius=cfg.radius, optimizer=opt, structure=structure)
    torch_s = time.perf_counter() - t0
    rec = {"structure": structure, "threads": torch.get_num_threads(), "device": args.torch_device,
           "round_s": torch_s, "search_s": timings["search_s"], "per_step_s": timings["unlearn_s"] / len(xb),
           "clean_acc": torch_ibau.evaluate(tm, acc_x, acc_y), "asr_all": torch_ibau.evaluate(tm, asr_x, asr_t),
           "delta_norm": float(np.linalg.norm(tdelta))}
    # parameter agreement: the torch weights go through the library's own (safe) import, so
    # the comparison uses the same torch -> flax mapping as every checkpoint load
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"net": {k: v.detach().cpu() for k, v in tm.state_dict().items()}}, f"{tmp}/round.pth")
        torch_vars, _ = checkpoints.load_torch_checkpoint(f"{tmp}/round.pth")
    flat = lambda tree: np.concatenate([np.asarray(leaf).ravel() for leaf in jax.tree.leaves(tree)])
    a, b, start = flat(jax_params), flat(torch_vars["params"]), flat(variables["params"])
    agreement = {
        "delta_rel_err": float(np.linalg.norm(jax_delta - tdelta) / np.linalg.norm(tdelta)),
        "params_rel_err": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        # relative to the size of the round's update, the stricter measure
        "update_rel_err": float(np.linalg.norm(a - b) / np.linalg.norm(b - start)),
    }
    return rec, agreement


if __name__ == "__main__":
    main()
