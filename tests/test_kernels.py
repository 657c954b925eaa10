"""The C decoding kernels (lmforge/models/cpu_kernels.c) against a float reference, both the
AVX-512 build and the plain C one, and the fallback when they cannot be built."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from lmforge.models import kernels

pytestmark = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")


@pytest.fixture(scope="module", params=["native", "generic"])
def lib(request, tmp_path_factory):
    path = kernels.build(tmp_path_factory.mktemp("k") / f"{request.param}.so", generic=request.param == "generic")
    lib = kernels.load(path)
    assert lib.lmf_q8_avx512() in (0, 1) and (request.param == "native" or lib.lmf_q8_avx512() == 0)
    return lib


@pytest.mark.parametrize("M,K,N", [(1, 32, 1), (1, 640, 130), (3, 96, 7), (8, 64, 33), (11, 128, 65)])
def test_q8_matmul_matches_float_reference(lib, M, K, N):
    g = torch.Generator().manual_seed(M * 1000 + N)
    x = torch.randn(M, K, generator=g) * 3
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    gs = (torch.rand(N, K // 32, generator=g) * 0.01 + 1e-4).half()
    rs = torch.rand(N, generator=g) + 0.5
    deq = w.float().view(N, K // 32, 32) * gs.float()[..., None]  # (N, G, 32)
    cases = {(True, False): deq.view(N, K), (False, True): w.float() * rs[:, None],
             (False, False): w.float(), (True, True): deq.view(N, K) * rs[:, None]}
    for (use_g, use_r), ref in cases.items():
        y = kernels.q8_matmul(x, w, gs if use_g else None, rs if use_r else None, lib=lib)
        expect = x.double() @ ref.double().t()
        assert y.shape == (M, N) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), expect, rtol=1e-5, atol=1e-4 * expect.abs().max().item())
    # a non-contiguous x is made contiguous, not misread
    xt = torch.randn(K, M, generator=g).t()
    torch.testing.assert_close(kernels.q8_matmul(xt, w, gs, lib=lib), xt @ deq.view(N, K).t(), rtol=1e-5, atol=1e-3)


def test_q8_matmul_rejects_a_width_it_cannot_take(lib):
    with pytest.raises(ValueError, match="divisible by 32"):
        kernels.q8_matmul(torch.randn(1, 40), torch.zeros(3, 40, dtype=torch.int8), lib=lib)


def test_library_is_cached_and_falls_back_without_a_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    kernels.library.cache_clear()
    try:
        assert kernels.library() is not None
        assert len(list((tmp_path / "kernels").glob("cpu_kernels-*.so"))) == 1  # built once, under the home
        assert not list((tmp_path / "kernels").glob(".*tmp"))  # no temporary left behind
        kernels.library.cache_clear()
        monkeypatch.setenv("LMFORGE_KERNELS", "0")
        assert kernels.library() is None
        kernels.library.cache_clear()
        monkeypatch.delenv("LMFORGE_KERNELS")
        monkeypatch.setenv("CC", "/bin/false")  # a "compiler" that always fails: a new key, a failed build
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert kernels.library() is None
        assert any("could not be built" in str(w.message) for w in caught)
    finally:
        kernels.library.cache_clear()


@pytest.mark.parametrize("shape", [(1, 640), (5, 3, 256), (70, 96)])  # 70 rows: the threaded branch
def test_rms_norm_matches_pytorch(lib, shape):
    g = torch.Generator().manual_seed(len(shape))
    x, w = torch.randn(*shape, generator=g) * 4, torch.randn(shape[-1], generator=g)
    y = kernels.rms_norm(x, w, 1e-6, lib)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (shape[-1],), w, 1e-6), rtol=1e-5, atol=1e-5)


def test_model_norm_takes_the_kernel_only_without_gradients():
    from lmforge.models.gpt import RMSNorm

    norm = RMSNorm(64, 1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 64, requires_grad=True)
    y = norm(x)  # training: PyTorch's op, so the gradient flows
    y.sum().backward()
    assert x.grad is not None and y.grad_fn is not None
    with torch.no_grad():
        torch.testing.assert_close(norm(x), y.detach(), rtol=1e-5, atol=1e-5)
        if kernels.library() is not None:
            called = []
            original = kernels.rms_norm
            kernels.rms_norm = lambda *a: called.append(1) or original(*a)
            try:
                norm(x)
            finally:
                kernels.rms_norm = original
            assert called


@pytest.mark.parametrize("pad,start,end", [(None, 0, 17), (None, 5, 17), ([0, 3, 9], 0, 17), ([0, 3, 9], 6, 17),
                                           ([0, 0, 1], 0, 1500)])  # over 1024 keys: scores on the heap
def test_decode_attention_matches_sdpa(lib, pad, start, end):
    """One query per row, grouped heads (4 over 2), against the cache up to `end`, skipping keys
    before the window start and each row's left padding."""
    g = torch.Generator().manual_seed(start)
    B, nh, nkv, max_len, hd = 3, 4, 2, end + 7, 64
    q = torch.randn(B, nh, 1, hd, generator=g)
    k, v = torch.randn(B, nkv, max_len, hd, generator=g), torch.randn(B, nkv, max_len, hd, generator=g)
    pad_t = torch.tensor(pad) if pad is not None else None
    out = kernels.attn_decode(q, k, v, start, end, pad_t, hd ** -0.5, lib)
    keys = torch.arange(end)
    visible = (keys >= start)[None].expand(B, end) if pad is None else (keys[None] >= start) & (keys[None] >= pad_t[:, None])
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, :end], v[:, :, :end], attn_mask=visible[:, None, None], enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
