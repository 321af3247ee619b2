"""The ``train`` (img/s through the Trainer vs the bare step) and ``profile`` (step time by kind
of work) benchmarks, on CPU with tiny images so that they finish in seconds."""
import pytest

from benchmarks import profile as profile_benchmark
from benchmarks import train as train_benchmark
from benchmark_fixtures import benchmark_args as _args, one_torch_thread, table_rows  # noqa: F401


def _table(section: str) -> dict[str, list[str]]:
    return {row[0]: row[1:] for row in table_rows(section)}


def test_train_benchmark_reads_the_trainers_own_throughput_for_both_families(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # shards and runs go to a temporary folder, removed after
    section = train_benchmark.run(_args(train_benchmark, [
        "--device", "cpu", "--resolution", "32", "--batch", "4", "--steps", "2", "--workers", "1",
        "--zero-stage", "0", "--peak-tflops", "1", "--precisions", "bf16,bf16-mixed"]))
    lines = [line for line in section.splitlines() if line.startswith("|")][2:]
    assert [tuple(cell.strip() for cell in line.strip("|").split("|")[:2]) for line in lines] == [
        ("deit tiny", "bf16"), ("anchorformer tiny", "bf16"),
        ("deit tiny", "bf16-mixed"), ("anchorformer tiny", "bf16-mixed")]
    rows = {name: cells[1:] for name, cells in _table("|h|\n|-|\n" + "\n".join(lines[2:])).items()}  # bf16-mixed
    for name, (bare, trained, share, data_wait, mfu, memory, ratio, target) in rows.items():
        assert float(bare) > 0 and float(trained) > 0
        assert float(share) == pytest.approx(float(trained) / float(bare), rel=0.05, abs=0.02)
        assert 0 <= float(data_wait.rstrip(" %")) <= 100
        assert float(mfu.rstrip(" %")) > 0  # the Trainer's MFU, from --peak-tflops
        assert float(memory) > 0
    speedup = float(rows["anchorformer tiny"][6].rstrip("x"))
    assert speedup == pytest.approx(float(rows["anchorformer tiny"][1]) / float(rows["deit tiny"][1]), rel=0.05)
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_train_benchmark_rejects_bad_options():
    for argv, message in ((["--resolution", "30"], "multiple of the patch size"), (["--steps", "0"], "--steps"),
                          (["--sizes", ""], "at least one")):
        with pytest.raises(ValueError, match=message):
            train_benchmark.run(_args(train_benchmark, ["--device", "cpu", *argv]))
    for argv in (["--sizes", "huge"], ["--precisions", "fp8"]):  # refused while parsing, naming the choices
        with pytest.raises(SystemExit):
            _args(train_benchmark, argv)


def test_profile_benchmark_splits_the_step_by_kind_of_work():
    section = profile_benchmark.run(_args(profile_benchmark, ["--device", "cpu", "--resolution", "32", "--steps", "1"]))
    rows = _table(section)
    deit_ms = {name: float(cells[0]) for name, cells in rows.items()}
    anchor_ms = {name: float(cells[2]) for name, cells in rows.items()}
    assert deit_ms["attention (SDPA)"] > 0 and anchor_ms["attention (SDPA)"] == 0  # no SDPA in anchor attention
    for times in (deit_ms, anchor_ms):
        assert times["matmul"] > 0 and times["optimizer"] > 0
        parts = sum(value for name, value in times.items() if not name.startswith("**"))
        assert parts == pytest.approx(times["**sum of operators**"], abs=0.05)
        assert parts <= times["**wall-clock step**"]


@pytest.mark.parametrize("name, category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off", "matmul"),
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "matmul"),
    ("aten::addmm", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention (SDPA)"),
    ("_gather_kernel", "anchor mix (Triton)"),
    ("_one_program_forward_kernel", "anchor mix (Triton)"),
    ("_one_program_backward_kernel", "anchor mix (Triton)"),
    ("_token_split_backward_kernel", "anchor mix (Triton)"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("void (anonymous namespace)::cunn_SoftMaxForward<4, float>", "softmax"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>", "layer norm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", profile_benchmark.OTHER),
])
def test_kernel_names_fall_into_their_category(name, category):
    assert profile_benchmark.categorize(name) == category
