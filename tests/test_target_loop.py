"""The target optimisation's loop (ROME's ``compute_v``, MEMIT's/AlphaEdit's ``compute_z``) as the published code
runs it: ``num_steps`` forwards, each checking the stopping rule on the request's whole loss (``if loss < 5e-2:
break``), the last one only checking it (``if it == v_num_grad_steps - 1: break``), each update followed by the norm
clamp. On the tiny testbed, whose model really moves towards its targets (a random model's NLL does not)."""

from __future__ import annotations

import pytest
import torch

from eac_lightning.data.requests import EditRequest
from eac_lightning.methods import ContextTemplateParams, TargetHyperParams
from eac_lightning.methods import target as target_module
from eac_lightning.methods.target import TargetProblem, generate_context_templates

REQ = EditRequest(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome", source="test",
                  source_index=0)


@pytest.fixture(scope="module")
def testbed(tiny_testbed):
    from eac_lightning.models.loading import default_layers, load_model

    model, tok = load_model(str(tiny_testbed))
    templates = generate_context_templates(model, tok, ContextTemplateParams(length_count=[[4, 2]]))
    return model, tok, default_layers(model).rome, templates


def _problem(testbed, **hp) -> TargetProblem:
    model, tok, layer, templates = testbed
    return TargetProblem(model, tok, [REQ], layer, templates, TargetHyperParams(**hp), site="mlp")


def _published_loop(problem: TargetProblem) -> tuple[torch.Tensor, int, list[float]]:
    """The published loop written out for one request: (δ, updates, the stopping quantity at each forward)."""
    hp = problem.hparams
    delta = torch.zeros(1, problem.v0.shape[-1], requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    updates, trace = 0, []
    for it in range(hp.num_steps):
        loss, nll, total = problem.loss(delta)  # one request: the batch's loss is its own
        trace.append(float(total if hp.early_stop_on == "total" else nll))
        if trace[-1] < hp.early_stop:  # if loss < 5e-2: break
            break
        if it == hp.num_steps - 1:  # the last forward only checks
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        updates += 1
        with torch.no_grad():
            problem.clamp(delta)
    return delta.detach(), updates, trace


def _ours(problem: TargetProblem) -> tuple[torch.Tensor, int]:
    """The project's optimiser on ``problem``: (δ, forwards run)."""
    calls = []
    loss = TargetProblem.loss

    def counting(self, d):
        calls.append(1)
        return loss(self, d)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TargetProblem, "loss", counting)
        delta = target_module.optimise_plain(problem)
    return delta, len(calls)


@pytest.mark.parametrize("rule", ["total", "nll"])
def test_target_optimisation_is_the_published_loop(testbed, rule):
    """Ours equals the published loop: N forwards and N − 1 updates when the rule never holds; with a threshold met
    along the way it stops at the same forward, that forward updating nothing, with the same δ."""
    _, updates, trace = _published_loop(_problem(testbed, num_steps=10, early_stop=0.0, early_stop_on=rule))
    assert updates == 9
    assert _ours(_problem(testbed, num_steps=10, early_stop=0.0, early_stop_on=rule))[1] == 10
    assert trace[4] < trace[0]  # the testbed's model moves towards the target
    threshold = trace[4] + 1e-6
    expected, updates, _ = _published_loop(_problem(testbed, num_steps=10, early_stop=threshold, early_stop_on=rule))
    assert 0 < updates <= 4
    ours, forwards = _ours(_problem(testbed, num_steps=10, early_stop=threshold, early_stop_on=rule))
    assert forwards == updates + 1  # the forward that met the rule updates nothing
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


def test_the_whole_loss_stops_later_than_the_nll(testbed):
    """The published rule reads NLL + KL + decay, never below the NLL: at a threshold the NLL meets along the way,
    the whole loss is still above it there, so the published rule runs more forwards."""
    _, _, nll_trace = _published_loop(_problem(testbed, num_steps=12, early_stop=0.0, early_stop_on="nll"))
    threshold = min(nll_trace[1:6]) + 1e-6
    counts = {rule: _ours(_problem(testbed, num_steps=12, early_stop=threshold, early_stop_on=rule))[1]
              for rule in ("total", "nll")}
    assert counts["nll"] <= 6 and counts["total"] > counts["nll"]


def test_the_default_is_the_published_rule():
    hp = TargetHyperParams()
    assert (hp.early_stop, hp.early_stop_on) == (5e-2, "total")
    with pytest.raises(ValueError, match="early_stop_on"):
        TargetHyperParams(early_stop_on="loss")
