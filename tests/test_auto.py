"""`--auto`: the search plan (budget, fixed flags, determinism), the selection rules and the
repetition check; pure, no model. The search run end to end is in test_auto_train.py."""

from __future__ import annotations

import math

import pytest

from macft.auto.behaviour import is_repetitive
from macft.auto.driver import explicit_keys
from macft.auto.plan import (
    MIN_RUNG,
    MIN_SEARCH_STEPS,
    PATIENCE,
    Budget,
    Candidate,
    Score,
    max_epochs,
    plan_search,
    rank_scores,
)
from macft.config import RunConfig
from macft.errors import MacftError


def plan(fixed=(), budget=Budget(), spe=100, valid_batches=10, **kw):
    args = dict(base_lr=2e-4, base_rank=16, base_alpha=32.0, epochs=3.0, iters=0, eval_every=50,
                early_stop=0, warmup_ratio=0.05, steps_per_epoch=spe, valid_batches=valid_batches,
                fixed=set(fixed), budget=budget)
    args.update(kw)
    return plan_search(**args)


# --------------------------------------------------------------------------- budget


@pytest.mark.parametrize("text,fraction,seconds", [
    (None, 0.25, None), ("0.25", 0.25, None), ("25%", 0.25, None), ("1", 1.0, None), (0.5, 0.5, None),
    ("20m", None, 1200.0), ("1h30m", None, 5400.0), ("90s", None, 90.0), ("1h", None, 3600.0),
    ("2min", None, 120.0)])
def test_budget_parses_fractions_and_durations(text, fraction, seconds):
    b = Budget.parse(text)
    assert (b.fraction, b.seconds) == (fraction, seconds)


@pytest.mark.parametrize("bad", ["0", "-1", "soon", "5", "m", "nan", ""])
def test_budget_refuses_nonsense_with_the_fix(bad):
    with pytest.raises(MacftError) as e:
        Budget.parse(bad)
    assert "--auto-budget" in e.value.message and "20m" in e.value.hint


def test_the_search_fits_its_budget():
    for spe, frac in [(100, 0.25), (1000, 0.25), (100, 0.5), (250, 0.1), (400, 1.0)]:
        p = plan(spe=spe, budget=Budget(frac))
        assert not p.raised
        assert p.planned_cost <= p.budget_steps + 1e-9, (spe, frac, p)
        assert p.rung1 >= MIN_RUNG and p.rung2 == 2 * p.rung1 <= p.run_steps // 2
        assert math.isclose(p.budget_steps, max(frac * p.run_steps, MIN_SEARCH_STEPS))


def test_a_larger_budget_buys_longer_rungs():
    small, large = plan(spe=1000, budget=Budget(0.1)), plan(spe=1000, budget=Budget(0.5))
    assert large.rung1 > small.rung1 and large.planned_cost > small.planned_cost


def test_a_duration_budget_is_converted_with_the_time_per_step():
    p = plan(spe=1000, budget=Budget.parse("10m"), seconds_per_step=0.5)
    assert p.budget_steps == pytest.approx(1200)
    assert p.planned_cost <= 1200
    with pytest.raises(ValueError):
        plan(spe=1000, budget=Budget.parse("10m"))


def test_a_short_run_gets_the_floor_of_the_search():
    # 40 examples: 10 steps per epoch; the run gets 10 epochs (100 steps), a quarter is 25 steps
    p = plan(spe=10, valid_batches=1)
    assert p.run_steps == 100 and p.epochs == 10
    assert p.budget_steps == MIN_SEARCH_STEPS and any("floor" in n for n in p.notes)
    assert not p.raised and p.ranks == [8, 32] and p.rung1 >= MIN_RUNG
    assert p.planned_cost <= MIN_SEARCH_STEPS


def test_a_tight_budget_drops_the_rank_stage_first_then_is_raised_and_says_so():
    # a duration: 60 s at 1 s per step
    p = plan(spe=100, valid_batches=10, budget=Budget.parse("60s"), seconds_per_step=1.0)
    assert p.dropped_rank_stage and p.ranks == []
    assert p.raised and p.rung1 == MIN_RUNG
    assert any("rank stays 16" in n for n in p.notes) and any("below the smallest search" in n for n in p.notes)
    # a little more keeps the learning rates and drops only the rank stage
    q = plan(spe=100, valid_batches=1, budget=Budget.parse("70s"), seconds_per_step=1.0)
    assert q.dropped_rank_stage and not q.raised and len(q.lrs) == 4 and q.rung1 >= MIN_RUNG


def test_run_length_small_data_get_more_epochs_large_data_three():
    assert max_epochs(10) == 10 and max_epochs(100) == 6 and max_epochs(1000) == 3 and max_epochs(1) == 10
    p = plan(spe=100)
    assert p.epochs == 6 and p.run_steps == 600 and p.eval_every == 25 and p.early_stop == PATIENCE


def test_the_run_rate_is_the_winners_scaled_for_the_horizon():
    p = plan(spe=100)
    assert p.horizon_factor == pytest.approx((p.rung2 / p.run_steps) ** (1 / 3))
    assert 0 < p.horizon_factor < 1


def test_plan_is_deterministic():
    assert plan(spe=137).to_dict() == plan(spe=137).to_dict()


