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


def cosine_lr(step: int, elapsed_s: float, *, lr_max: float, lr_min: float, total_steps: int,
              limit_min: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay over steps or over the time limit, whichever is
    further along, so a time-limited run still ends at lr_min."""
    if step < warmup:
        return lr_max * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if limit_min:
        t = max(t, min(1.0, elapsed_s / (60.0 * limit_min)))
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * t))


class TrainingRun:
    """One run's state: model, optimiser, synthesiser, step, best validation NMSE, checkpoints.

    The set-up keeps the order in which the global torch RNG is drawn (seed, model init, then the
    synthesiser's own generator), so a config gives the same run as before this class existed."""

    def __init__(self, cfg: dict, out: Path, steps: int | None = None, device_name: str | None = None,
                 time_limit_min: float | None = None):
        import torch

        from tools.training.synth import SynthConfig, Synthesizer

        from tools.cli import created_directory

        self.cfg, self.out = cfg, created_directory(out)
        threads = int(cfg.get("threads", 0) or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = pick_device(device_name or cfg.get("device", "auto"))
        seed = int(cfg.get("seed", 0))
        torch.manual_seed(seed)
        self.total_steps = int(steps or cfg.get("steps", 1000))
        self.limit_min = time_limit_min if time_limit_min is not None else float(cfg.get("time_limit_min", 0) or 0)

        self.task = Task(cfg)
        model, self.model_cfg = self.task.build(cfg["model"])
        self.model = model.to(self.device)
        self.synth_cfg = SynthConfig.from_dict(cfg.get("synth"))
        self.synth_cfg.coils = getattr(self.model_cfg, "coils", self.synth_cfg.coils)
        self.optim = torch.optim.Adam(self.model.parameters(), lr=float(cfg.get("lr", 1e-3)),
                                      weight_decay=float(cfg.get("weight_decay", 0.0)))
        self.lr_max, self.lr_min = float(cfg.get("lr", 1e-3)), float(cfg.get("lr_min", 1e-5))
        self.step, self.best, self.elapsed_before = 0, float("inf"), 0.0
        self.last_path, self.best_path = out / "last.pt", out / "best.pt"
        self.synth = Synthesizer(self.synth_cfg, device=self.device, seed=seed)

    def lr_at(self, step: int, elapsed_s: float = 0.0) -> float:
        return cosine_lr(step, elapsed_s, lr_max=self.lr_max, lr_min=self.lr_min,
                         total_steps=self.total_steps, limit_min=self.limit_min)

    def restore(self, resume: bool, init: str | None) -> None:
        """Weights from `init` (fresh optimiser and schedule), or everything from OUT/last.pt on resume."""
        import torch
        if init and not (resume and self.last_path.exists()):
            self.model.load_state_dict(torch.load(init, map_location=self.device, weights_only=False)["model"])
        if resume and self.last_path.exists():
            state = torch.load(self.last_path, map_location=self.device, weights_only=False)
            self.model.load_state_dict(state["model"])
            self.optim.load_state_dict(state["optim"])
            self.step, self.best = state["step"], state.get("best", self.best)
            self.elapsed_before = state.get("elapsed_s", 0.0)
            self.synth.gen.set_state(state["synth_rng"])
            torch.set_rng_state(state["torch_rng"])

    def save(self, path: Path, elapsed: float) -> None:
        import torch
        torch.save({"model": self.model.state_dict(), "optim": self.optim.state_dict(), "step": self.step,
                    "best": self.best, "elapsed_s": elapsed, "model_cfg": self.model_cfg.to_dict(),
                    "synth_cfg": self.synth_cfg.to_dict(), "variant": self.cfg.get("variant", "custom"),
                    "architecture": self.task.architecture,
                    "config": self.cfg, "device": str(self.device), "threads": torch.get_num_threads(),
                    "synth_rng": self.synth.gen.get_state(), "torch_rng": torch.get_rng_state()}, path)

    def optimisation_step(self, lr: float) -> tuple:
        """One step on a fresh synthetic batch: (loss, per-block losses, gradient norm, batch)."""
        import torch
        for group in self.optim.param_groups:
            group["lr"] = lr
        batch = self.task.batch(self.synth)
        outputs = self.model(*self.task.inputs(batch), return_all=True)
        per_block = block_losses(self.task.supervised(outputs), batch["target"], batch.get("row_weight"))
        loss = per_block.sum()
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.cfg.get("grad_clip", 1.0)))
        self.optim.step()
        self.step += 1
        return loss, per_block, grad_norm, batch

    def validate(self, batches: list[dict], elapsed: float) -> dict:
        """Validation metrics; a new best NMSE is checkpointed to OUT/best.pt."""
        metrics = evaluate(self.task, self.model, batches)
        if metrics["val_nmse"] < self.best:
            self.best = metrics["val_nmse"]
            self.save(self.best_path, elapsed)
        return metrics


def train(cfg: dict, out: Path, resume: bool = False, steps: int | None = None,
          device_name: str | None = None, time_limit_min: float | None = None,
          progress: bool = True, init: str | None = None) -> dict:
    import torch
    from tqdm import tqdm

    from models.pisf_net import parameter_count

    run = TrainingRun(cfg, out, steps=steps, device_name=device_name, time_limit_min=time_limit_min)
    run.restore(resume, init)
    val = validation_set(run.task, run.synth_cfg, run.device, int(cfg.get("val_seed", 999)),
                         int(cfg.get("val_batches", 6)))
    log = open(out / "log.jsonl", "a")
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    print(f"device {run.device}, threads {torch.get_num_threads()}, params {parameter_count(run.model)}, "
          f"steps {run.step}->{run.total_steps}", flush=True)

    start = time.time()
    val_every, ckpt_every = int(cfg.get("val_every", 250)), int(cfg.get("ckpt_every", 250))
    bar = tqdm(total=run.total_steps, initial=run.step, disable=not progress, mininterval=5.0)
    running = None
    run.model.train()
    while run.step < run.total_steps:
        lr = run.lr_at(run.step, run.elapsed_before + time.time() - start)
        loss, per_block, grad_norm, batch = run.optimisation_step(lr)
        step = run.step
        final = float(per_block[-1].detach())
        running = final if running is None else 0.98 * running + 0.02 * final
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.2e}", final=f"{running:.2e}")
        elapsed = run.elapsed_before + time.time() - start
        record = None
        if step % 25 == 0:
            record = {"step": step, "loss": float(loss), "final_mse": final, "lr": lr,
                      "grad_norm": float(grad_norm), "ny": batch["ny"], "elapsed_s": round(elapsed, 1)}
        if step % val_every == 0 or step == run.total_steps:
            metrics = run.validate(val, elapsed)
            record = (record or {"step": step, "elapsed_s": round(elapsed, 1)}) | metrics
            bar.write(f"step {step} val_nmse {metrics['val_nmse']:.4e} baseline {metrics['val_nmse_baseline']:.4e} "
                      f"gain {metrics['val_gain_db']:.2f} dB elapsed {elapsed / 60:.1f} min")
        if record:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if step % ckpt_every == 0:
            run.save(run.last_path, elapsed)
        if run.limit_min and elapsed / 60 >= run.limit_min:
            bar.write(f"time limit reached at step {step}")
            break
    elapsed = run.elapsed_before + time.time() - start
    run.save(run.last_path, elapsed)
    if not run.best_path.exists():
        run.save(run.best_path, elapsed)
    bar.close()
    log.close()
    return {"step": run.step, "elapsed_s": elapsed, "best_val_nmse": run.best}


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
