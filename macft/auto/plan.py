"""What `--auto` will try, and for how many steps: pure arithmetic, deterministic.

The method (README "Automatic hyperparameters"):

1. **The run's length** is not guessed: the run trains up to :func:`max_epochs` epochs with
   validation four times per epoch, and stops when the validation loss has not improved
   for a whole epoch (``train.early_stop``); its adapter is then the best one. Small data
   sets get more epochs (fewer than ~400 steps in three epochs), large ones three.
2. **Learning rate, then rank, by successive halving on the run's own schedule.** Every
   candidate trains the first ``rung1`` steps of the *real* run (same data order, same
   cosine schedule over the whole run, only its learning rate or rank differs), and is
   compared on the validation loss there: four learning rates a factor of 3 apart
   (base/3 .. 9 x base; up to two more beyond an edge while the best sits on it), then the
   rank halved and doubled at the best learning rate. The two best continue to ``rung2``
   (= 2 x rung1); there the lower validation loss wins, unless the other one's greedy
   answers to held-out prompts stop at the end of the turn without repeating more often
   and its loss is within :data:`BEHAVIOUR_MARGIN` (early in training no answer is good,
   so answers decide only between candidates the loss cannot tell apart).
   A comparison this early favours the rates that learn fastest at first; over the whole run
   a lower one ends best, so the run uses the winner's rate times
   ``(rung2 / run steps) ** HORIZON_EXPONENT`` and starts afresh (see the constant).
3. **Budget.** The search's own cost, the steps of every candidate that does *not* become
   the run plus the validation passes, is held to ``--auto-budget`` (a fraction of the run's
   steps, default 0.25, or a duration), but a fraction never buys less than
   :data:`MIN_SEARCH_STEPS` (the whole run of a small data set is ~100 steps: a quarter of it
   cannot tell candidates apart, and costs seconds to minutes). When the budget leaves
   fewer than :data:`MIN_RUNG` steps per candidate, the rank stage goes first; below that the
   budget is raised to the smallest search that can still compare learning rates, and the
   plan says so.

Flags given explicitly (on the command line or in a YAML config) are kept fixed: a fixed
learning rate skips stage 1, a fixed rank stage 2, fixed epochs/iters the run-length rule.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import MacftError

LR_FACTOR = 3.0  # learning rates tried: base * LR_FACTOR ** k
LR_POWERS = (-1, 0, 1, 2)  # base/3, base, 3 base, 9 base (LoRA tolerates more than full fine-tuning)
RANK_FACTORS = (0.5, 2.0)  # rank alternatives, tried at the best learning rate
MIN_RUNG = 8  # fewest steps a candidate trains before it is compared
MIN_SEARCH_STEPS = 100  # a fraction budget buys at least this many step-equivalents
MAX_EDGE = 2  # learning rates added beyond an edge of the first four
BEHAVIOUR_MARGIN = 0.05  # answers decide between candidates whose losses are this close
# Compared after a few steps, the rates that learn fastest early win; over the whole run a lower
# one ends best. The run takes the winner's rate x (rung2 / run steps) ** HORIZON_EXPONENT
# (bench/auto_vs_grid.py: the grid's best rate was 0.6x and 0.19x the early winner at
# rung2/run = 0.2 and 0.04 on the w256 tasks; the cube root gives 0.58x and 0.34x).
HORIZON_EXPONENT = 1 / 3
RUNG_GROWTH = 2  # rung 2 ends at RUNG_GROWTH x rung 1
SURVIVORS = 2  # candidates that reach rung 2
EVALS_PER_EPOCH = 4
PATIENCE = 4  # evaluations without improvement (one epoch) before the run stops
TARGET_STEPS = 600  # small data: enough epochs to reach about this many steps ...
MIN_EPOCHS, MAX_EPOCHS = 3, 10  # ... within these bounds
EVAL_COST = 1 / 3  # a validation batch costs about a third of a training micro-batch (no backward)
DEFAULT_FRACTION = 0.25

# The settings the search may choose; explicit ones stay fixed.
SEARCHED = ("train.learning_rate", "lora.rank", "lora.alpha", "train.epochs", "train.iters",
            "train.eval_every", "train.early_stop", "train.warmup_ratio")


@dataclass(frozen=True)
class Budget:
    """``--auto-budget``: a fraction of the run's steps, or a duration in seconds."""

    fraction: float | None = DEFAULT_FRACTION
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str | float | None) -> Budget:
        if text is None:
            return cls()
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            return cls._fraction(float(text), str(text))
        s = str(text).strip().lower()
        if s.endswith("%"):
            try:
                return cls._fraction(float(s[:-1]) / 100, text)
            except ValueError:
                pass
        try:
            return cls._fraction(float(s), text)
        except ValueError:
            pass
        m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m(?:in)?)?\s*(?:(\d+(?:\.\d+)?)s)?", s)
        if s and m and any(m.groups()):
            h, mi, se = (float(g) if g else 0.0 for g in m.groups())
            seconds = 3600 * h + 60 * mi + se
            if seconds > 0:
                return cls(fraction=None, seconds=seconds)
        raise MacftError(f"--auto-budget {text!r} is neither a fraction of the run nor a duration.",
                         "Use e.g. --auto-budget 0.25 (a quarter of the run's time), 25%, 20m or 1h30m.")

    @classmethod
    def _fraction(cls, f: float, text: Any) -> Budget:
        if not 0 < f <= 4 or not math.isfinite(f):
            raise MacftError(f"--auto-budget {text} is out of range: a fraction of the run's time between "
                             "0 and 4 is expected.", "Use e.g. --auto-budget 0.25, or a duration such as 20m.")
        return cls(fraction=f, seconds=None)

    def describe(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction:g}x the run"
        assert self.seconds is not None
        return f"{self.seconds / 60:.1f} min"


