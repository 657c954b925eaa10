"""The C decoding kernels (lmforge/models/cpu_kernels.c) against a float reference, in every
build this CPU can run (AVX-512, AVX2 + FMA + F16C, plain C: on an AVX-512 host all three, so
every CI run checks the AVX2 path too), and the fallback when they cannot be built."""

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


@pytest.fixture(scope="module", params=list(kernels.VARIANTS))
def lib(request, tmp_path_factory):
    """Each build the CPU can run; a build that fails here is a failure, not a skip."""
    if not kernels.runnable(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} build (flags: needs {kernels.VARIANTS[request.param][1]})")
    path = kernels.build(tmp_path_factory.mktemp("k") / f"{request.param}.so", request.param)
    lib = kernels.load(path)
    assert lib.lmf_isa() == kernels.VARIANTS[request.param][2]  # the build has the path it is named for
    return lib


def as_multiplied(lib, x: torch.Tensor) -> torch.Tensor:
    """x as the build multiplies it: the AVX2 build rounds activations to int8 in groups of 32
    (scale absmax / 127, round half to even, as its C code does in float32); the others keep x."""
    if lib.lmf_isa() != 1:
        return x
    g = x.float().reshape(*x.shape[:-1], -1, 32)
    d = g.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(g * inv) * d).reshape(x.shape)


