"""Notebook 02's training-loop exercises against the workbook's trainer: the reference of exercise 02.9
(one Anthropic-2023 step by the formulas) is the step helpers.saes.train takes (SAEStack.losses,
remove_parallel_grads, torch.optim.Adam, normalize_decoder), and 02.7 / 02.8 are its warm-up and
dead-latent counters."""
import torch

from helpers.exercises import nb02
from helpers.saes.stack import SAEConfig, SAEStack
from helpers.saes.train import TrainConfig


def _workbook_step(params, adam, x, lr, l1):
    """One step the way helpers.saes.train.train_step takes it, in float32, from the given Adam state."""
    m, d = params["W_dec"].shape
    sae = SAEStack([SAEConfig(d_in=d, d_sae=m, l1_coefficient=l1)])
    with torch.no_grad():
        for k in nb02.PARAMS:
            getattr(sae, k).copy_(params[k].float().unsqueeze(0))
    tc = TrainConfig()
    opt = torch.optim.Adam([getattr(sae, k) for k in nb02.PARAMS], lr=lr, betas=(tc.beta1, tc.beta2), foreach=False)
    for k in nb02.PARAMS:
        opt.state[getattr(sae, k)] = {"step": torch.tensor(float(adam["step"])),
                                      "exp_avg": adam["m"][k].float().unsqueeze(0).clone(),
                                      "exp_avg_sq": adam["v"][k].float().unsqueeze(0).clone()}
    loss = sae.losses(x.float(), path="dense")["loss"].sum()
    loss.backward()
    sae.remove_parallel_grads()
    opt.step()
    sae.normalize_decoder()
    return {k: getattr(sae, k).detach()[0] for k in nb02.PARAMS}, float(loss)


def test_the_step_of_exercise_02_9_is_the_workbooks():
    assert (nb02.BETAS, nb02.ADAM_EPS) == ((TrainConfig().beta1, TrainConfig().beta2), 1e-8)
    gen = torch.Generator().manual_seed(3)
    for step in (0, 5):
        params = nb02._step_params(gen, 10, 24)
        adam = nb02.adam_state(params, step, gen)
        x = torch.randn(32, 10, generator=gen, dtype=torch.float64) + 0.5
        new, state, loss = nb02._train_step(params, adam, x, 1e-2, 0.05)
        want, want_loss = _workbook_step(params, adam, x, 1e-2, 0.05)
        assert state["step"] == step + 1 and abs(loss - want_loss) < 1e-5
        for k in nb02.PARAMS:
            assert not torch.equal(new[k], params[k]), k  # every parameter moved
            assert torch.allclose(new[k].float(), want[k], atol=2e-5), (step, k, (new[k].float() - want[k]).abs().max())
        assert torch.allclose(new["W_dec"].norm(dim=-1), torch.ones(24, dtype=torch.float64))


def test_warmup_and_dead_counters_are_the_trainers():
    # train_sweep: l1_scale = min(1, (step + 1) / warm_l1)
    assert [nb02._l1_warmup(s, 4, 2.0) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    # train_step: since_fired reset where a latent fired, + batch tokens elsewhere; dead at >= window
    since = torch.tensor([0, 10, 30, 30])
    codes = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    new, dead = nb02._dead_latents(since, codes, window=32)
    assert new.tolist() == [2, 0, 32, 0] and dead.tolist() == [False, False, True, False]