@dataclass(frozen=True)
class Candidate:
    name: str
    learning_rate: float
    rank: int
    alpha: float
    stage: str  # "lr", "lr-edge", "rank"

    def label(self) -> str:
        return f"lr {self.learning_rate:.1e}, rank {self.rank}"


@dataclass
class SearchPlan:
    """The whole search, fixed before it starts (deterministic for a config and data)."""

    run_steps: int  # the full run's optimizer steps (at most; it may stop early)
    epochs: float
    steps_per_epoch: int
    eval_every: int
    early_stop: int
    warmup_ratio: float
    base_lr: float
    base_rank: int
    alpha_ratio: float | None  # alpha = ratio x rank; None: alpha fixed
    fixed_alpha: float | None
    lrs: list[float]
    ranks: list[int]  # rank alternatives (stage 2); empty when the rank is fixed or cut
    rung1: int
    rung2: int
    budget_steps: float  # the search cost allowed, in micro-batch equivalents
    planned_cost: float  # the search cost planned (worst case: with the edge extensions)
    raised: bool = False  # the budget was too small for the smallest useful search
    dropped_rank_stage: bool = False
    fixed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def horizon_factor(self) -> float:
        """What the run's learning rate is of the rung-2 winner's (see HORIZON_EXPONENT)."""
        if not self.rung2 or not self.run_steps:
            return 1.0
        return min(1.0, (self.rung2 / self.run_steps) ** HORIZON_EXPONENT)

    @property
    def searches_anything(self) -> bool:
        return len(self.lrs) > 1 or bool(self.ranks)

    def alpha_for(self, rank: int) -> float:
        if self.fixed_alpha is not None:
            return self.fixed_alpha
        assert self.alpha_ratio is not None
        return self.alpha_ratio * rank

    def first_rung(self) -> list[Candidate]:
        return [Candidate(f"lr{i}", lr, self.base_rank, self.alpha_for(self.base_rank), "lr")
                for i, lr in enumerate(self.lrs)]

    def edge_candidate(self, best_lr: float, tried: list[float]) -> Candidate | None:
        """One more learning rate beyond the edge of those ``tried`` that the best one sits on
        (None: not at an edge, or :data:`MAX_EDGE` added already)."""
        if len(self.lrs) < 2 or len(tried) - len(self.lrs) >= MAX_EDGE:
            return None
        if best_lr == max(tried):
            lr = best_lr * LR_FACTOR
        elif best_lr == min(tried):
            lr = best_lr / LR_FACTOR
        else:
            return None
        if not 1e-6 <= lr < 0.1:
            return None
        return Candidate(f"lr{len(tried)}", lr, self.base_rank, self.alpha_for(self.base_rank), "lr-edge")

    def rank_candidates(self, lr: float) -> list[Candidate]:
        return [Candidate(f"rank{r}", lr, r, self.alpha_for(r), "rank") for r in self.ranks]

    def n_first_rung(self) -> int:
        """Candidates that train to rung 1, counting the possible edge extensions."""
        return len(self.lrs) + (MAX_EDGE if len(self.lrs) > 1 else 0) + len(self.ranks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        parts = []
        if len(self.lrs) > 1:
            parts.append(f"{len(self.lrs)} learning rates ({', '.join(f'{x:.1e}' for x in self.lrs)})")
        if self.ranks:
            parts.append(f"ranks {', '.join(str(r) for r in self.ranks)} beside {self.base_rank}")
        run = (f"the run: up to {self.epochs:g} epochs ({self.run_steps} steps), stopping when the validation "
               f"loss has not improved for {self.early_stop} evaluations" if self.early_stop
               else f"the run: {self.run_steps} steps")
        if not parts:
            return f"nothing but the run's length; {run}"
        return (f"{' and '.join(parts)}; {self.rung1} steps each, the best {SURVIVORS} to step {self.rung2}; "
                f"{run}")


def max_epochs(steps_per_epoch: int) -> int:
    """Epochs the run may take (it stops earlier when validation stops improving)."""
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / max(steps_per_epoch, 1)))))


