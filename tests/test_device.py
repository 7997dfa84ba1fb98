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
