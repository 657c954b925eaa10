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
