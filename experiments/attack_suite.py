"""Five backdoor attacks on CIFAR-10, a small VGG trained on each, then I-BAU on each.

    python experiments/attack_suite.py --shared ../shared --out experiments/results/attack_suite

For each attack (BadNets, Blend, Trojan-WM, SIG, WaNet; target class 0): poison the first
``--n-train`` CIFAR-10 training images (``attacks.poison_dataset``), train a small VGG on them
(``training.train``, a resumable run directory ``OUT/<attack>/train``), measure clean accuracy,
``asr_all`` and ``asr_nontarget``, then run I-BAU from that model with each I-BAU setting
(``defenses.ibau.IBAU``: the defense and loop of ``ibau-jax defend --defense ibau``, with
``mask_rng="jax"``) and measure again.

Test-set split (CIFAR-10 test images, fixed order, as the original code): images
0 .. n_clean-1 are the defender's clean set for I-BAU; images n_clean .. n_clean+n_test-1
(held out from unlearning) give clean accuracy, and their triggered copies give the ASRs.

Each attack's results go to ``OUT/<attack>/result.json`` (atomically) once the attack is done;
a rerun skips finished attacks and resumes an interrupted training from its last epoch. At
the end ``OUT/results.json`` and ``OUT/results.md`` (the markdown table) hold all attacks.
``--quick`` runs tiny settings (a smoke test of the whole pipeline in a few minutes).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from ibau_jax import attacks, checkpoints, data, models, rng, training  # noqa: E402
from ibau_jax.defenses import CleanSet, ibau  # noqa: E402

ATTACK_ORDER = ("badnets", "blend", "trojan_wm", "sig", "wanet")

# Poison ratio (fraction of the training subset) and attack options (``attacks.make_attack``;
# empty = the module's defaults). Non-default entries are listed in docs/attacks.md with the reason.
ATTACK_SETTINGS: dict[str, dict[str, Any]] = {
    "badnets": {"ratio": 0.1, "options": {}},
    "blend": {"ratio": 0.1, "options": {}},
    "trojan_wm": {"ratio": 0.1, "options": {}},
    # Clean label: 500 of the 505 airplanes in the first 5,000. Δ = 40/255 as BackdoorBench's
    # config/attack/sig/default.yaml (20/255 reached ASR 0.77 in a trial run; docs/attacks.md).
    "sig": {"ratio": 0.1, "options": {"delta": 40 / 255}},
    # WaNet's defaults (s = 0.5, noise mode, ratio 0.1) reached ASR 0.43 in a trial run, s = 2 without
    # noise images 0.59 (ratio 0.1, 15 of 20 epochs) and 0.82 (ratio 0.2): see docs/attacks.md.
    "wanet": {"ratio": 0.3, "options": {"s": 2.0, "noise": False}},
}


def write_json(path: Path, obj: Any) -> None:
    checkpoints.atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_text(path: Path, text: str) -> None:
    checkpoints.atomic_write(path, lambda f: f.write(text.encode()))


def parse_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """``ATTACK.KEY=VALUE`` (VALUE as JSON, a fraction like 40/255, else a string) -> {attack: {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        try:
            lhs, value = item.split("=", 1)
            name, key = lhs.split(".", 1)
        except ValueError:
            raise SystemExit(f"--option {item!r}: expected ATTACK.KEY=VALUE, e.g. wanet.s=1.0") from None
        try:
            parsed = json.loads(value)
        except ValueError:
            num, slash, den = value.partition("/")  # fractions such as 40/255
            try:
                parsed = float(num) / float(den) if slash else value
            except ValueError:
                parsed = value
        out.setdefault(name, {})[key] = parsed
    return out


def ibau_settings(args: argparse.Namespace) -> dict[str, ibau.IBAUConfig]:
    """The I-BAU settings to run from each poisoned model (name -> config)."""
    if args.rounds == 0:
        return {}
    common = {"rounds": args.rounds, "mask_rng": "jax"}
    out = {"original": ibau.IBAUConfig.faithful(**common)}  # batch 100, 1% perturbed, K=5, Adam 1e-3, radius 10
    for p in args.portion:
        out[f"portion {p:g}"] = ibau.IBAUConfig.faithful(portion=p, outer_lr=args.outer_lr, **common)
    return out


def unlearn(model, config: ibau.IBAUConfig, variables, clean_x, clean_y, evaluate, seed: int,
            label: str) -> list[dict[str, Any]]:
    """``config.rounds`` I-BAU rounds through the library's defense, as ``ibau-jax defend --defense ibau
    --seed SEED`` runs them (``mask_rng="jax"``: round r's masks from the r-th split of PRNGKey(seed))."""
    def callback(r, v, record):
        m = evaluate(v)
        print(f"  {label:<14} round {r}: {fmt(m)}  ({record['seconds']:.1f} s)", flush=True)
        return m

    res = ibau.IBAU(config).run(model, variables, CleanSet(clean_x, clean_y, 10), jax.random.PRNGKey(seed),
                                callback=callback)
    return [{k: h[k] for k in ("round", "seconds", "clean_acc", "asr_all", "asr_nontarget", "robust_acc")}
            for h in res.history]


def fmt(m: dict[str, float]) -> str:
    return f"clean_acc {m['clean_acc']:.4f}  asr_all {m['asr_all']:.4f}  asr_nontarget {m['asr_nontarget']:.4f}"


def run_attack(name: str, args: argparse.Namespace, cfg: dict[str, Any], sets: dict[str, Any], model,
               settings: dict[str, ibau.IBAUConfig]) -> dict[str, Any]:
    t_start = time.perf_counter()
    attack = attacks.make_attack(name, num_classes=10, target=args.target, trigger_dir=sets["trigger_dir"],
                                 seed=rng.streams(args.seed).seed_of("trigger"), **cfg["options"])
    poisoned = attacks.poison_dataset(sets["train_x"], sets["train_y"], attack, cfg["ratio"],
                                      rng.streams(args.seed).seed_of("poison"))
    asr_x, asr_t, _ = attacks.asr_test_set(sets["test_x"], sets["test_y"], attack)
    eval_sets = training.EvalSets(sets["test_x"], sets["test_y"], asr_x, asr_t, sets["test_y"])
    evaluate = lambda v: eval_sets.evaluate(model, v)  # noqa: E731

    tcfg = training.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             crop_pad=args.crop_pad, eval_every=args.eval_every)
    run_dir = Path(args.out) / name / "train"
    run_dir.mkdir(parents=True, exist_ok=True)
    run_config = {"dataset": "cifar10", "attack": name, "target": attack.target, "poison_ratio": cfg["ratio"],
                  "attack_options": cfg["options"], "model": "small_vgg", "widths": list(args.widths),
                  "n_train": len(poisoned.y)}
    meta = {"model": "small_vgg", "widths": list(args.widths), "num_classes": 10, "dataset": "cifar10",
            "attack": name, "target": attack.target, "poison_ratio": cfg["ratio"]}
    resume = (run_dir / training.CHECKPOINTS).exists()  # also a run killed before its first epoch
    t0 = time.perf_counter()
    state, history = training.train(model, poisoned.x, poisoned.y, tcfg, eval_sets=eval_sets, run_dir=run_dir,
                                    run_config=run_config, meta=meta, resume=resume, quiet=args.quiet)
    train_seconds = time.perf_counter() - t0
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    before = evaluate(variables)
    print(f"  poisoned model: {fmt(before)}  (training {train_seconds:.0f} s this run, "
          f"{sum(r['seconds'] for r in history):.0f} s of epochs in all)", flush=True)

    after = {}
    for label, config in settings.items():
        after[label] = {"ibau": dataclasses.asdict(config),
                        "rounds": unlearn(model, config, variables, sets["clean_x"], sets["clean_y"], evaluate,
                                          args.seed, label)}
    return {"attack": name, "poison_ratio": cfg["ratio"], "options_resolved": attack.params,
            "n_poisoned": int(len(poisoned.poisoned_idx)), "n_noise": int(len(poisoned.noise_idx)),
            "train_history": history, "train_seconds": round(sum(r["seconds"] for r in history), 1),
            "before": before, "after": after, "seconds": round(time.perf_counter() - t_start, 1)}


def markdown(summary: dict[str, Any]) -> str:
    c = summary["config"]
    lines = [f"Small VGG (widths {'/'.join(map(str, c['widths']))}) trained on the first {c['n_train']} "
             f"CIFAR-10 training images for {c['epochs']} epochs (batch {c['batch_size']}, SGD lr {c['lr']}, "
             f"{'random crop pad ' + str(c['crop_pad']) + ' + ' if c['crop_pad'] else ''}random flip); "
             f"target class {c['target']}; clean accuracy and ASRs on CIFAR-10 test images "
             f"{c['n_clean']}..{c['n_clean'] + c['n_test'] - 1}; I-BAU on test images 0..{c['n_clean'] - 1}, "
             f"{c['rounds']} rounds per setting; seed {c['seed']}.", "",
             "| attack | poison ratio (options) | model | clean acc | ASR (all) | ASR (non-target) | seconds |",
             "|---|---|---|---|---|---|---|"]
    for name in c["attacks"]:
        res = summary["results"].get(name)
        if res is None:
            continue
        opts = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in res["config"]["options"].items())
        b = res["before"]
        lines.append(f"| {name} | {res['poison_ratio']:g}{f' ({opts})' if opts else ''} | poisoned | "
                     f"{b['clean_acc']:.4f} | {b['asr_all']:.4f} | {b['asr_nontarget']:.4f} | "
                     f"{res['train_seconds']:.0f} (training) |")
        for label, a in res["after"].items():
            r = a["rounds"][-1]
            secs = sum(x["seconds"] for x in a["rounds"])
            lines.append(f"| | | I-BAU {label}, {r['round']} round{'s' if r['round'] > 1 else ''} | {r['clean_acc']:.4f} | {r['asr_all']:.4f} | "
                         f"{r['asr_nontarget']:.4f} | {secs:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.environ.get("IBAU_SHARED", str(REPO.parent / "shared")),
                    help="the shared data folder (datasets/cifar10, ibau-original/triggers)")
    ap.add_argument("--out", default="experiments/results/attack_suite")
    ap.add_argument("--attacks", nargs="+", default=list(ATTACK_ORDER), choices=ATTACK_ORDER)
    ap.add_argument("--n-train", type=int, default=5000, help="first N CIFAR-10 training images")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--crop-pad", type=int, default=0,
                    help="random-crop padding of the training augmentation (ibau-jax attack: 4; 0 = no crop, "
                         "random horizontal flip only)")
    ap.add_argument("--widths", type=int, nargs=3, default=[16, 32, 64],
                    help="small VGG conv widths (the authors': 32 64 128)")
    ap.add_argument("--eval-every", type=int, default=5, help="epochs between evaluations during training")
    ap.add_argument("--poison-ratio", nargs="+", default=[], metavar="ATTACK=RATIO",
                    help="override a poison ratio, e.g. wanet=0.2")
    ap.add_argument("--option", nargs="+", default=[], metavar="ATTACK.KEY=VALUE",
                    help="override an attack option, e.g. wanet.s=1.0 wanet.noise=false")
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--n-clean", type=int, default=1000, help="defender's clean set: test images 0..n-1")
    ap.add_argument("--n-test", type=int, default=2000, help="held-out test images for accuracy and ASR")
    ap.add_argument("--rounds", type=int, default=3, help="I-BAU rounds per setting (0: train only)")
    ap.add_argument("--portion", type=float, nargs="*", default=[0.2],
                    help="extra I-BAU settings: fraction of each batch that gets δ (the original: 0.01)")
    ap.add_argument("--outer-lr", type=float, default=1e-3, help="outer Adam lr of the --portion settings")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of the pipeline")
    ap.add_argument("--quiet", action="store_true", help="no training progress bar")
    args = ap.parse_args()
    if args.quick:
        args.n_train, args.epochs, args.n_clean, args.n_test, args.rounds, args.eval_every = 1024, 1, 200, 200, 1, 1

    settings_by_attack = {k: {"ratio": v["ratio"], "options": dict(v["options"])} for k, v in ATTACK_SETTINGS.items()}
    for item in args.poison_ratio:
        name, _, ratio = item.partition("=")
        if name not in settings_by_attack or not ratio:
            raise SystemExit(f"--poison-ratio {item!r}: expected ATTACK=RATIO with ATTACK in {ATTACK_ORDER}")
        settings_by_attack[name]["ratio"] = float(ratio)
    for name, opts in parse_options(args.option).items():
        if name not in settings_by_attack:
            raise SystemExit(f"--option: unknown attack {name!r}; choose one of {ATTACK_ORDER}")
        settings_by_attack[name]["options"].update(opts)

    shared = Path(args.shared)
    t_all = time.perf_counter()
    train_set = data.load_cifar10(shared / "datasets/cifar10", split="train", download=False)
    test = data.load_cifar10(shared / "datasets/cifar10", split="test", download=False)
    if args.n_clean + args.n_test > len(test):
        raise SystemExit(f"--n-clean + --n-test exceed the {len(test)} test images")
    sets = {"train_x": data.to_float(train_set.x[:args.n_train]), "train_y": train_set.y[:args.n_train],
            "clean_x": data.to_float(test.x[:args.n_clean]), "clean_y": test.y[:args.n_clean],
            "test_x": data.to_float(test.x[args.n_clean:args.n_clean + args.n_test]),
            "test_y": test.y[args.n_clean:args.n_clean + args.n_test],
            "trigger_dir": shared / "ibau-original/triggers"}

    model = models.SmallVGG(10, widths=tuple(args.widths))
    settings = ibau_settings(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = {k: getattr(args, k) for k in ("n_train", "epochs", "batch_size", "lr", "crop_pad", "widths", "target",
                                              "n_clean", "n_test", "rounds", "portion", "outer_lr", "seed")}
    common["ibau"] = {label: dataclasses.asdict(c) for label, c in settings.items()}
    summary: dict[str, Any] = {"config": {**common, "attacks": args.attacks,
                                          "jax_backend": jax.default_backend(), "cpu_count": os.cpu_count()},
                               "results": {}}
    for name in args.attacks:
        cfg = settings_by_attack[name]
        config = {**common, "attack": name, "poison_ratio": cfg["ratio"], "options": cfg["options"]}
        path = out / name / "result.json"
        if path.is_file():
            done = json.loads(path.read_text())
            if done["config"] == json.loads(json.dumps(config)):
                print(f"[{name}] already done ({path}); skipping", flush=True)
                summary["results"][name] = done
                continue
            raise SystemExit(f"{path} was made with other settings; delete {out / name} or choose another --out")
        if (out / name / "train" / training.RUN_JSON).exists():
            old = training.read_run(out / name / "train")["config"]
            if old.get("poison_ratio") != cfg["ratio"] or old.get("attack_options") != cfg["options"]:
                raise SystemExit(f"{out / name / 'train'} holds a training run with other attack settings; "
                                 f"delete {out / name} or choose another --out")
        print(f"[{name}] poison ratio {cfg['ratio']}, options {cfg['options'] or 'defaults'}", flush=True)
        res = run_attack(name, args, cfg, sets, model, settings)
        res = {"config": config, **res}
        write_json(path, res)
        summary["results"][name] = res
        print(f"[{name}] done in {res['seconds']:.0f} s; wrote {path}", flush=True)
    summary["seconds_this_run"] = round(time.perf_counter() - t_all, 1)
    table = markdown(summary)
    write_json(out / "results.json", summary)
    write_text(out / "results.md", table)
    print(table, end="")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'} ({summary['seconds_this_run']:.0f} s this run)")


if __name__ == "__main__":
    main()