def test_the_chosen_build_follows_the_cpu_and_the_environment(monkeypatch):
    monkeypatch.delenv("LMFORGE_KERNELS", raising=False)
    assert kernels.chosen_variant() == kernels.variants()[0]
    for v in kernels.variants():
        monkeypatch.setenv("LMFORGE_KERNELS", v)
        assert kernels.chosen_variant() == v
    monkeypatch.setenv("LMFORGE_KERNELS", "off")
    assert kernels.chosen_variant() is None and kernels.library() is None
    if "avx512f" in kernels.cpu_flags():
        assert kernels.variants() == ["avx512", "avx2", "generic"]


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
        expect = as_multiplied(lib, x).double() @ ref.double().t()
        assert y.shape == (M, N) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), expect, rtol=1e-5, atol=1e-4 * expect.abs().max().item())
    # a non-contiguous x is made contiguous, not misread
    xt = torch.randn(K, M, generator=g).t()
    torch.testing.assert_close(kernels.q8_matmul(xt, w, gs, lib=lib), as_multiplied(lib, xt) @ deq.view(N, K).t(),
                               rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("M,K,N", [(1, 32, 1), (1, 576, 130), (3, 96, 7), (8, 64, 33), (11, 128, 65)])
def test_q4_matmul_matches_float_reference(lib, M, K, N):
    from lmforge.models.quant import int4_nibbles, int4_values

    g = torch.Generator().manual_seed(M * 100 + N)
    x = torch.randn(M, K, generator=g) * 3
    q = torch.randint(0, 16, (N, K), generator=g)
    packed = int4_nibbles(q)
    assert torch.equal(int4_values(packed), q.to(torch.uint8))
    sc = (torch.rand(N, K // 32, generator=g) * 0.02 + 1e-3).half()
    off = (torch.randn(N, K // 32, generator=g) * 0.05).half()
    ref = (q.float().view(N, K // 32, 32) * sc.float()[..., None] + off.float()[..., None]).view(N, K)
    y = kernels.q4_matmul(x, packed, sc, off, lib=lib)
    expect = as_multiplied(lib, x).double() @ ref.double().t()
    torch.testing.assert_close(y.double(), expect, rtol=1e-5, atol=1e-4 * expect.abs().max().item())


@pytest.mark.parametrize("K,N", [(32, 1), (576, 130), (1536, 48)])
def test_q4_dequant_gives_the_weights_the_groups_stand_for(lib, K, N):
    from lmforge.models.quant import int4_nibbles

    g = torch.Generator().manual_seed(K + N)
    q = torch.randint(0, 16, (N, K), generator=g)
    sc = (torch.rand(N, K // 32, generator=g) * 0.02 + 1e-3).half()
    off = (torch.randn(N, K // 32, generator=g) * 0.05).half()
    ref = (q.float().view(N, K // 32, 32) * sc.float()[..., None] + off.float()[..., None]).view(N, K)
    torch.testing.assert_close(kernels.q4_dequant(int4_nibbles(q), sc, off, lib), ref, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="scales and offsets of shape"):  # the C code would read past them
        kernels.q4_dequant(int4_nibbles(q), sc[:, :-1].contiguous() if K > 32 else sc[:0], off, lib)
    with pytest.raises(ValueError, match="float16"):
        kernels.q4_dequant(int4_nibbles(q), sc.float(), off, lib)


def test_a_rows_result_does_not_depend_on_its_neighbours(lib):
    """Batch invariance: every output is one row's own sum in a fixed order, bit for bit the
    same whether the row is multiplied alone or among 15 others."""
    from lmforge.models.quant import int4_nibbles

    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 256, generator=g)
    w8 = torch.randint(-127, 128, (40, 256), dtype=torch.int8, generator=g)
    gs = (torch.rand(40, 8, generator=g) * 0.01 + 1e-4).half()
    w4 = int4_nibbles(torch.randint(0, 16, (40, 256), generator=g))
    off = (torch.randn(40, 8, generator=g) * 0.01).half()
    all8, all4 = kernels.q8_matmul(x, w8, gs, lib=lib), kernels.q4_matmul(x, w4, gs, off, lib=lib)
    for m in (0, 5, 15):
        assert torch.equal(kernels.q8_matmul(x[m:m + 1], w8, gs, lib=lib)[0], all8[m])
        assert torch.equal(kernels.q4_matmul(x[m:m + 1], w4, gs, off, lib=lib)[0], all4[m])
        assert torch.equal(kernels.q8_matmul(x[m:m + 3], w8, gs, lib=lib)[0], all8[m])


def test_q8_matmul_rejects_a_width_it_cannot_take(lib):
    with pytest.raises(ValueError, match="divisible by 32"):
        kernels.q8_matmul(torch.randn(1, 40), torch.zeros(3, 40, dtype=torch.int8), lib=lib)


def test_library_is_cached_checked_and_falls_back_without_a_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    monkeypatch.delenv("LMFORGE_KERNELS", raising=False)
    kernels._library.cache_clear()
    try:
        assert kernels.library() is not None
        libs = list((tmp_path / "kernels").glob("cpu_kernels-*.so"))
        assert len(libs) == 1 and (tmp_path / "kernels" / (libs[0].name + ".sha256")).is_file()  # built once
        assert not list((tmp_path / "kernels").glob(".*tmp*"))  # no temporary left behind
        built = libs[0]
        good = built.read_bytes()
        code = "from lmforge.models import kernels; lib = kernels.library(); assert lib is not None; " \
               "assert lib.lmf_isa() >= 0"
        env = {**os.environ, "LMFORGE_HOME": str(tmp_path)}
        # truncated (was SIGBUS), zeroed code (was SIGSEGV), junk: each fails its checksum, so a
        # fresh process builds it again instead of mapping it (new files: the loaded one stays mapped)
        for damaged in (good[:len(good) // 2], good[:4096] + bytes(len(good) - 4096), b"not a shared library"):
            (tmp_path / "junk").write_bytes(damaged)
            os.replace(tmp_path / "junk", built)
            subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
            assert built.read_bytes() != damaged and len(built.read_bytes()) > 1000
        monkeypatch.setenv("LMFORGE_KERNELS", "off")
        assert kernels.library() is None
        monkeypatch.setenv("LMFORGE_KERNELS", "0")
        assert kernels.library() is None
        monkeypatch.delenv("LMFORGE_KERNELS")
        kernels._library.cache_clear()
        monkeypatch.setenv("CC", "/bin/false")  # a "compiler" that always fails: a new key, a failed build
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert kernels.library() is None
        assert any("could not be built" in str(w.message) for w in caught)
    finally:
        kernels._library.cache_clear()


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
    x = torch.randn(3, 1, 64, requires_grad=True)  # a decoding step's rows: one position each
    y = norm(x)  # training: PyTorch's op, so the gradient flows
    y.sum().backward()
    assert x.grad is not None and y.grad_fn is not None
    with torch.no_grad():
        torch.testing.assert_close(norm(x), y.detach(), rtol=1e-5, atol=1e-5)
        assert kernels.library() is not None, "the C kernels failed to build where a compiler exists"
        called = []
        original = kernels.rms_norm
        kernels.rms_norm = lambda *a: called.append(1) or original(*a)
        try:
            norm(x)
        finally:
            kernels.rms_norm = original
        assert called


@pytest.mark.parametrize("window,positions,batched_rope", [
    (0, [16, 16, 16], False), (5, [16, 16, 16], False), (0, [3, 9, 16], True), (6, [3, 9, 16], True),
    (0, [0, 700, 1500], True)])  # past 4096 floats of scratch: on the heap
def test_decode_step_attention_matches_pytorch(lib, window, positions, batched_rope):
    """One new token per row, each row at its own position of its own (non-adjacent) cache
    slot, grouped heads (4 over 2): RoPE on q and the new key, the key and value written into
    the slot at the row's position, attention over the row's window -- against apply_rope, a
    cache write and SDPA with the equivalent mask. q and k come in as views of one fused
    projection, as in the model."""
    from lmforge.models.gpt import apply_rope, rope_rotation, rope_tables

    g = torch.Generator().manual_seed(window + positions[0])
    B, nh, nkv, hd, S = 3, 4, 2, 64, 5
    slots, pos = torch.tensor([4, 0, 2]), torch.tensor(positions)
    max_len = max(positions) + 7
    qkv = torch.randn(B, 1, nh + 2 * nkv, hd, generator=g).transpose(1, 2)  # (B, heads, 1, hd) views
    q, k_new, v_new = qkv.split([nh, nkv, nkv], dim=1)
    cache_k, cache_v = torch.randn(S, nkv, max_len, hd, generator=g), torch.randn(S, nkv, max_len, hd, generator=g)
    cos, sin = rope_tables(hd, max_len, 10000.0)
    rope = rope_rotation(cos[pos[:, None]], sin[pos[:, None]]) if batched_rope else \
        rope_rotation(cos[pos[:1]], sin[pos[:1]])  # (B, 1, hd) or (1, hd)
    if batched_rope:
        rope = (rope[0][:, None], rope[1][:, None])  # (B, 1, 1, hd)
    elif len(set(positions)) > 1:
        pytest.skip("one table for rows at different positions is not a real case")
    ref_k, ref_v = cache_k.clone(), cache_v.clone()
    ref_k[slots, :, pos], ref_v[slots, :, pos] = apply_rope(k_new, *rope)[:, :, 0], v_new[:, :, 0]
    out = kernels.attn_decode(q, k_new, v_new, rope, cache_k, cache_v, slots, pos, window, hd ** -0.5, lib)
    torch.testing.assert_close(cache_k, ref_k, rtol=1e-6, atol=1e-6)  # the rotated key, written in place
    torch.testing.assert_close(cache_v, ref_v, rtol=0, atol=0)
    keys = torch.arange(max_len)
    visible = keys[None] <= pos[:, None]
    if window:
        visible &= keys[None] > pos[:, None] - window  # (B, max_len)
    ref = torch.nn.functional.scaled_dot_product_attention(
        apply_rope(q, *rope), ref_k[slots], ref_v[slots], attn_mask=visible[:, None, None], enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    no_rope = kernels.attn_decode(q, k_new, v_new, None, cache_k, cache_v, slots, pos, window, hd ** -0.5, lib)
    assert torch.equal(cache_k[slots, :, pos], k_new[:, :, 0])  # without RoPE the key goes in as it is
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
    out = kernels.attn_decode(q, k[:, :, -1:].clone(), v[:, :, -1:].clone(), None, k, v, torch.tensor([0]),
                              torch.tensor([n - 1]), 0, 1.0, lib)
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
    ck, cv = torch.zeros(2, 1, 8, 16), torch.zeros(2, 1, 8, 16)
    one, zero = torch.tensor([1]), torch.tensor([0])
    with pytest.raises(ValueError, match="outside the cache"):
        kernels.attn_decode(q, kv, kv, None, ck, cv, zero, torch.tensor([8]), 0, 0.25, lib)  # pos past the cache
    with pytest.raises(ValueError, match="outside the cache"):
        kernels.attn_decode(q, kv, kv, None, ck, cv, torch.tensor([2]), one, 0, 0.25, lib)  # no such slot
    with pytest.raises(ValueError, match="caches"):
        kernels.attn_decode(q, kv, kv, None, ck.double(), cv, zero, one, 0, 0.25, lib)
    with pytest.raises(ValueError, match="slots, positions"):
        kernels.attn_decode(q, kv, kv, None, ck, cv, torch.tensor([0, 1]), one, 0, 0.25, lib)
    with pytest.raises(ValueError, match="q4_matmul"):
        kernels.q4_matmul(torch.randn(1, 64), torch.zeros(3, 64, dtype=torch.uint8), torch.ones(3, 2).half(),
                          torch.ones(3, 2).half(), lib=lib)
    half_rope = (torch.ones(1, 16, dtype=torch.float16), torch.zeros(1, 16, dtype=torch.float16))
    kernels.attn_decode(q, kv, kv, half_rope, ck, cv, one, torch.tensor([3]), 0, 0.25, lib)  # tables promoted
    torch.testing.assert_close(ck[1, 0, 3], kv[0, 0, 0])  # cos 1, sin 0: the key as it is
    torch.set_default_dtype(torch.float64)
    try:  # outputs are float32 whatever the default
        assert kernels.q8_matmul(torch.randn(1, 64), w, lib=lib).dtype == torch.float32
        assert kernels.attn_decode(q, kv, kv, None, ck, cv, one, torch.tensor([4]), 0, 0.25, lib).dtype == torch.float32
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
        view = cache.view([0])
        assert view.layer(0).k.shape == (1, 2, 16, 16)
        gone = weakref.ref(cache.k)
        del cache, view
        assert gone() is None
    finally:
        gc.enable()


def test_int8_linear_prefill_without_bf16_hardware_takes_the_c_kernel(monkeypatch):
    """On a CPU without bf16 arithmetic (AVX2), 5..64 rows (a short prompt's prefill) go through
    the C kernel rather than a bf16 copy of the weights: the same numbers as the kernel itself,
    within int8 rounding of the float layer; with bf16 hardware, the dense bf16 path."""
    import torch.nn as nn

    from lmforge.models import quant

    if kernels.library() is None:
        pytest.skip("no C kernel build for this CPU")
    torch.manual_seed(0)
    lin = nn.Linear(96, 80, bias=False)
    q = quant.Int8Linear.from_linear(lin)
    x = torch.randn(1, 24, 96)
    calls = []
    real = kernels.q8_matmul
    monkeypatch.setattr(kernels, "q8_matmul", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(quant, "bf16_native", lambda: False)
    with torch.no_grad():
        y = q(x)
        assert calls == [(24, 96)]
        ref = real(x[0], q.weight, None, q.scales.float(), lib=kernels.library())
        assert torch.equal(y[0], ref)
        assert (y - lin(x)).abs().max() < 0.02 * lin(x).abs().max()
        monkeypatch.setattr(quant, "bf16_native", lambda: True)
        calls.clear()
        q(x)
        assert calls == []  # 24 rows: the dense path


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_a_long_prompt_without_bf16_hardware_multiplies_in_float32(kind, monkeypatch):
    """On a CPU without bf16 arithmetic (AVX2), a prompt of DEQUANT_ROWS+ rows (int4) or more than
    SLOW_BF16_ROWS (int8) goes through a float32 copy of the weights and BLAS: the float layer of
    the quantized weights to float32 rounding, where the bf16 path differs by bf16's rounding;
    with bf16 hardware, PyTorch's bf16 kernels."""
    import torch.nn as nn

    from lmforge.models import quant

    torch.manual_seed(1)
    lin = nn.Linear(128, 96, bias=False)
    q = quant.Int4Linear.from_linear(lin) if kind == "int4" else quant.Int8Linear.from_linear(lin)
    rows = quant.DEQUANT_ROWS if kind == "int4" else quant.SLOW_BF16_ROWS + 1
    x = torch.randn(1, rows, 128)
    with torch.no_grad():
        exact = x.double() @ q.float_weight().double().t()
        monkeypatch.setattr(quant, "bf16_native", lambda: False)
        y = q(x)
        assert (y.double() - exact).abs().max() < 1e-5 * exact.abs().max()
        monkeypatch.setattr(quant, "bf16_native", lambda: True)
        z = q(x)
        assert 1e-5 * exact.abs().max() < (z.double() - exact).abs().max() < 2e-2 * exact.abs().max()
