"""`loldu-triton compile-check --quick` for sm_90 and sm_80: every kernel variant of the widest operands of each
dtype class (float16 with its float32 t included), with every autotune config offered for the target, compiled
by ptxas without a GPU."""
import json

import pytest

pytest.importorskip("triton")

from loldu_triton.tools.cli import main  # noqa: E402


@pytest.fixture(scope="module", params=[90, 80], ids=lambda a: f"sm_{a}")
def records(request, tmp_path_factory):
    from loldu_triton.kernels import common

    if common.INTERPRET:
        pytest.skip("kernels defined for the interpreter")
    path = tmp_path_factory.mktemp("cc") / f"sm{request.param}.json"
    rc = main(["compile-check", "--arch", str(request.param), "--quick", "--json", str(path), "--jobs", "2"])
    recs = json.loads(path.read_text())
    return request.param, rc, recs


def test_every_variant_compiles_and_the_check_passes(records):
    arch, rc, recs = records
    assert recs and all(r["ok"] for r in recs), [r["error"][:200] for r in recs if not r["ok"]]
    assert rc == 0
    kernels = {(r["kernel"], r["dtype"]) for r in recs}
    assert kernels == {(k, d) for k in ("gemm_fwd", "gemm_bwd", "shrink", "merge")
                       for d in ("bfloat16", "float16", "float32")}
    # float16's t = x U^T is float32: its GEMM reads an fp32 rank operand next to 16-bit ones
    assert any(r["dtype"] == "float16" and r["operands"].split(",")[2] == "float32" for r in recs
               if r["kernel"] == "gemm_fwd")
    assert any("int8" in r["operands"] for r in recs) and any("PER_ROW" in r["route"] for r in recs)
    # dropout's backward GEMM (dY W alone, with the grad_e sum), over an int8 base too
    assert any(r["route"].startswith("dropout-bwd") and "SCALE_K" in r["route"] for r in recs)


def test_no_offered_config_exceeds_shared_memory(records):
    arch, _, recs = records
    limit = {90: 232448, 80: 166912}[arch]
    assert all(r["smem_limit"] == limit for r in recs)
    over = [(r["kernel"], r["dtype"], r["config"], r["smem_bytes"]) for r in recs if r["smem_bytes"] > limit]
    assert not over


def test_no_spills_in_two_byte_variants(records):
    _, _, recs = records
    spills = [(r["kernel"], r["config"], r["route"], r["spills"]) for r in recs
              if r["dtype"] != "float32" and r["spills"] != 0]
    assert not spills


def test_tensor_cores_everywhere_and_wgmma_in_hopper_gemm_tiles(records):
    arch, _, recs = records
    assert all(r["mma"] in ("wgmma", "mma") for r in recs), [r for r in recs if r["mma"] == "none"]
    # fp32 under PyTorch's default "highest" precision: 3xTF32 on tensor cores, not FMA
    assert all("PREC=tf32x3" in r["route"] for r in recs if r["dtype"] == "float32")
    gemm_tiles = [r for r in recs if r["kernel"].startswith("gemm") and r["block_m"] >= 64]
    assert gemm_tiles
    if arch == 90:
        assert all(r["mma"] == "wgmma" for r in gemm_tiles if r["dtype"] != "float32")
    else:
        assert all(r["mma"] == "mma" for r in recs)
