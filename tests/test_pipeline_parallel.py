"""Pipeline parallelism: source ids reach every stage, and PP=2 trains exactly like PP=1 (also with
activation recompute, which under 1F1B replays each micro-batch with its own routing): the losses,
every parameter's gradient at every step, and the weights after the steps."""
from __future__ import annotations


import torch

from launch.local import run_local
from tests.nulls_gpt_helpers import global_param_name, init_single_process_megatron, packed_micro_batches, tiny_config

STEPS, LR = 3, 0.5


def train(model, batches, global_name=lambda name: name) -> tuple[list[float | None], list[dict], dict]:
    """SGD steps; (losses, each step's gradients, the final weights), keyed by global parameter name."""
    from nulls_megatron.train.step import forward_backward

    losses, grads = [], []
    for _ in range(STEPS):
        model.zero_grad(set_to_none=True)
        losses.append(forward_backward(model, batches))
        grads.append({global_name(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= LR * p.grad
    return losses, grads, {global_name(n): p.detach().clone() for n, p in model.named_parameters()}


def _compare(reference: dict, stage: dict) -> tuple[list[str], float]:
    """(names whose presence differs among the stage's parameters, the largest absolute difference)."""
    absent = sorted(k for k in stage if k not in reference)
    worst = max((float((reference[k] - v).abs().max()) for k, v in stage.items() if k in reference), default=0.0)
    return absent, worst


def pipeline_worker(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state

    from nulls_megatron.compat import model_parallel_seed
    from nulls_megatron.model.gpt import build_nulls_gpt

    batches = packed_micro_batches()
    # PP=1 on each rank (two independent replicas): the reference and the initial weights.
    init_single_process_megatron()
    reference = build_nulls_gpt(tiny_config(per_layer_sinks=True, tie_embeddings=False))
    initial = {n: p.detach().clone() for n, p in reference.named_parameters()}
    losses_pp1, grads_pp1, weights_pp1 = train(reference, batches)

    init_single_process_megatron(pipeline_parallel=2)
    losses_pp2, checks = {}, {}
    # model.recompute: full under 1F1B: the first stage runs both micro-batches' forwards before their
    # backwards, so each recomputed layer must replay its own micro-batch's routing and mask.
    for recompute in ("none", "full"):
        cfg = tiny_config(per_layer_sinks=True, tie_embeddings=False, pipeline_parallel=2)
        cfg.model.recompute = recompute
        model_parallel_seed(1234)
        stage = build_nulls_gpt(cfg)
        with torch.no_grad():
            for name, p in stage.named_parameters():
                p.copy_(initial[global_param_name(stage, name)])
        layer_numbers = [mlp.sinks.layer_number for mlp in stage.nulls_mlps()]
        losses_pp2[recompute], grads, weights = train(stage, batches, lambda name: global_param_name(stage, name))
        stage_params = {global_param_name(stage, n) for n, _ in stage.named_parameters()}
        checks[recompute] = {
            "params": len(stage_params),
            # Each step, the stage's parameters with a gradient are the reference's, with the same values.
            "grads": [(sorted(set(g) ^ (set(ref) & stage_params)), _compare(ref, g)[1]) for ref, g in zip(grads_pp1, grads)],
            "grad_tensors": sum(len(g) for g in grads),
            "weights": _compare(weights_pp1, weights),
            "weights_moved": max(float((weights[k] - initial[k]).abs().max()) for k in weights),
        }
    # Two adjacent documents of one source, their layers on two stages: the second's loss does not see
    # the first's tokens (document ids reach every stage); labelled one document, it does.
    from nulls_megatron.train.step import forward_backward
    from tests.nulls_gpt_helpers import adjacent_documents_of_one_source

    isolation = [forward_backward(stage, [r], forward_only=True) for r in adjacent_documents_of_one_source()]
    return {
        "isolation": isolation,
        "pp1": losses_pp1,
        "pp2": losses_pp2["none"],
        "pp2_recompute": losses_pp2["full"],
        "last_stage": parallel_state.is_pipeline_last_stage(),
        "layer_numbers": layer_numbers,
        "checks": checks,
    }


def test_pipeline_parallel_2_equals_1():
    results = run_local(pipeline_worker, 2, timeout=300)
    first, last = results
    assert not first["last_stage"] and last["last_stage"]
    assert first["layer_numbers"] == [0] and last["layer_numbers"] == [1], "per-layer sinks follow the global layer"
    assert first["pp2"] == first["pp2_recompute"] == [None] * STEPS
    pp1, pp2 = last["pp1"], last["pp2"]
    assert pp1[0] > pp1[-1], "SGD steps should lower the loss on a fixed batch"
    for step, (a, b) in enumerate(zip(pp1, pp2)):
        assert abs(a - b) < 1e-5, (step, pp1, pp2)
    assert last["pp2_recompute"] == pp2, "activation recompute changes no loss of the three steps"
    assert first["isolation"] == [None] * 3
    row, changed, one_document = last["isolation"]
    assert row == changed and abs(row - one_document) > 1e-4, last["isolation"]
    for rank, result in enumerate(results):
        for recompute, check in result["checks"].items():
            where = f"rank {rank}, recompute {recompute}"
            assert check["params"] > 0 and check["grad_tensors"] >= STEPS * 3, where
            for step, (differing, worst) in enumerate(check["grads"]):
                assert not differing, f"{where}, step {step + 1}: gradient present on one side only: {differing}"
                assert worst < 1e-5, f"{where}, step {step + 1}: gradients differ by {worst}"
            absent, worst = check["weights"]
            assert not absent and worst < 1e-5, f"{where}: weights after {STEPS} steps differ by {worst} ({absent})"
            assert check["weights_moved"] > 1e-3, f"{where}: the steps moved no weight"
