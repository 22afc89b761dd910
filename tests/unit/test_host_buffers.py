"""The host copies of an asynchronous save: one flat allocation of the state's exact size (each copy aligned to 64
bytes), not one power-of-two-rounded pinned allocation per tensor; reused from save to save; written by torch.save
byte for byte as the originals are. (Pinning itself needs CUDA: on CPU the same allocation is made unpinned.)"""
import io

import torch

from utils.checkpoints.writer import HOST_ALIGNMENT, HostBuffers, tensors_in, with_copies


def saved_bytes(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def optimizer_like_state() -> dict:
    torch.manual_seed(0)
    return {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(5, 7), "exp_avg_sq": torch.randn(5, 7)},
                      1: {"step": torch.tensor(3.0), "exp_avg": torch.randn(11).bfloat16(),
                          "exp_avg_sq": torch.randn(0)}},
            "param_groups": [{"lr": 0.1, "params": [0, 1]}]}


def test_one_allocation_of_the_exact_size_reused_and_saved_as_the_originals() -> None:
    state = optimizer_like_state()
    tensors = tensors_in("optimizer", state)
    buffers = HostBuffers(pin=False)
    copies = buffers.copy_all(tensors)
    assert buffers.allocations == 1
    assert buffers.allocated_bytes == sum(-(-t.nbytes // HOST_ALIGNMENT) * HOST_ALIGNMENT for t in tensors.values())
    assert buffers.allocated_bytes < 2 * sum(t.nbytes for t in tensors.values())  # 64-byte steps, not powers of 2
    assert all(torch.equal(copies[key], tensor) and copies[key].dtype == tensor.dtype
               for key, tensor in tensors.items())
    pointers = sorted(copy.data_ptr() for copy in copies.values() if copy.numel())
    assert pointers[-1] - pointers[0] < buffers.allocated_bytes  # all inside the one allocation
    storages = {copy.untyped_storage().data_ptr() for copy in copies.values() if copy.numel()}
    assert len(storages) == len(pointers)  # a storage each: torch.save writes each copy, not the allocation
    copied = with_copies("optimizer", state, copies)
    assert saved_bytes(copied) == saved_bytes(state)

    for tensor in tensors.values():
        tensor.add_(1)  # the next save: same shapes, new values
    again = buffers.copy_all(tensors)
    assert buffers.allocations == 1 and all(again[key].data_ptr() == copies[key].data_ptr() for key in copies)
    assert saved_bytes(with_copies("optimizer", state, again)) == saved_bytes(state)

    state["state"][2] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3)}  # the tensors changed: allocated anew
    buffers.copy_all(tensors_in("optimizer", state))
    assert buffers.allocations == 2