def alternative_ranks(rank: int) -> list[int]:
    out = []
    for f in RANK_FACTORS:
        r = max(1, int(round(rank * f)))
        if r != rank and r not in out:
            out.append(r)
    return out


def plan_search(*, base_lr: float, base_rank: int, base_alpha: float, epochs: float, iters: int,
                eval_every: int, early_stop: int, warmup_ratio: float, steps_per_epoch: int,
                valid_batches: int, fixed: set[str], budget: Budget,
                seconds_per_step: float | None = None) -> SearchPlan:
    """The search for a run whose config has these values; ``fixed``: the keys (``"section.name"``)
    given explicitly, which stay as they are. ``seconds_per_step`` turns a duration budget into
    steps (required then)."""
    notes: list[str] = []
    spe = max(1, steps_per_epoch)
    # -- the run's length --------------------------------------------------------
    length_fixed = bool({"train.epochs", "train.iters"} & fixed)
    if length_fixed:
        run_steps = iters if iters > 0 else max(1, math.ceil(epochs * spe))
        run_epochs = run_steps / spe
        stop = early_stop
        every = eval_every
    else:
        run_epochs = max_epochs(spe)
        run_steps = run_epochs * spe
        every = eval_every if "train.eval_every" in fixed else max(1, spe // EVALS_PER_EPOCH)
        stop = early_stop if "train.early_stop" in fixed else PATIENCE
    # -- candidates ----------------------------------------------------------------
    lrs = [base_lr] if "train.learning_rate" in fixed else [base_lr * LR_FACTOR ** k for k in LR_POWERS]
    lrs = [lr for lr in lrs if lr < 0.1]
    ranks = [] if "lora.rank" in fixed else alternative_ranks(base_rank)
    fixed_alpha = base_alpha if "lora.alpha" in fixed else None
    ratio = None if fixed_alpha is not None else base_alpha / base_rank
    # -- budget ------------------------------------------------------------------
    if budget.fraction is not None:
        allowed = budget.fraction * run_steps
        if allowed < MIN_SEARCH_STEPS:
            notes.append(f"a short run ({run_steps} steps): the search gets its floor of {MIN_SEARCH_STEPS} "
                         f"step-equivalents instead of {allowed:.0f}")
            allowed = float(MIN_SEARCH_STEPS)
    else:
        if not seconds_per_step or seconds_per_step <= 0:
            raise ValueError("a duration budget needs the time per step")
        assert budget.seconds is not None
        allowed = budget.seconds / seconds_per_step
    eval_cost = valid_batches * EVAL_COST

    def cost(n_first: int, r1: int) -> float:
        # every first-rung candidate, the survivors' rung-2 steps, one validation pass per
        # candidate and rung (the run starts afresh at the chosen rate: no candidate is reused)
        return n_first * r1 + SURVIVORS * (RUNG_GROWTH - 1) * r1 + (n_first + SURVIVORS) * eval_cost

    def n_first(lr_list: list[float], rank_list: list[int]) -> int:
        return len(lr_list) + (MAX_EDGE if len(lr_list) > 1 else 0) + len(rank_list)

    def fit_rung(n: int) -> int:
        per = n + SURVIVORS * (RUNG_GROWTH - 1)
        return int((allowed - (n + SURVIVORS) * eval_cost) // max(per, 1))

    # warm-up must end before the first comparison, or every candidate is still warming up
    def warm(r1: int) -> float:
        if "train.warmup_ratio" in fixed:
            return warmup_ratio
        return min(warmup_ratio, (r1 // 2) / max(run_steps, 1))

    dropped = raised = False
    n = n_first(lrs, ranks)
    if len(lrs) == 1 and not ranks:  # nothing to compare: the run alone (its length measured)
        return SearchPlan(run_steps, run_epochs, spe, every, stop, warmup_ratio, base_lr, base_rank, ratio,
                          fixed_alpha, lrs, [], 0, 0, allowed, 0.0, fixed=sorted(fixed), notes=notes)
    r1 = fit_rung(n)
    if r1 < MIN_RUNG and ranks and len(lrs) > 1:
        dropped = True
        notes.append(f"the budget leaves too few steps for the rank stage: rank stays {base_rank}")
        ranks = []
        n = n_first(lrs, ranks)
        r1 = fit_rung(n)
    if r1 < MIN_RUNG:
        need = cost(n, MIN_RUNG)
        raised = True
        notes.append(f"the budget ({allowed:.0f} step-equivalents) is below the smallest search that can "
                     f"compare ({need:.0f}): using that")
        r1 = MIN_RUNG
    r1 = min(r1, max(MIN_RUNG, run_steps // (2 * RUNG_GROWTH)))  # the rungs stay in the run's first half
    r2 = RUNG_GROWTH * r1
    if r2 > run_steps:
        r1, r2 = max(1, run_steps // RUNG_GROWTH), run_steps
    return SearchPlan(run_steps, run_epochs, spe, every, stop, warm(r1), base_lr, base_rank, ratio, fixed_alpha,
                      lrs, ranks, r1, r2, allowed, cost(n, r1), raised, dropped, sorted(fixed), notes)


# --------------------------------------------------------------------------- selection


@dataclass
class Score:
    """A candidate's standing at a rung: validation loss, and (rung 2) its behaviour."""

    candidate: Candidate
    val_loss: float
    behaviour_ok: int | None = None  # prompts answered well (stopped, no repetition); None: not checked


def rank_scores(scores: list[Score]) -> list[Score]:
    """Best first: lower validation loss (a diverged run, NaN, last), the lower rank and
    learning rate on a tie (cheaper, safer); then a candidate moves ahead of the one before it
    when its answers are better (more prompts answered well) and its loss is within
    :data:`BEHAVIOUR_MARGIN` of that one's."""

    def key(s: Score) -> tuple:
        loss = s.val_loss if math.isfinite(s.val_loss) else math.inf
        return (loss, s.candidate.rank, s.candidate.learning_rate)

    out = sorted(scores, key=key)
    changed = True
    while changed:
        changed = False
        for i in range(len(out) - 1):
            a, b = out[i], out[i + 1]
            if (b.behaviour_ok or 0) > (a.behaviour_ok or 0) and math.isfinite(b.val_loss) and \
                    (not math.isfinite(a.val_loss) or b.val_loss <= a.val_loss * (1 + BEHAVIOUR_MARGIN)):
                out[i], out[i + 1] = b, a
                changed = True
    return out
