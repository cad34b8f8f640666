"""`pisf train`: train the PISF network on on-the-fly synthetic data (tools/training/synth.py).

Loss: MSE between every block's output and the clean target hybrid k-space, summed over blocks
(as the authors do): deep supervision gives every unrolled block a direct gradient, which speeds
up the short CPU training; k-space MSE equals image MSE (orthonormal transforms), i.e. what PSNR
measures. Logs one JSON line per log interval / validation to OUT/log.jsonl; checkpoints to
OUT/last.pt (and OUT/best.pt by validation NMSE).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML training config (config/train_*.yaml)")
    parser.add_argument("--out", default=None, help="run folder (default runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--steps", type=int, default=None, help="override the total step count")
    parser.add_argument("--device", default=None, help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--init", default=None,
                        help="start from this checkpoint's weights (fresh optimiser and schedule)")
    parser.add_argument("--time-limit-min", type=float, default=None,
                        help="stop and checkpoint after this many minutes")


def load_config(path: str | Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def pick_device(name: str | None):
    import torch
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def block_losses(outputs, target, weight=None):
    """Per-block MSE [blocks] (weighted per row when the batch says so); the loss is their sum."""
    import torch
    if weight is None:
        return torch.stack([torch.mean((o - target) ** 2) for o in outputs])
    return torch.stack([torch.mean(weight * (o - target) ** 2) for o in outputs])


class Task:
    """What differs between the two architectures: model, batches, inputs, baseline.

    `pisf` (v1, models/pisf_net.py): inputs (kspace, mask); baseline = zero filling.
    `sense` (v2, models/pisf_sense.py): inputs (kspace, mask, sens); outputs[0] is the
    network's own initial SENSE solution, which is the baseline the blocks must beat.
    """

    def __init__(self, cfg: dict):
        self.architecture = cfg.get("architecture", "pisf")
        self.sense_options = dict(cfg.get("sense_synth") or {})

    def build(self, model_cfg: dict):
        if self.architecture == "sense":
            from models.pisf_sense import PisfSenseNet, SenseNetConfig
            cfg = SenseNetConfig(**model_cfg)
            return PisfSenseNet(cfg), cfg
        from models.pisf_net import PisfConfig, PisfNet
        cfg = PisfConfig(**model_cfg)
        return PisfNet(cfg), cfg

    def batch(self, synth, **kwargs) -> dict:
        if self.architecture == "sense":
            from tools.training.synth import sense_batch
            return sense_batch(synth, **self.sense_options, **kwargs)
        return synth.batch(**kwargs)

    def inputs(self, batch: dict) -> tuple:
        if self.architecture == "sense":
            return batch["inputs"], batch["mask"], batch["sens"]
        return batch["inputs"], batch["mask"]

    def supervised(self, outputs: list) -> list:
        """Outputs that get a loss term (v2: the blocks, not the fixed SENSE start)."""
        return outputs[1:] if self.architecture == "sense" else outputs

    def baseline(self, batch: dict, outputs: list):
        return outputs[0] if self.architecture == "sense" else batch["inputs"]


def validation_set(task: Task, synth_cfg, device, seed: int, batches: int) -> list[dict]:
    """Fixed held-back synthetic batches (own seed) at a few row lengths."""
    from tools.training.synth import Synthesizer
    synth = Synthesizer(synth_cfg, device=device, seed=seed)
    lengths = [96, 192, 256, 320, 384, 512]
    return [{k: v for k, v in task.batch(synth, ny=lengths[i % len(lengths)]).items()
             if k in ("inputs", "mask", "target", "sens")} for i in range(batches)]


def evaluate(task: Task, model, batches) -> dict:
    """NMSE of the network and of the baseline (zero filling for v1, the network's initial
    SENSE solution for v2) over the validation batches (all rows)."""
    import torch
    model.eval()
    err = err_base = energy = 0.0
    with torch.no_grad():
        for b in batches:
            outputs = model(*task.inputs(b), return_all=True)
            err += float(((outputs[-1] - b["target"]) ** 2).sum())
            err_base += float(((task.baseline(b, outputs) - b["target"]) ** 2).sum())
            energy += float((b["target"] ** 2).sum())
    model.train()
    return {"val_nmse": err / energy, "val_nmse_baseline": err_base / energy,
            "val_gain_db": 10 * math.log10(err_base / max(err, 1e-30))}


def train(cfg: dict, out: Path, resume: bool = False, steps: int | None = None,
          device_name: str | None = None, time_limit_min: float | None = None,
          progress: bool = True, init: str | None = None) -> dict:
    import torch
    from tqdm import tqdm

    from models.pisf_net import parameter_count
    from tools.training.synth import SynthConfig, Synthesizer

    out.mkdir(parents=True, exist_ok=True)
    threads = int(cfg.get("threads", 0) or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    device = pick_device(device_name or cfg.get("device", "auto"))
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    total_steps = int(steps or cfg.get("steps", 1000))
    limit_min = time_limit_min if time_limit_min is not None else float(cfg.get("time_limit_min", 0) or 0)

    task = Task(cfg)
    model, model_cfg = task.build(cfg["model"])
    model = model.to(device)
    synth_cfg = SynthConfig.from_dict(cfg.get("synth"))
    synth_cfg.coils = getattr(model_cfg, "coils", synth_cfg.coils)
    optim = torch.optim.Adam(model.parameters(), lr=float(cfg.get("lr", 1e-3)),
                             weight_decay=float(cfg.get("weight_decay", 0.0)))
    lr_max, lr_min = float(cfg.get("lr", 1e-3)), float(cfg.get("lr_min", 1e-5))

    def lr_at(step: int, elapsed_s: float = 0.0) -> float:
        """Linear warm-up, then cosine decay over steps or over the time limit, whichever is
        further along, so a time-limited run still ends at lr_min."""
        warmup = 100
        if step < warmup:
            return lr_max * (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if limit_min:
            t = max(t, min(1.0, elapsed_s / (60.0 * limit_min)))
        return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * t))

    step, best, elapsed_before = 0, float("inf"), 0.0
    last_path, best_path = out / "last.pt", out / "best.pt"
    synth = Synthesizer(synth_cfg, device=device, seed=seed)
    if init and not (resume and last_path.exists()):
        model.load_state_dict(torch.load(init, map_location=device, weights_only=False)["model"])
    if resume and last_path.exists():
        state = torch.load(last_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        step, best = state["step"], state.get("best", best)
        elapsed_before = state.get("elapsed_s", 0.0)
        synth.gen.set_state(state["synth_rng"])
        torch.set_rng_state(state["torch_rng"])

    def save(path: Path, elapsed: float) -> None:
        torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "step": step,
                    "best": best, "elapsed_s": elapsed, "model_cfg": model_cfg.to_dict(),
                    "synth_cfg": synth_cfg.to_dict(), "variant": cfg.get("variant", "custom"),
                    "architecture": task.architecture,
                    "config": cfg, "device": str(device), "threads": torch.get_num_threads(),
                    "synth_rng": synth.gen.get_state(), "torch_rng": torch.get_rng_state()}, path)

    val = validation_set(task, synth_cfg, device, int(cfg.get("val_seed", 999)), int(cfg.get("val_batches", 6)))
    log = open(out / "log.jsonl", "a")
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    print(f"device {device}, threads {torch.get_num_threads()}, params {parameter_count(model)}, "
          f"steps {step}->{total_steps}", flush=True)

    start = time.time()
    val_every, ckpt_every = int(cfg.get("val_every", 250)), int(cfg.get("ckpt_every", 250))
    bar = tqdm(total=total_steps, initial=step, disable=not progress, mininterval=5.0)
    running = None
    model.train()
    while step < total_steps:
        lr = lr_at(step, elapsed_before + time.time() - start)
        for group in optim.param_groups:
            group["lr"] = lr
        batch = task.batch(synth)
        outputs = model(*task.inputs(batch), return_all=True)
        per_block = block_losses(task.supervised(outputs), batch["target"], batch.get("row_weight"))
        loss = per_block.sum()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.get("grad_clip", 1.0)))
        optim.step()
        step += 1
        final = float(per_block[-1].detach())
        running = final if running is None else 0.98 * running + 0.02 * final
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.2e}", final=f"{running:.2e}")
        elapsed = elapsed_before + time.time() - start
        record = None
        if step % 25 == 0:
            record = {"step": step, "loss": float(loss), "final_mse": final, "lr": lr,
                      "grad_norm": float(grad_norm), "ny": batch["ny"], "elapsed_s": round(elapsed, 1)}
        if step % val_every == 0 or step == total_steps:
            metrics = evaluate(task, model, val)
            record = (record or {"step": step, "elapsed_s": round(elapsed, 1)}) | metrics
            if metrics["val_nmse"] < best:
                best = metrics["val_nmse"]
                save(best_path, elapsed)
            bar.write(f"step {step} val_nmse {metrics['val_nmse']:.4e} baseline {metrics['val_nmse_baseline']:.4e} "
                      f"gain {metrics['val_gain_db']:.2f} dB elapsed {elapsed / 60:.1f} min")
        if record:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if step % ckpt_every == 0:
            save(last_path, elapsed)
        if limit_min and elapsed / 60 >= limit_min:
            bar.write(f"time limit reached at step {step}")
            break
    elapsed = elapsed_before + time.time() - start
    save(last_path, elapsed)
    if not best_path.exists():
        save(best_path, elapsed)
    bar.close()
    log.close()
    return {"step": step, "elapsed_s": elapsed, "best_val_nmse": best}


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    result = train(cfg, out, resume=args.resume, steps=args.steps, device_name=args.device,
                   time_limit_min=args.time_limit_min, init=args.init)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":   # `python -m tools.training.train ...`, same as `pisf train ...`
    _parser = argparse.ArgumentParser(prog="pisf train")
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
