"""``TorchBackend``: the :class:`macft.backends.Backend` for PyTorch (NVIDIA GPUs, or the CPU).

``train`` = check the hardware, join the process group when launched by
``accelerate launch``, load the base (optionally 4/8-bit), add seeded LoRA, build
the optimizer and hand an :class:`~cuda_backend.engine.TorchEngine` to the shared
loop. Everything else (batches, schedule, checkpoints, metrics, plots) is shared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from macft.backends import TrainJob
from macft.config import RunConfig
from macft.errors import BackendUnavailable
from macft.model_info import ModelInfo
from macft.training.events import TrainingCallback
from macft.training.loop import LoopResult

from . import hardware


class TorchBackend:
    name = "cuda"

    def __init__(self, facts: hardware.HardwareFacts | None = None):
        self._facts = facts  # injected by tests; probed on first use otherwise

    @property
    def facts(self) -> hardware.HardwareFacts:
        if self._facts is None:
            self._facts = hardware.probe()
        return self._facts

    def check(self, cfg: RunConfig, model_info: ModelInfo | None = None) -> list[str]:
        return hardware.problems(cfg.model.quantize, cfg.train.precision, model_info, self.facts,
                                 model_name=cfg.model.name)

    def memory_target(self, cfg: RunConfig, model_info: ModelInfo) -> Any:
        from macft.sizing.memory import Target

        facts = self.facts
        precision = hardware.choose_precision(cfg.train.precision, facts, model_info)
        nbytes = 2 if precision.name == "bf16" else 4
        if facts.cuda_available:
            import torch

            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            return Target("cuda", "gpu", nbytes, int(total), f"memory of {facts.gpu_name}")
        import psutil

        return Target("cuda", "cpu", nbytes, int(psutil.virtual_memory().available), "available RAM")

    def check_checkpoint(self, path: Path) -> None:
        from .engine import check_checkpoint

        check_checkpoint(path)

    def device(self) -> str:
        from .distributed import launched_world_size

        n = launched_world_size()
        return hardware.describe(self.facts) + (f", {n} processes" if n > 1 else "")

    def train(self, job: TrainJob, callback: TrainingCallback) -> LoopResult:
        from macft.training.loop import train as run_loop
        from macft.ui import warn

        from . import distributed
        from .engine import TorchEngine
        from .model import load_for_training, write_quant_record
        from .optim import make_optimizer

        cfg, facts = job.cfg, self.facts
        problems = self.check(cfg, job.model_info)
        if problems:
            raise BackendUnavailable(self.name, problems)
        precision = hardware.choose_precision(cfg.train.precision, facts, job.model_info)
        if not facts.cuda_available:
            import torch

            # Denormal floats are ~100x slower on x86 CPUs; random-init and small-weight models
            # produce them in the first steps (measured: 11 s vs 0.15 s per step).
            torch.set_flush_denormal(True)
        ctx = distributed.init(use_cuda=facts.cuda_available)
        notes: list[str] = []
        cpu = hardware.cpu_note(facts)
        if cpu and (cfg.train.backend != "auto" or facts.torch_cuda):
            # (--backend auto already said the plain "no GPU" case in its own words)
            notes.append(cpu)
        if precision.note:
            notes.append(precision.note)

        loaded = load_for_training(cfg, job.model_path, job.model_info, precision, ctx.device)
        optimizer, opt_name, opt_note = make_optimizer(
            [p for p in loaded.model.parameters() if p.requires_grad],
            on_gpu=facts.cuda_available, quantized=cfg.model.quantize != "none",
            weight_decay=cfg.train.weight_decay, have_bnb=facts.bitsandbytes)
        if opt_note:
            notes.append(opt_note)
        engine = TorchEngine(loaded.model, loaded.lora_modules, loaded.spec, optimizer, ctx,
                             precision, cfg.train.seed, self.device(),
                             distill_weight=cfg.train.distill_weight,
                             distill_temperature=cfg.train.distill_temperature)
        if ctx.rank == 0:
            for n in notes:
                warn(n)
            if loaded.quant_record is not None:
                write_quant_record(job.run_dir, loaded.quant_record)
        job.notes.extend(notes)
        job.notes.append(f"{precision.name} compute, {opt_name}"
                         + (f", base {cfg.model.quantize}" if cfg.model.quantize != "none" else ""))
        result = run_loop(engine, job.plan, job.valid_batches, job.settings, job.run_dir,
                          callback, job.resume_from)
        ctx.close()  # (after an exception the launcher tears the group down)
        return result

    def load_chat_model(self, model_path: Path, adapter_dir: Path | None, end_tokens: list[str]) -> Any:
        from .infer import TorchChatModel

        return TorchChatModel(model_path, adapter_dir, end_tokens)
