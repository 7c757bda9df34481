import pytest
import torch

# The test models are tiny: one thread avoids oversubscription on small CI machines.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def flash_export(tmp_path_factory):
    """tiny-flash (window, CSA and HCA layers, MoE, mHC) exported once per session: fp32, per-layer
    outputs on. Shared by the export, runtime and check tests (an export takes a minute or two)."""
    pytest.importorskip("onnxruntime")
    from exporter.export import export_model

    out = tmp_path_factory.mktemp("export") / "tiny-flash"
    return export_model("tiny-flash", out, dtype="float32", per_layer=True).out_dir


@pytest.fixture(scope="session")
def dense_fp16_export(tmp_path_factory):
    """tiny-dense (window, CSA, HCA layers; dense FFN) exported in float16, per-layer outputs on."""
    pytest.importorskip("onnxruntime")
    from exporter.export import export_model

    out = tmp_path_factory.mktemp("export") / "tiny-dense-fp16"
    return export_model("tiny-dense", out, dtype="float16", per_layer=True).out_dir
