"""A SEA layer's output mix in Triton (kernels/triton_mix.py) against reference.mix_output_ref, and the layer's GPU
path against its torch path. CPU: TRITON_INTERPRET=1 at tiny odd shapes. GPU (`-m gpu`): real lengths."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sea_edge.kernels import mix_output_ref
from sea_edge.kernels.triton_mix import mix_output_triton

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def make(B, H, T, D, group, causal, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = (lambda *s: torch.randn(*s, generator=g).to(DEV))
    sparse = rnd(B, H, T, D).to(dtype)
    mix, gain = torch.rand(B, H, T, 1, generator=g).to(DEV), 2 * torch.rand(B, H, T, 1, generator=g).to(DEV)
    if causal:
        num = rnd(B, H // group, T, D)
        cnt = torch.randint(0, 5, (B, T), generator=g).float().to(DEV)  # 0: no key yet, divided by 1
    else:
        num, cnt = rnd(B, H, 1, D), None
    return sparse, mix, gain, num, cnt, group


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 37, 12, 1, False), (2, 6, 70, 20, 3, True), (1, 3, 1, 64, 3, True),
                                   (2, 4, 5, 7, 1, True)], ids=lambda s: "B{}-H{}-T{}-D{}-g{}-{}".format(
                                       *s[:5], "causal" if s[5] else "bidir"))
def test_mix_matches_reference(shape, dtype):
    args = make(*shape, dtype)
    out = mix_output_triton(*args, dtype)
    ref = mix_output_ref(*args, dtype)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_mix_reads_an_expanded_average_and_rejects_bad_shapes():
    sparse, mix, gain, num, cnt, group = make(1, 2, 9, 8, 1, False, torch.float32)
    wide = num.expand(1, 2, 9, 8)  # a T-stride-0 view of one average per head
    torch.testing.assert_close(mix_output_triton(sparse, mix, gain, wide, None, 1, torch.float32),
                               mix_output_ref(sparse, mix, gain, num, None, 1, torch.float32))
    causal = make(1, 4, 9, 8, 2, True, torch.float32)
    num_t = causal[3].transpose(2, 3).contiguous().transpose(2, 3)  # T-stride 1, D-stride T: a transposed scan's view
    torch.testing.assert_close(mix_output_triton(*causal[:3], num_t, *causal[4:], torch.float32),
                               mix_output_ref(*causal, torch.float32))
    with pytest.raises(ValueError, match="num must be"):
        mix_output_triton(sparse, mix, gain, num[:, :1], None, 1, torch.float32)
    with pytest.raises(ValueError, match="mix must be"):
        mix_output_triton(sparse, mix[..., 0], gain, num, None, 1, torch.float32)
    with pytest.raises(ValueError, match="cnt must be"):
        mix_output_triton(sparse, mix, gain, num, torch.ones(1, 3, device=DEV), 1, torch.float32)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_mix_gpu_real_shapes(causal):
    args = make(1, 9, 16387, 64, 3 if causal else 1, causal, torch.float16, seed=1)
    torch.testing.assert_close(mix_output_triton(*args, torch.float16).float(),
                               mix_output_ref(*args, torch.float16).float(), rtol=1e-3, atol=1e-3)


@gpu
@pytest.mark.gpu
def test_causal_average_shortcut_equals_general_path():
    """A whole causal prefill without padding takes a shortcut on the GPU (no prior keys, no mask): the same
    average as the general path, which an all-valid mask takes."""
    from sea_edge.attention import average_context

    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 3, 4097, 64, generator=g).half().cuda()
    probs = torch.rand(1, 9, 4097, 8, device="cuda")
    fast = average_context(v, probs, None, True, 9)
    slow = average_context(v, probs, torch.ones(1, 4097, dtype=torch.bool, device="cuda"), True, 9)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
