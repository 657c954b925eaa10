"""The C decoding kernels (lmforge/models/cpu_kernels.c) against a float reference, both the
AVX-512 build and the plain C one, and the fallback when they cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
        built = next((tmp_path / "kernels").glob("cpu_kernels-*.so"))
        (tmp_path / "junk").write_bytes(b"not a shared library")
        os.replace(tmp_path / "junk", built)  # damaged (a new file: the loaded one stays mapped)
        # a fresh process (this one has the library loaded under that name) builds it again
        code = "from lmforge.models import kernels; assert kernels.library() is not None"
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "LMFORGE_HOME": str(tmp_path)})
        assert built.stat().st_size > 1000
        monkeypatch.setenv("LMFORGE_KERNELS", "off")
        kernels.library.cache_clear()
        assert kernels.library() is None
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


@pytest.mark.parametrize("pad,start,pos,batched_rope", [
    (None, 0, 16, False), (None, 5, 16, True), ([0, 3, 9], 0, 16, True), ([0, 3, 9], 6, 16, False),
    ([0, 0, 1], 0, 1500, True)])  # past 4096 floats of scratch: on the heap
def test_decode_step_attention_matches_pytorch(lib, pad, start, pos, batched_rope):
    """One new token per row, grouped heads (4 over 2): RoPE on q and the new key, the key and
    value written into the cache at pos, attention over [max(start, pad), pos] -- against
    apply_rope, a cache write and SDPA with the equivalent mask. q and k come in as views of
    one fused projection, as in the model."""
    from lmforge.models.gpt import apply_rope, rope_rotation, rope_tables

    g = torch.Generator().manual_seed(start + pos)
    B, nh, nkv, hd = 3, 4, 2, 64
    max_len = pos + 7
    qkv = torch.randn(B, 1, nh + 2 * nkv, hd, generator=g).transpose(1, 2)  # (B, heads, 1, hd) views
    q, k_new, v_new = qkv.split([nh, nkv, nkv], dim=1)
    cache_k, cache_v = torch.randn(B, nkv, max_len, hd, generator=g), torch.randn(B, nkv, max_len, hd, generator=g)
    cos, sin = rope_tables(hd, max_len, 10000.0)
    positions = torch.tensor([[pos - 2], [pos - 1], [pos]]) if batched_rope else torch.tensor([pos])
    rope = rope_rotation(cos[positions], sin[positions])  # (B, 1, hd) or (1, hd)
    if batched_rope:
        rope = (rope[0][:, None], rope[1][:, None])  # (B, 1, 1, hd)
    ref_k, ref_v = cache_k.clone(), cache_v.clone()
    ref_k[:, :, pos:pos + 1], ref_v[:, :, pos:pos + 1] = apply_rope(k_new, *rope), v_new
    pad_t = torch.tensor(pad) if pad is not None else None
    out = kernels.attn_decode(q, k_new, v_new, rope, cache_k, cache_v, pos, start, pad_t, hd ** -0.5, lib)
    torch.testing.assert_close(cache_k, ref_k, rtol=1e-6, atol=1e-6)  # the rotated key, written in place
    torch.testing.assert_close(cache_v, ref_v, rtol=0, atol=0)
    keys = torch.arange(pos + 1)
    visible = (keys[None] >= start) & (keys[None] >= (pad_t[:, None] if pad is not None else 0))  # (B, S)
    ref = torch.nn.functional.scaled_dot_product_attention(
        apply_rope(q, *rope), ref_k[:, :, :pos + 1], ref_v[:, :, :pos + 1], attn_mask=visible[:, None, None],
        enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    no_rope = kernels.attn_decode(q, k_new, v_new, None, cache_k, cache_v, pos, start, pad_t, hd ** -0.5, lib)
    assert torch.equal(cache_k[:, :, pos:pos + 1], k_new)  # without RoPE the key goes in as it is
    assert no_rope.shape == (B, nh, 1, hd)


def test_softmax_exponent_is_accurate(lib):
    """The attention kernel's own e^x (a polynomial, so it vectorises): a one-key-per-score
    check across the whole range it serves, through the kernel itself."""
    hd, n = 32, 2000
    scores = torch.linspace(-90, 0, n)  # wanted scores; e^-90 lies past the clamp
    k = torch.zeros(1, 1, n, hd)
    k[0, 0, :, 0] = scores  # q = e_0 with scale 1: key j scores exactly scores[j]
    v = torch.zeros(1, 1, n, hd)
    v[0, 0, :, 0] = torch.arange(float(n))  # output 0 = the attention-weighted mean key index
    q = torch.zeros(1, 1, 1, hd)
    q[..., 0] = 1
    # the step's own key and value are the last slot's (score 0, index n - 1), written in place
    out = kernels.attn_decode(q, k[:, :, -1:].clone(), v[:, :, -1:].clone(), None, k, v, n - 1, 0, None, 1.0, lib)
    p = torch.softmax(scores.double(), 0)
    torch.testing.assert_close(out[0, 0, 0, 0].double(), (p * torch.arange(float(n)).double()).sum(), rtol=1e-6, atol=0)


def test_kernel_wrappers_reject_what_would_read_or_write_out_of_bounds(lib):
    w = torch.zeros(3, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="weights of shape"):
        kernels.q8_matmul(torch.randn(1, 32), w, lib=lib)  # K does not match the weights
    with pytest.raises(ValueError, match="row scales"):
        kernels.q8_matmul(torch.randn(1, 64), w, None, torch.ones(6)[::2], lib=lib)  # strided
    with pytest.raises(ValueError, match="group scales"):
        kernels.q8_matmul(torch.randn(1, 64), w, torch.ones(3, 1, dtype=torch.float16), lib=lib)
    q, kv = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 1, 16)
    ck, cv = torch.zeros(1, 1, 8, 16), torch.zeros(1, 1, 8, 16)
    with pytest.raises(ValueError, match="slots"):
        kernels.attn_decode(q, kv, kv, None, ck, cv, 8, 0, None, 0.25, lib)  # pos past the cache
    with pytest.raises(ValueError, match="caches"):
        kernels.attn_decode(q, kv, kv, None, ck.double(), cv, 3, 0, None, 0.25, lib)
    with pytest.raises(ValueError, match="padding"):
        kernels.attn_decode(q, kv, kv, None, ck, cv, 3, 0, torch.tensor([0, 0]), 0.25, lib)
    half_rope = (torch.ones(1, 16, dtype=torch.float16), torch.zeros(1, 16, dtype=torch.float16))
    kernels.attn_decode(q, kv, kv, half_rope, ck, cv, 3, 0, None, 0.25, lib)  # tables promoted to float32
    torch.testing.assert_close(ck[0, 0, 3], kv[0, 0, 0])  # cos 1, sin 0: the key as it is
    torch.set_default_dtype(torch.float64)
    try:  # outputs are float32 whatever the default
        assert kernels.q8_matmul(torch.randn(1, 64), w, lib=lib).dtype == torch.float32
        assert kernels.attn_decode(q, kv, kv, None, ck, cv, 4, 0, None, 0.25, lib).dtype == torch.float32
    finally:
        torch.set_default_dtype(torch.float32)


def test_int8_linear_follows_its_scales_after_load_state_dict():
    from lmforge.models.quant import Int8Linear

    a = Int8Linear.from_linear(torch.nn.Linear(64, 8, bias=False))
    b = Int8Linear.from_linear(torch.nn.Linear(64, 8, bias=False))
    x = torch.randn(1, 64)
    a(x)  # caches float32 scales
    a.load_state_dict(b.state_dict())  # copied in place: same tensor, new values
    torch.testing.assert_close(a(x), b(x))


def test_kv_cache_is_freed_without_the_garbage_collector():
    import gc
    import weakref

    from lmforge.config import ModelConfig
    from lmforge.engine.cache import KVCache

    gc.disable()
    try:
        cache = KVCache(ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=10, block_size=16), 1, 16, "cpu")
        gone = weakref.ref(cache.k)
        assert cache.layer(0).pad is None
        del cache
        assert gone() is None
    finally:
        gc.enable()