def test_warmup_ends_before_the_first_comparison():
    p = plan(spe=1000)
    assert round(p.run_steps * p.warmup_ratio) <= p.rung1 // 2 + 1
    assert plan(spe=1000, fixed={"train.warmup_ratio"}).warmup_ratio == 0.05


# --------------------------------------------------------------------------- fixed flags


def test_explicit_flags_are_not_searched():
    p = plan(fixed={"train.learning_rate"})
    assert p.lrs == [2e-4] and p.ranks == [8, 32]
    p = plan(fixed={"lora.rank"})
    assert len(p.lrs) == 4 and p.ranks == []
    assert [c.alpha for c in p.first_rung()] == [32.0] * 4
    p = plan(fixed={"train.learning_rate", "lora.rank"})
    assert not p.searches_anything and p.rung1 == 0 and p.planned_cost == 0
    # explicit epochs: the run's length stays and nothing stops it early
    p = plan(fixed={"train.epochs"}, epochs=2.0)
    assert p.run_steps == 200 and p.early_stop == 0 and p.eval_every == 50
    p = plan(fixed={"train.iters"}, iters=77)
    assert p.run_steps == 77


def test_alpha_follows_the_rank_unless_given():
    p = plan()
    assert [(c.rank, c.alpha) for c in p.rank_candidates(1e-3)] == [(8, 16.0), (32, 64.0)]
    p = plan(fixed={"lora.alpha"}, base_alpha=8.0)
    assert [(c.rank, c.alpha) for c in p.rank_candidates(1e-3)] == [(8, 8.0), (32, 8.0)]


def test_the_learning_rates_straddle_the_base_and_extend_past_an_edge():
    p = plan()
    assert [round(x / 2e-4, 6) for x in p.lrs] == [round(1 / 3, 6), 1.0, 3.0, 9.0]
    top = p.edge_candidate(max(p.lrs), p.lrs)
    assert top is not None and top.learning_rate == pytest.approx(27 * 2e-4) and top.stage == "lr-edge"
    tried = p.lrs + [top.learning_rate]
    again = p.edge_candidate(top.learning_rate, tried)
    assert again is not None and again.learning_rate == pytest.approx(81 * 2e-4)
    assert p.edge_candidate(again.learning_rate, tried + [again.learning_rate]) is None  # two at most
    assert p.edge_candidate(max(p.lrs), tried) is None  # the extension lost: no longer at the edge
    low = p.edge_candidate(min(p.lrs), p.lrs)
    assert low is not None and low.learning_rate == pytest.approx(2e-4 / 9)
    assert p.edge_candidate(p.lrs[1], p.lrs) is None


def test_explicit_keys_come_from_flags_yaml_and_a_whole_config(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train: {learning_rate: 1.0e-3}\nlora: {rank: 8}\n")
    assert explicit_keys({"train.epochs": "2"}, y) == {"train.epochs", "train.learning_rate", "lora.rank"}
    cfg = RunConfig()
    cfg.lora.alpha = 64.0
    assert explicit_keys({}, None, cfg) == {"lora.alpha"}


# --------------------------------------------------------------------------- selection


def cand(name, lr=1e-3, rank=16):
    return Candidate(name, lr, rank, 2.0 * rank, "lr")


def test_selection_goes_by_loss_and_answers_decide_only_close_calls():
    # far apart: the loss decides, whatever the answers (early on no answer is good)
    scores = [Score(cand("a"), 1.0, 1), Score(cand("b"), 0.9, 0), Score(cand("c"), math.nan, 3),
              Score(cand("d"), 1.1, 3)]
    assert [s.candidate.name for s in rank_scores(scores)] == ["b", "a", "d", "c"]
    # within 5%: better answers win
    close = [Score(cand("loops"), 0.90, 0), Score(cand("stops"), 0.93, 3)]
    assert [s.candidate.name for s in rank_scores(close)] == ["stops", "loops"]
    no_check = [Score(cand("a"), 1.0), Score(cand("b"), 0.9), Score(cand("c"), math.nan)]
    assert [s.candidate.name for s in rank_scores(no_check)] == ["b", "a", "c"]


def test_a_tie_goes_to_the_lower_rank_and_learning_rate():
    scores = [Score(cand("big", rank=32), 1.0), Score(cand("small", rank=8), 1.0),
              Score(cand("fast", lr=3e-3, rank=8), 1.0)]
    assert [s.candidate.name for s in rank_scores(scores)] == ["small", "fast", "big"]


def test_repetition_is_a_short_loop_not_a_long_answer():
    assert is_repetitive([5, 6, 7] * 20)
    assert is_repetitive([9] * 40)
    assert not is_repetitive(list(range(60)))
    assert not is_repetitive([5, 6, 7] * 3)  # too short to judge


# --------------------------------------------------------------------------- refusals


def test_auto_is_refused_on_resume_and_under_several_processes(monkeypatch, tmp_path):
    from macft.auto.driver import AutoRequest
    from macft.commands.train import TrainOptions, train

    cfg = RunConfig()
    cfg.model.name, cfg.data.train = "m", "d"
    with pytest.raises(MacftError) as e:
        train(cfg, None, TrainOptions(auto=AutoRequest(), resume=tmp_path / "run"))
    assert "Drop --auto" in e.value.hint
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MacftError) as e:
        train(cfg, None, TrainOptions(auto=AutoRequest()))
    assert "macft tune" in e.value.hint
    assert not (tmp_path / "run").exists()
