"""benchmarks.bench: the timed step is the trainer's, on SAEs set to the regime it claims to time."""
import torch

from benchmarks.bench import ours_step_fn


def test_l0_calibration_for_a_stack_of_l1_and_jumprelu_saes():
    """The sweep benchmark stacks several L1 SAEs whose biases are set so that about l0 latents fire
    per token (this failed for stacks of more than one SAE); JumpReLU's per-latent thresholds too."""
    torch.manual_seed(0)
    batch = torch.randn(512, 16)
    for arch in ("standard", "jumprelu"):
        step, st = ours_step_fn(16, 64, batch, "cpu", architecture=arch, n_saes=3, l0=6)
        assert st.n == 3
        l0 = (st.encode(batch) > 0).sum(-1).float().mean(-1)
        assert torch.all((l0 - 6).abs() < 1), (arch, l0)
        step()  # one training step runs on the calibrated stack
