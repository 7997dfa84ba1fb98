import pytest
import torch

from encoders.device import DeviceUnavailable, resolve_device


def test_cpu_and_auto_without_gpu():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_requested_but_absent_is_an_error(spec):
    with pytest.raises(DeviceUnavailable, match="no CUDA device"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "", "CPU"])
def test_invalid_device_names_list_valid_ones(spec):
    with pytest.raises(ValueError, match="auto, cpu, cuda, cuda:N"):
        resolve_device(spec)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_resolves():
    assert resolve_device("cuda:0").type == "cuda"


@pytest.mark.parametrize("args, message", [
    (("tpu", "fp32", 32, 0), "auto, cpu, cuda, cuda:N"),
    (("cpu", "int8", 32, 0), r"precision 'int8' is not one of \('fp32', 'bf16', 'fp16'\)"),
    (("cpu", "fp32", -1, 0), r"batch_size must be in 1\.\.4096, or 0 for auto, got -1"),
    (("cpu", "fp32", 4097, 0), "batch_size must be in"),
    (("cpu", "fp32", 32, -1), r"model_copies_per_gpu must be in 0\.\.16"),
    (("cpu", "fp32", 32, 17), r"model_copies_per_gpu must be in 0\.\.16"),
    (("cuda", "fp32", 32, 0, "nvjpeg"), r"image_decode 'nvjpeg' is not one of \('cpu', 'gpu'\)"),
    (("cuda", "fp32", 32, 1, "gpu"), "cannot be combined with model_copies_per_gpu"),
])
def test_placement_rules_name_the_bad_value(args, message):
    """The one statement of the placement rules that EncodeConfig and the handlers both apply."""
    from encoders.device import validate_placement

    with pytest.raises(ValueError, match=message):
        validate_placement(*args)


def test_placement_rules_accept_the_edges():
    from encoders.device import validate_placement

    for args in (("auto", "fp32", 0, 0), ("cuda:1", "bf16", 4096, 16), ("cuda", "fp16", 1, 0, "gpu")):
        validate_placement(*args)
